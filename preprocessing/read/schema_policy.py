"""How the declared schema meets the columns an input has: missing, extra and stored types.

Text inputs (CSV, JSON) arrive as strings and are parsed value by value; typed inputs carry
a stored type per column, which may differ from the one declared in ``etl.schema``:

* a stored type that converts to the declared one (a number or string for a numeric column;
  any scalar for a string column) is cast **value by value**; a value that does not convert
  exactly is quarantined like a bad CSV value: a fractional value for an integer column
  (``0.5`` as an ``int`` label, ``3.5`` as a ``long`` key) and an out-of-range one become
  ``label_invalid`` / ``value_invalid`` instead of being truncated;
* a stored type that cannot hold such values at all (struct, array, map, binary, or a
  date/timestamp for a numeric column) is a :class:`SchemaMismatchError` naming the column,
  both types and the input, raised before any Spark job runs;
* an ``array<…>`` column takes a stored array of numbers (or of strings, cast element by
  element), a Spark ML vector (made an array when read) or JSON text; a nested array is a
  :class:`SchemaMismatchError`. A ``binary`` (image) column takes only binary.

Missing declared columns are a :class:`SchemaMismatchError` too (:func:`require_columns`,
for every input format) and extra columns are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig, is_array, is_integral, is_numeric

__all__ = ["SchemaMismatchError", "check_stored_types", "exact_cast", "require_columns"]

_NUMERIC_SOURCES = (T.NumericType, T.BooleanType, T.StringType)
_TIME_SOURCES = (T.StringType, T.DateType, T.TimestampType, T.TimestampNTZType)
_SCALAR_SOURCES = (
    T.NumericType,
    T.BooleanType,
    T.StringType,
    T.DateType,
    T.TimestampType,
    T.TimestampNTZType,
)


class SchemaMismatchError(ValueError):
    """An input lacks a declared column, or stores one as a type that cannot hold it.

    The message names the column and the input (and, for a type, both types).
    """


def require_columns(found: Sequence[str], needed: Sequence[str], where: str) -> None:
    """Raise :class:`SchemaMismatchError` naming the ``needed`` columns absent from ``found``."""
    missing = [c for c in needed if c not in found]
    if missing:
        raise SchemaMismatchError(
            f"{where} has no column(s) {missing} declared in etl.schema; it has: {', '.join(found)}"
        )


def _accepts(declared: str, stored: T.DataType) -> bool:
    if is_array(declared):  # a flat array of numbers (or strings), or JSON text
        return isinstance(stored, T.StringType) or (
            isinstance(stored, T.ArrayType)
            and isinstance(stored.elementType, T.NumericType | T.StringType)
        )
    if declared == "binary":
        return isinstance(stored, T.BinaryType)
    if is_numeric(declared) or declared == "boolean":
        return isinstance(stored, _NUMERIC_SOURCES)
    if declared in ("date", "timestamp"):
        return isinstance(stored, _TIME_SOURCES)
    return isinstance(stored, _SCALAR_SOURCES)


def check_stored_types(df: DataFrame, cfg: EtlConfig, columns: Sequence[str], where: str) -> None:
    """Raise :class:`SchemaMismatchError` for the first of ``columns`` stored as an unusable type."""
    stored = {f.name: f.dataType for f in df.schema.fields}
    for c in columns:
        if c in stored and not _accepts(cfg.dtype(c), stored[c]):
            raise SchemaMismatchError(
                f"{where}: column {c!r} is stored as {stored[c].simpleString()}, which cannot "
                f"be read as the {cfg.dtype(c)} declared in etl.schema.{c}; fix the declared "
                "type or convert the column"
            )


def exact_cast(c: Column, stored: T.DataType, dtype: str) -> Column:
    """``try_cast(c as dtype)``, null also when a fractional value would be truncated."""
    typed = c.try_cast(dtype)
    if is_integral(dtype) and isinstance(stored, T.FractionalType | T.DecimalType):
        return F.when(typed == c, typed)
    return typed
