"""Read the raw table with the declared columns, for :mod:`preprocessing.read.validation`.

Text inputs (CSV, JSON) are read with every declared column as a string plus Spark's
corrupt-record column, so that validation can cast each value with ``try_cast`` and
quarantine a bad one with the column it came from, instead of Spark silently nulling it.
Typed inputs (Parquet, tables) keep their stored types, which must fit the declared ones
(:mod:`preprocessing.read.schema_policy`); they are cast during validation the same way.

Blank lines are not records to Spark's CSV reader and are not counted; every record the
reader produces is counted exactly once. Lines may end in LF, CRLF or a lone CR; a UTF-8 BOM
is dropped with the header; invalid UTF-8 reads as U+FFFD. Every row carries the file it
came from (``_source_file``) and, for text inputs, the line the parser could not split
(``_corrupt_record``, null otherwise). Spark ML vector columns declared as arrays are read as
``array<double>``; ``image_folder`` inputs are read by :mod:`preprocessing.read.images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig
from preprocessing.read.images import read_image_folder
from preprocessing.read.listing import InputFile, list_input_files
from preprocessing.read.missing import missing_input_as_config_error
from preprocessing.read.schema_policy import check_stored_types, require_columns

__all__ = ["CORRUPT", "SOURCE", "RawInput", "read_raw"]

CORRUPT = "_corrupt_record"
SOURCE = "_source_file"


@dataclass(frozen=True)
class RawInput:
    """The raw DataFrame and what is known about how it was read."""

    df: DataFrame
    text: bool  # every declared column arrived as a string
    trimmed: bool = False  # the parser already trimmed values (blank == null)
    files: tuple[InputFile, ...] | None = None  # the input's listing, when the read needed it


def read_raw(
    spark: SparkSession, cfg: EtlConfig, *, for_scoring: bool = False, source: str = "etl.input"
) -> RawInput:
    """Read ``etl.input`` with the declared columns (strings for text formats).

    ``for_scoring``: the input need not have the label (nor the key). CSV with a header,
    Parquet and tables are read with every column they have and must hold the feature
    columns; headerless CSV and JSON are read as the declared columns in declared order
    without the label. ``source`` names the input in errors: a missing path or table is a
    :class:`~pipeline.core.configbase.ConfigError` for ``<source>.path`` (or for ``source``
    itself when it is a CLI flag, ``--input``), see :mod:`preprocessing.read.missing`.
    """
    key = source if source.startswith("--") else f"{source}.path"
    with missing_input_as_config_error(key):
        return _read_raw(spark, cfg, for_scoring=for_scoring, source=source)


def _read_raw(spark: SparkSession, cfg: EtlConfig, *, for_scoring: bool, source: str) -> RawInput:
    inp = cfg.input
    need = [*cfg.numeric, *cfg.categorical, *cfg.tensor_columns]
    if not for_scoring:
        need = list(cfg.schema)
    if inp.format == "image_folder":
        files = tuple(list_input_files(inp.path, inp.options))
        df = read_image_folder(spark, cfg, files, SOURCE, CORRUPT)
        return RawInput(df, text=False, files=files)
    if inp.format in ("csv", "json"):
        if inp.format == "csv" and inp.header:
            columns = _csv_header(spark, cfg, need, source)
        else:
            columns = [c for c in cfg.schema if not (for_scoring and c == cfg.label)]
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
    found = [c for c in df.columns if c != SOURCE]
    require_columns(found, need, f"{source} {inp.path!r} ({inp.format})")
    df = _vectors_as_arrays(df, [c for c in cfg.arrays if c in need])
    check_stored_types(df, cfg, need, f"{source} {inp.path!r} ({inp.format})")
    df = df.withColumn(CORRUPT, F.lit(None).cast("string"))
    return RawInput(df, text=False)


def _csv_header(spark: SparkSession, cfg: EtlConfig, need: Sequence[str], source: str) -> list[str]:
    """Column names in file order, from the header: CSV columns match the schema by name."""
    inp = cfg.input
    found = spark.read.options(**dict(inp.options)).option("header", "true").csv(inp.path).columns
    require_columns(found, need, f"{source} {inp.path!r}: the CSV header")
    return list(found)


def _vectors_as_arrays(df: DataFrame, columns: Sequence[str]) -> DataFrame:
    """Spark ML vector columns among ``columns`` as ``array<double>`` (dense, all values)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT

    stored = {f.name: f.dataType for f in df.schema.fields}
    vectors = [c for c in columns if isinstance(stored.get(c), VectorUDT)]
    if not vectors:
        return df
    # one projection, however many columns (a withColumn each would nest the plan per column)
    return df.withColumns({c: vector_to_array(F.col(c), "float64") for c in vectors})
