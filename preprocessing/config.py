"""The ``etl`` config section (Spark-free, so that configs validate without a JVM)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.core.configbase import ConfigError, build, check
from pipeline.core.outputs import check_output_uri
from pipeline.data.formats import DEFAULT_FORMAT, FormatName

__all__ = ["EtlConfig", "InputConfig", "SplitConfig"]

_INTEGRAL = {"byte", "tinyint", "short", "smallint", "int", "integer", "long", "bigint"}
_FRACTIONAL = {"float", "double"}
_OTHER = {"string", "boolean", "date", "timestamp"}
_DECIMAL = re.compile(r"^decimal\(\s*\d+\s*,\s*\d+\s*\)$")


def is_integral(dtype: str) -> bool:
    """True for Spark SQL integer types."""
    return dtype in _INTEGRAL


def is_numeric(dtype: str) -> bool:
    """True for Spark SQL types usable as numeric features."""
    return dtype in _INTEGRAL or dtype in _FRACTIONAL or bool(_DECIMAL.match(dtype))


@dataclass(frozen=True, kw_only=True, slots=True)
class InputConfig:
    """Where the raw table is and how to read it."""

    path: str
    """File/dir/glob URI (local, hdfs://, s3a://…) or, with ``format: table``, a table name."""
    format: Literal["csv", "json", "parquet", "table"] = "csv"
    """Input format; ``table`` reads a catalog (Hive) table."""
    header: bool = True
    """CSV only: the first line of every file is a header."""
    options: Mapping[str, str] = field(default_factory=dict)
    """Extra Spark reader options (``sep``, ``quote``, ``encoding``…)."""

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "etl.input.path", "must not be empty")
        for k, v in self.options.items():
            check(isinstance(v, str), f"etl.input.options.{k}", "values must be strings")
        reserved = {"mode", "columnNameOfCorruptRecord"} & set(self.options)
        check(not reserved, "etl.input.options", f"{sorted(reserved)} are set by the ETL itself")


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitConfig:
    """Deterministic train/val/test split by a hash of the key."""

    val: float = 0.1
    """Fraction of rows in the validation split."""
    test: float = 0.1
    """Fraction of rows in the test split."""
    seed: int = 7
    """Salt of the hash; the same seed gives the same split on any cluster."""

    def __post_init__(self) -> None:
        check(0.0 <= self.val < 1.0, "etl.split.val", f"must be in [0, 1), got {self.val}")
        check(0.0 <= self.test < 1.0, "etl.split.test", f"must be in [0, 1), got {self.test}")
        check(
            self.val + self.test < 1.0,
            "etl.split",
            f"val + test must be < 1 (no rows left to train on), got {self.val + self.test}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class EtlConfig:
    """Read → validate (quarantine bad rows) → split → featurize → balanced shards + manifest."""

    input: InputConfig
    """The raw table."""
    schema: Mapping[str, str]
    """Declared columns and their Spark SQL types, e.g. ``{id: long, f0: double, city: string}``."""
    label: str
    """Label column."""
    key: str
    """Column whose hash decides the split (a stable row id)."""
    numeric: tuple[str, ...] = ()
    """Numeric feature columns (imputed and standardized)."""
    categorical: tuple[str, ...] = ()
    """Categorical feature columns (frequency-ranked ``StringIndexer``, unseen → extra index)."""
    onehot: tuple[str, ...] = ()
    """Subset of ``categorical`` to one-hot encode instead of using the standardized index."""
    task: Literal["classification", "regression"] | None = None
    """Default: classification for integer/string/boolean labels, regression for fractional ones."""
    classes: tuple[Any, ...] | None = None
    """Allowed label values (classification); other labels are quarantined. Default: as found in train."""
    missing: Literal["impute", "quarantine"] = "impute"
    """Null / NaN / ±inf in numeric features: impute with the train-split statistic, or quarantine."""
    impute_strategy: Literal["mean", "median"] = "median"
    """Train-split statistic used by ``missing: impute``."""
    max_abs_value: float = 1e30
    """Numeric features with a larger magnitude are quarantined (``value_out_of_range``)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """The split."""
    output: str
    """Shard-set directory (any pyarrow.fs URI)."""
    num_shards: int = 8
    """Files per split; their row counts differ by at most one."""
    format: FormatName = DEFAULT_FORMAT
    """Shard file format: ``parquet``, or ``tfrecord`` (``tf.train.Example`` records)."""
    row_group_rows: int = 65536
    """Rows per Parquet row group; for ``tfrecord``, rows per reader piece (same batches)."""

    def __post_init__(self) -> None:
        check(len(self.schema) > 0, "etl.schema", "must declare at least one column")
        for name, dtype in self.schema.items():
            t = dtype.strip().lower()
            ok = t in _INTEGRAL or t in _FRACTIONAL or t in _OTHER or _DECIMAL.match(t)
            check(bool(ok), f"etl.schema.{name}", f"unknown Spark SQL type {dtype!r}")
        self._check_columns()
        check(self.num_shards >= 1, "etl.num_shards", f"must be >= 1, got {self.num_shards}")
        check(self.row_group_rows >= 1, "etl.row_group_rows", "must be >= 1")
        check(self.max_abs_value > 0, "etl.max_abs_value", "must be > 0")
        check(bool(self.output.strip()), "etl.output", "must not be empty")
        check_output_uri("etl.output", self.output)
        if self.classes is not None:
            check(self.resolved_task == "classification", "etl.classes", "only for classification")
            check(
                len(set(self.classes)) == len(self.classes) > 0, "etl.classes", "must be distinct"
            )

    def _check_columns(self) -> None:
        cols = set(self.schema)
        for key, names in (("etl.numeric", self.numeric), ("etl.categorical", self.categorical)):
            for n in names:
                check(n in cols, key, f"column {n!r} is not declared in etl.schema")
        for n in self.numeric:
            check(
                is_numeric(self.dtype(n)),
                "etl.numeric",
                f"{n!r} has non-numeric type {self.dtype(n)}",
            )
        check(
            self.label in cols, "etl.label", f"column {self.label!r} is not declared in etl.schema"
        )
        check(self.key in cols, "etl.key", f"column {self.key!r} is not declared in etl.schema")
        both = set(self.numeric) & set(self.categorical)
        check(not both, "etl.categorical", f"{sorted(both)} also listed under etl.numeric")
        feats = set(self.numeric) | set(self.categorical)
        check(self.label not in feats, "etl.label", "the label cannot also be a feature")
        check(bool(feats), "etl.numeric", "declare at least one numeric or categorical feature")
        extra = set(self.onehot) - set(self.categorical)
        check(not extra, "etl.onehot", f"{sorted(extra)} are not listed under etl.categorical")
        if len(set(self.numeric)) != len(self.numeric) or len(set(self.categorical)) != len(
            self.categorical
        ):
            raise ConfigError("etl.numeric", "a column is listed twice")

    def dtype(self, column: str) -> str:
        """Normalized declared type of ``column``."""
        return self.schema[column].strip().lower()

    @property
    def resolved_task(self) -> str:
        """The task, derived from the label type when not set."""
        if self.task is not None:
            return self.task
        t = self.dtype(self.label)
        return "regression" if t in _FRACTIONAL or _DECIMAL.match(t) else "classification"

    @classmethod
    def from_mapping(cls, data: Any, prefix: str = "etl") -> EtlConfig:
        """Build and validate from YAML data."""
        return build(cls, data, prefix)
