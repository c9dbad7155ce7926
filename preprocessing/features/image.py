"""Image columns (``etl.images``): uint8 ``[H, W, C]`` pixels, decoded during validation.

The column's ``normalize`` is ``scale`` 255 and the per-channel mean and (population)
standard deviation of ``x / 255`` over every pixel of the good train rows, from the
per-row channel sums the decoder emits (:mod:`preprocessing.read.images`): one ``sum`` per
channel and per channel square, in the same Spark job as the other kinds' statistics. A
standard deviation below :data:`~preprocessing.features.array.MIN_STD` (a constant channel)
is recorded as 1.
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

__all__ = ["IMAGE"]


def _spec(cfg: EtlConfig, column: str, fitted: None) -> ColumnSpec:
    return ColumnSpec(column, "uint8", cfg.images[column].shape, kind="image")


def _aggregates(cfg: EtlConfig, column: str) -> list[Column]:
    channels = cfg.images[column].num_channels
    sums = F.col(image_sums(column))
    return [
        F.count(sums),
        *[F.sum(F.element_at(sums, i + 1)) for i in range(2 * channels)],
    ]


def _normalize(cfg: EtlConfig, column: str, values: list[Any]) -> dict[str, Any] | None:
    img = cfg.images[column]
    rows, sums = int(values[0]), np.asarray(values[1:], dtype=np.float64)
    pixels = rows * math.prod(img.size)
    assert pixels > 0, "the train split has good rows (checked before fitting)"
    c = img.num_channels
    mean = sums[:c] / pixels
    std = np.sqrt(np.maximum(sums[c:] / pixels - mean * mean, 0.0))
    return {"scale": 255.0, "mean": mean.tolist(), "std": floored(std).tolist()}


IMAGE = TensorKind(
    name="image",
    columns=lambda cfg: [c for c in cfg.schema if c in cfg.images],
    spec=_spec,
    aggregates=_aggregates,
    normalize=_normalize,
)
"""The image kind (:data:`~preprocessing.features.tensors.TENSOR_KINDS`)."""
