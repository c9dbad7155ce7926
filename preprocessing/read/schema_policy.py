"""What the ETL does when a typed input (Parquet, a table) stores a column as another type.

Text inputs (CSV, JSON) arrive as strings and are parsed value by value; typed inputs carry
a stored type per column, which may differ from the one declared in ``etl.schema``:

* a stored type that converts to the declared one (a number or string for a numeric column;
  any scalar for a string column) is cast **value by value**; a value that does not convert
  exactly is quarantined like a bad CSV value: a fractional value for an integer column
  (``0.5`` as an ``int`` label, ``3.5`` as a ``long`` key) and an out-of-range one become
  ``label_invalid`` / ``value_invalid`` instead of being truncated;
* a stored type that cannot hold such values at all (struct, array, map, binary, or a
  date/timestamp for a numeric column) is a :class:`SchemaMismatchError` naming the column,
  both types and the input, raised before any Spark job runs.

Missing declared columns are an error and extra columns are ignored
(:func:`preprocessing.validate.require_columns`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig, is_integral, is_numeric

__all__ = ["check_stored_types", "exact_cast"]

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


def _accepts(declared: str, stored: T.DataType) -> bool:
    if is_numeric(declared) or declared == "boolean":
        return isinstance(stored, _NUMERIC_SOURCES)
    if declared in ("date", "timestamp"):
        return isinstance(stored, _TIME_SOURCES)
    return isinstance(stored, _SCALAR_SOURCES)


def check_stored_types(df: DataFrame, cfg: EtlConfig, columns: Sequence[str], where: str) -> None:
    """Raise :class:`SchemaMismatchError` for the first of ``columns`` stored as an unusable type."""
    from preprocessing.validate import SchemaMismatchError

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
