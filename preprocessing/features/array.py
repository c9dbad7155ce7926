"""Array columns (``etl.arrays``): float32 tensors of the declared shape.

Stored as read (validated and cast to float32 in :mod:`preprocessing.read.arrays`). With
``standardize: true`` the column's ``normalize`` is the per-element train mean and sample
standard deviation (Spark ML's ``Summarizer``, as ``StandardScaler`` computes them) with
``scale`` 1, each shaped like a row; a standard deviation below :data:`MIN_STD` (a constant
element) is recorded as 1, so that the element is centred to 0 rather than blown up.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
from pyspark.ml.functions import array_to_vector
from pyspark.ml.stat import Summarizer
from pyspark.sql import Column
from pyspark.sql import functions as F

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig
from preprocessing.features.kind import TensorKind

__all__ = ["ARRAY", "MIN_STD"]

MIN_STD: Final = 1e-6
"""A fitted standard deviation below this is recorded as 1 (array and image columns)."""


def _spec(cfg: EtlConfig, column: str, fitted: None) -> ColumnSpec:
    return ColumnSpec(column, "float32", tuple(cfg.arrays[column].shape), kind="array")


def _aggregates(cfg: EtlConfig, column: str) -> list[Column]:
    if not cfg.arrays[column].standardize:
        return []
    summary = Summarizer.metrics("mean", "std").summary(array_to_vector(F.col(column)))
    return [summary]


def floored(std: np.ndarray) -> np.ndarray:
    """``std`` with every value below :data:`MIN_STD` (or not finite) replaced by 1."""
    return np.where(np.isfinite(std) & (std >= MIN_STD), std, 1.0)


def _normalize(cfg: EtlConfig, column: str, values: list[Any]) -> dict[str, Any] | None:
    if not values:
        return None
    shape = tuple(cfg.arrays[column].shape)
    summary = values[0]
    mean = np.asarray(summary["mean"].toArray(), dtype=np.float64)
    std = floored(np.asarray(summary["std"].toArray(), dtype=np.float64))
    assert mean.size == math.prod(shape), "the summary has one value per element"
    return {
        "scale": 1.0,
        "mean": mean.reshape(shape).tolist(),
        "std": std.reshape(shape).tolist(),
    }


ARRAY = TensorKind(
    name="array",
    columns=lambda cfg: [c for c in cfg.schema if c in cfg.arrays],
    spec=_spec,
    aggregates=_aggregates,
    normalize=_normalize,
)
"""The array kind (:data:`~preprocessing.features.tensors.TENSOR_KINDS`)."""
