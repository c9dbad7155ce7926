"""Read the raw table and validate every row against the declared schema.

Text inputs (CSV, JSON) are read with every declared column as a string plus Spark's
corrupt-record column, then cast with ``try_cast``: this is what lets a bad value be
quarantined with the column it came from, instead of Spark silently nulling it. Typed
inputs (Parquet, tables) are cast from their stored type the same way.

Each row gets ``_reason`` (null when the row is good) and ``_reason_column``. Reasons, in
priority order (the first that applies wins):

=====================  ===============================================================
``malformed_record``   the parser could not split the line into the declared fields
                       (too few / too many fields, unterminated quote, broken JSON)
``repeated_header``    a header line in the middle of the data
``key_missing``        the split key is null or empty
``label_missing``      the label is null or empty
``label_invalid``      the label does not parse as its type (``0.5`` for an int label),
                       is not one of ``etl.classes``, or is not finite (regression)
``value_invalid``      a feature value does not parse as its declared type
``value_out_of_range`` a numeric feature with ``|x| > etl.max_abs_value``
``value_not_finite``   NaN / ±inf in a numeric feature, with ``missing: quarantine``
``value_missing``      a null numeric feature, with ``missing: quarantine``
=====================  ===============================================================

With ``missing: impute`` (the default) null / NaN / ±inf numeric values become null here and
are imputed later with the train-split statistic. Blank lines are not records to Spark's CSV
reader and are not counted; every record the reader produces is counted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig

__all__ = [
    "CORRUPT",
    "REASON",
    "REASON_COLUMN",
    "SOURCE",
    "SchemaMismatchError",
    "read_raw",
    "validate",
]

CORRUPT = "_corrupt_record"
REASON = "_reason"
REASON_COLUMN = "_reason_column"
SOURCE = "_source_file"
RAW_PREFIX = "_raw_"
_TYPED = "_typed_"
_CODE = "_reason_code"


class SchemaMismatchError(ValueError):
    """A typed input lacks a declared column (names the column and the input)."""


@dataclass(frozen=True)
class RawInput:
    """The raw DataFrame and what is known about how it was read."""

    df: DataFrame
    text: bool  # every declared column arrived as a string
    trimmed: bool = False  # the parser already trimmed values (blank == null)


def read_raw(spark: SparkSession, cfg: EtlConfig) -> RawInput:
    """Read ``etl.input`` with the declared columns (strings for text formats)."""
    inp = cfg.input
    if inp.format in ("csv", "json"):
        columns = (
            _csv_header(spark, cfg) if inp.format == "csv" and inp.header else list(cfg.schema)
        )
        fields = [T.StructField(c, T.StringType(), True) for c in columns]
        schema = T.StructType([*fields, T.StructField(CORRUPT, T.StringType(), True)])
        reader = (
            spark.read.schema(schema)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .options(**dict(inp.options))
        )
        if inp.format == "csv":
            # enforceSchema=false: Spark checks every file's header against these names.
            # The parser trims fields, so a blank field arrives as null (no per-value trim).
            reader = reader.option("header", str(inp.header).lower())
            reader = reader.option("ignoreLeadingWhiteSpace", "true")
            reader = reader.option("ignoreTrailingWhiteSpace", "true")
            df = reader.option("enforceSchema", "false").csv(inp.path)
        else:
            df = reader.json(inp.path)
        df = df.withColumn(SOURCE, F.col("_metadata.file_path"))
        return RawInput(df, text=True, trimmed=inp.format == "csv")
    if inp.format == "parquet":
        df = spark.read.options(**dict(inp.options)).parquet(inp.path)
        df = df.withColumn(SOURCE, F.col("_metadata.file_path"))
    else:
        df = spark.read.table(inp.path).withColumn(SOURCE, F.lit(inp.path))
    missing = [c for c in cfg.schema if c not in df.columns]
    if missing:
        raise SchemaMismatchError(
            f"etl.input {inp.path!r} ({inp.format}) has no column(s) {missing} declared in "
            f"etl.schema; it has: {', '.join(c for c in df.columns if c != SOURCE)}"
        )
    df = df.withColumn(CORRUPT, F.lit(None).cast("string"))
    return RawInput(df, text=False)


def _csv_header(spark: SparkSession, cfg: EtlConfig) -> list[str]:
    """Column names in file order, from the header: CSV columns match the schema by name."""
    inp = cfg.input
    found = spark.read.options(**dict(inp.options)).option("header", "true").csv(inp.path).columns
    missing = [c for c in cfg.schema if c not in found]
    if missing:
        raise SchemaMismatchError(
            f"etl.input {inp.path!r}: the CSV header has no column(s) {missing} declared in "
            f"etl.schema; the header is: {', '.join(found)}"
        )
    return list(found)


def _blank(c: Column, trimmed: bool = False) -> Column:
    if trimmed:
        return c.isNull() | (c.cast("string") == "")
    return c.isNull() | (F.trim(c.cast("string")) == "")


def validate(raw: RawInput, cfg: EtlConfig) -> DataFrame:
    """Typed declared columns + ``_reason`` / ``_reason_column`` + raw strings for quarantine.

    Output columns: every declared column with its declared type, ``_reason``,
    ``_reason_column``, ``_source_file``, ``_corrupt_record`` and ``_raw_<col>`` (the value as
    read, as a string, kept only on quarantined rows).

    Built as stacked projections so that each ``try_cast`` and the whole check chain are
    evaluated once per row: columns are cast once, the checks yield one integer code (the
    index of the first failing check), and reason, column and raw values derive from the code.
    Spark keeps the projections apart because their outputs are referenced many times.
    """
    df = raw.df
    df = df.select(
        "*", *[_typed(df, c, cfg.dtype(c), raw.trimmed).alias(_TYPED + c) for c in cfg.schema]
    )
    checks = _checks(raw, cfg)
    code = F.coalesce(*[F.when(cond, F.lit(i)) for i, (cond, _, _) in enumerate(checks)])
    df = df.withColumn(_CODE, code)
    code_col = F.col(_CODE)
    out = [F.col(_TYPED + c).alias(c) for c in cfg.schema if c not in cfg.numeric]
    out += [_finite_or_null(F.col(_TYPED + c).cast("double")).alias(c) for c in cfg.numeric]
    quarantined = F.col(_CODE).isNotNull()
    raw_cols = [
        F.when(quarantined, F.col(c).cast("string")).alias(RAW_PREFIX + c) for c in cfg.schema
    ]
    return df.select(
        *out,
        _lookup(code_col, [r for _, r, _ in checks]).alias(REASON),
        _lookup(code_col, [c or None for _, _, c in checks]).alias(REASON_COLUMN),
        F.when(quarantined, F.col(SOURCE)).alias(SOURCE),
        F.col(CORRUPT),
        *raw_cols,
    )


def _lookup(code: Column, values: list[str | None]) -> Column:
    """``values[code]`` as a CASE over integer codes (null code → null)."""
    out = F.when(code == F.lit(0), F.lit(values[0]).cast("string"))
    for i, v in enumerate(values[1:], start=1):
        out = out.when(code == F.lit(i), F.lit(v).cast("string"))
    return out


def _checks(raw: RawInput, cfg: EtlConfig) -> list[tuple[Column, str, str]]:
    """``(condition, reason, column)`` in priority order, over raw and ``_typed_`` columns."""

    def typed(c: str) -> Column:
        return F.col(_TYPED + c)

    def blank(c: str) -> Column:
        return _blank(F.col(c), raw.trimmed)

    checks: list[tuple[Column, str, str]] = [(F.col(CORRUPT).isNotNull(), "malformed_record", "")]
    if raw.text:
        header = F.lit(True)
        for c in cfg.schema:
            value = F.col(c) if raw.trimmed else F.trim(F.col(c))
            header = header & (value == F.lit(c))
        checks.append((header, "repeated_header", ""))
    checks.append((blank(cfg.key), "key_missing", cfg.key))
    checks.append((typed(cfg.key).isNull(), "value_invalid", cfg.key))
    checks.append((blank(cfg.label), "label_missing", cfg.label))
    checks.append((_label_invalid(typed(cfg.label), cfg), "label_invalid", cfg.label))
    checks += [
        (~blank(c) & typed(c).isNull(), "value_invalid", c)
        for c in (*cfg.numeric, *cfg.categorical)
    ]
    for c in cfg.numeric:
        x = typed(c).cast("double")
        finite = ~F.isnan(x) & (F.abs(x) != F.lit(float("inf")))
        checks.append((finite & (F.abs(x) > F.lit(cfg.max_abs_value)), "value_out_of_range", c))
        if cfg.missing == "quarantine":
            checks.append((x.isNotNull() & ~finite, "value_not_finite", c))
            checks.append((x.isNull(), "value_missing", c))
    return checks


def _typed(df: DataFrame, column: str, dtype: str, trimmed: bool) -> Column:
    c = F.col(column)
    if dtype == "string":
        return F.when(~_blank(c, trimmed), c.cast("string"))
    if dtype == "boolean":
        return F.lower(F.trim(c.cast("string"))).try_cast("boolean")
    if isinstance(df.schema[column].dataType, T.StringType) and not trimmed:
        c = F.trim(c)
    return c.try_cast(dtype)


def _finite_or_null(x: Column) -> Column:
    """NaN / ±inf become null so that the Imputer treats them as missing."""
    return F.when(~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))), x)


def _label_invalid(label: Column, cfg: EtlConfig) -> Column:
    if cfg.resolved_task == "regression":
        x = label.cast("double")
        return label.isNull() | F.isnan(x) | (F.abs(x) == F.lit(float("inf")))
    bad = label.isNull()
    if cfg.classes is not None:
        allowed = [F.lit(v).cast(cfg.dtype(cfg.label)) for v in cfg.classes]
        bad = bad | ~label.isin(*allowed)
    return bad
