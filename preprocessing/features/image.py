"""Image columns (``etl.images``): uint8 ``[H, W, C]`` pixels, decoded during validation.

The column's ``normalize`` is ``scale`` 255 and the per-channel mean and (population)
standard deviation of ``x / 255`` over every pixel of the good train rows, from the
per-row integer channel sums of ``x`` and ``x²`` the decoder emits
(:func:`~preprocessing.read.imagedecode.channel_sums`). Where the ETL decodes the images
while validating, one ``sum`` per channel and per channel square runs in the same Spark job
as the other kinds' statistics; where the shard writers decode them, the writers add up the
same integers (:func:`image_normalize`). Either way the sums are exact, so the entry does
not depend on the path. A standard deviation below
:data:`~preprocessing.features.array.MIN_STD` (a constant channel) is recorded as 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pyspark.sql import Column
from pyspark.sql import functions as F

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig
from preprocessing.features.array import floored
from preprocessing.features.kind import TensorKind
from preprocessing.read.images import image_sums

__all__ = ["IMAGE", "image_normalize"]


def _spec(cfg: EtlConfig, column: str, fitted: None) -> ColumnSpec:
    return ColumnSpec(column, "uint8", cfg.images[column].shape, kind="image")


def _aggregates(cfg: EtlConfig, column: str) -> list[Column]:
    channels = cfg.images[column].num_channels
    sums = F.col(image_sums(column))
    return [
        F.count(sums),
        *[F.sum(F.element_at(sums, i + 1)) for i in range(2 * channels)],
    ]


def image_normalize(cfg: EtlConfig, column: str, values: list[Any]) -> dict[str, Any]:
    """``normalize`` of image column ``column`` from its train sums.

    ``values``: ``[rows, Σx per channel…, Σx² per channel…]`` over the good train rows.
    """
    img = cfg.images[column]
    rows, sums = int(values[0]), np.asarray([int(v) for v in values[1:]], dtype=np.float64)
    pixels = rows * math.prod(img.size)
    assert pixels > 0, "the train split has good rows (checked before fitting)"
    c = img.num_channels
    mean = sums[:c] / 255.0 / pixels
    std = np.sqrt(np.maximum(sums[c:] / 65025.0 / pixels - mean * mean, 0.0))
    return {"scale": 255.0, "mean": mean.tolist(), "std": floored(std).tolist()}


IMAGE = TensorKind(
    name="image",
    columns=lambda cfg: [c for c in cfg.schema if c in cfg.images],
    spec=_spec,
    aggregates=_aggregates,
    normalize=image_normalize,
)
"""The image kind (:data:`~preprocessing.features.tensors.TENSOR_KINDS`)."""
