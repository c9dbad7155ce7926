"""Array columns (``etl.arrays``): typed as ``array<double>`` and checked, all in the JVM.

A text input holds an array as JSON text (a JSON list, or a CSV field like ``"[1, 2.5]"``),
parsed with ``from_json``; a typed input's ``array<…>`` column is cast element by element
(Spark ML vectors were turned into arrays when read, :mod:`preprocessing.read.raw`). Reasons:
``array_missing`` and ``array_invalid`` (:mod:`preprocessing.read.reasons`).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig
from preprocessing.read import reasons

__all__ = ["ARRAY_INVALID", "ARRAY_MISSING", "array_checks", "typed_array"]

ARRAY_MISSING: Final = reasons.ARRAY_MISSING.code
ARRAY_INVALID: Final = reasons.ARRAY_INVALID.code
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)


def typed_array(df: DataFrame, column: str) -> Column:
    """``column`` as ``array<double>`` (null when it does not parse or cast)."""
    c = F.col(column)
    stored = df.schema[column].dataType
    if isinstance(stored, T.StringType):
        return F.from_json(F.trim(c), "array<double>")
    return c.try_cast("array<double>")


def array_checks(
    cfg: EtlConfig, column: str, raw: Column, typed: Column, *, text: bool
) -> list[tuple[Column, str, str]]:
    """``(condition, reason, column)`` of array column ``column``.

    ``raw`` is the column as read; ``text``: it is a string column (an empty field is missing).
    """
    size = math.prod(cfg.arrays[column].shape)
    missing = raw.isNull()
    if text:
        missing = missing | (F.trim(raw) == "")
    bad_element = F.exists(
        typed, lambda x: x.isNull() | F.isnan(x) | (F.abs(x) > F.lit(_FLOAT32_MAX))
    )
    invalid = typed.isNull() | (F.size(typed) != F.lit(size)) | bad_element
    return [(missing, ARRAY_MISSING, column), (~missing & invalid, ARRAY_INVALID, column)]
