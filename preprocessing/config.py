"""The ``etl`` config section (Spark-free, so that configs validate without a JVM)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from pipeline.core.configbase import ConfigError, build, check
from pipeline.core.outputs import check_output_uri
from pipeline.data.formats import DEFAULT_FORMAT, FormatName, get_format

__all__ = [
    "INPUT_FORMATS",
    "ArrayConfig",
    "EtlConfig",
    "ImageConfig",
    "InputConfig",
    "SplitConfig",
    "TextConfig",
]

_INTEGRAL = {"byte", "tinyint", "short", "smallint", "int", "integer", "long", "bigint"}
_FRACTIONAL = {"float", "double"}
_OTHER = {"string", "boolean", "date", "timestamp", "binary"}
_DECIMAL = re.compile(r"^decimal\(\s*\d+\s*,\s*\d+\s*\)$")
_ARRAY = re.compile(
    r"^array\s*<\s*(float|double|byte|tinyint|short|smallint|int|integer|long|bigint)\s*>$"
)
# Column names of the shard files that a declared array / image column may not take.
_SHARD_NAMES = ("key", "features", "label")
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own ``Image.MAX_IMAGE_PIXELS``: ``etl.images.<column>.max_pixels``' default."""


def _unsupported(dtype: str) -> str:
    """The message for a type the ETL cannot read, listing the ones it can."""
    simple = sorted(_INTEGRAL | _FRACTIONAL | _OTHER)
    return (
        f"unsupported type {dtype!r}; supported: {', '.join(simple)}, decimal(p,s) and "
        "array<float|double|int|long|...> (with an etl.arrays entry)"
    )


def is_integral(dtype: str) -> bool:
    """True for Spark SQL integer types."""
    return dtype in _INTEGRAL


def is_numeric(dtype: str) -> bool:
    """True for Spark SQL types usable as numeric features."""
    return dtype in _INTEGRAL or dtype in _FRACTIONAL or bool(_DECIMAL.match(dtype))


def is_array(dtype: str) -> bool:
    """True for the declared types of array columns (``array<float>``, ``array<int>``…)."""
    return bool(_ARRAY.match(dtype))


InputFormat = Literal["csv", "json", "parquet", "table", "image_folder"]
INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)
"""Every ``etl.input.format`` (``spark-train score --format`` takes each of them)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InputConfig:
    """Where the raw table is and how to read it."""

    path: str
    """File/dir/glob URI (local, hdfs://, s3a://…) or, with ``format: table``, a table name."""
    format: InputFormat = "csv"
    """Input format; ``table`` reads a catalog (Hive) table; ``image_folder`` reads a tree of
    image files ``<path>/<class>/<file>`` (local, ``hdfs://``, ``s3a://``, ``gs://``; listed
    with ``pyarrow.fs``, names starting with ``.`` or ``_`` skipped, the one option
    ``pathGlobFilter: "*.png"`` filters file names): ``etl.key`` gets the file's URI,
    ``etl.label`` the name of its parent folder and the one ``etl.images`` column the image,
    read and decoded in the executors (declare them ``string``, the label's type, and
    ``binary``)."""
    header: bool = True
    """CSV only: the first line of every file is a header."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Extra Spark reader options (``sep``, ``quote``, ``encoding``, ``multiLine``…). Values
    are strings, booleans or numbers, taken as PySpark's ``DataFrameReader.option`` takes
    them: ``true`` → ``"true"``, ``2`` → ``"2"``; a list or mapping is refused."""

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "etl.input.path", "must not be empty")
        object.__setattr__(self, "options", MappingProxyType(_reader_options(self.options)))
        reserved = {"mode", "columnNameOfCorruptRecord"} & set(self.options)
        check(not reserved, "etl.input.options", f"{sorted(reserved)} are set by the ETL itself")
        if self.format == "image_folder":
            other = sorted(set(self.options) - {"pathGlobFilter"})
            check(
                not other,
                "etl.input.options",
                f"{other}: an image_folder input takes only pathGlobFilter",
            )


def _reader_options(options: Mapping[str, Any]) -> dict[str, str]:
    """Reader options as strings, as PySpark's ``DataFrameReader.option`` converts them."""
    out = {}
    for k, v in options.items():
        if isinstance(v, bool):  # before int: a bool is an int
            out[k] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[k] = str(v)
        else:
            raise ConfigError(
                f"etl.input.options.{k}",
                f"must be a string, boolean or number (a Spark reader option), got {v!r}",
            )
    return out


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
class ArrayConfig:
    """One fixed-shape numeric column: ``etl.arrays.<column>`` (declared ``array<float>``…)."""

    shape: tuple[int, ...]
    """Shape of one row's value, e.g. ``[16]`` or ``[3, 32, 32]``. The input holds exactly
    ``prod(shape)`` numbers in row-major order: an ``array<…>`` or Spark ML vector column, or a
    flat JSON list (JSON input, or the text of a CSV field). Stored as float32; a row with
    another length, a null or non-finite element, a nested list or a non-number is
    quarantined (``array_invalid``), a null value too (``array_missing``)."""
    standardize: bool = False
    """Fit the per-element train mean and std (sample std; a std below 1e-6 is recorded as 1)
    and record them as the column's ``normalize`` in the manifest, for the model to apply;
    the stored values stay as read."""

    def check(self, key: str) -> None:
        """Raise :class:`ConfigError` under ``key`` for an unusable shape."""
        check(len(self.shape) >= 1, f"{key}.shape", "must list at least one dimension")
        check(all(d >= 1 for d in self.shape), f"{key}.shape", f"must be >= 1, got {self.shape}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageConfig:
    """One image column: ``etl.images.<column>`` (declared ``string`` paths or ``binary``)."""

    size: tuple[int, ...]
    """``[height, width]`` of the stored images. A ``string`` column holds a path or URI read
    in the executors through pyarrow.fs (local, ``file:``, ``hdfs://``, ``s3://`` /
    ``s3a://``, ``gs://``), a ``binary`` one the encoded file; decoded with Pillow (EXIF
    orientation applied), converted to ``channels``, resized per ``resize`` and stored as
    uint8 ``[height, width, channels]``."""
    channels: Literal["L", "RGB"] = "RGB"
    """``L`` (1 channel, ITU-R 601 luma) or ``RGB`` (3); palette images are expanded, alpha is
    dropped (as torchvision's loader does), CMYK converted, 16-bit samples scaled to 8 bits."""
    resize: Literal["crop", "stretch"] = "crop"
    """``crop``: keep the aspect ratio — cut the largest centred box of the target aspect
    ratio and scale it to ``size`` (Pillow's ``ImageOps.fit``); ``stretch``: scale the whole
    image to ``size`` (``Image.resize``), distorting the aspect ratio."""
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    """Pillow resampling filter used by ``resize``."""
    decode: Literal["exact", "fast"] = "exact"
    """``exact``: every pixel decoded, then resized (Pillow's own result). ``fast``: a JPEG
    larger than twice ``size`` is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (Pillow's ``Image.draft``; the largest reduction that still covers ``size`` after
    ``resize``), then resized as with ``exact``: on JPEG photo tiles 256² → 64², 1.7–1.9×
    faster per image, mean absolute difference 1.6–2.6 levels of 255 from ``exact``
    (bench/RESULTS.md, Images). Other formats, and JPEGs under twice ``size``, decode
    exactly either way. Scoring applies the bundle's setting."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images whose header claims more pixels (width × height) are quarantined
    (``image_too_large``) before any pixel is decoded: decompression-bomb protection."""

    def check(self, key: str) -> None:
        """Raise :class:`ConfigError` under ``key`` for an unusable size or limit."""
        check(
            len(self.size) == 2 and all(d >= 1 for d in self.size),
            f"{key}.size",
            f"must be [height, width] of positive integers, got {list(self.size)}",
        )
        check(self.max_pixels >= 1, f"{key}.max_pixels", "must be >= 1")

    @property
    def num_channels(self) -> int:
        """1 for ``L``, 3 for ``RGB``."""
        return 1 if self.channels == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one stored image."""
        return (self.size[0], self.size[1], self.num_channels)


TEXT_SAMPLE_CHARS = 4000
"""Characters of each sampled train text that a tokenizer is trained on (its first ones)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TextConfig:
    """One free-text column: ``etl.texts.<column>`` (declared ``string``).

    Tokenized in the executors (Hugging Face ``tokenizers``, batch-encoded per Arrow batch)
    and stored as an int32 tensor column of ``max_length`` token ids, padded with the
    tokenizer's pad id (0 for a trained one); a row's length is its count of non-pad ids.
    Longer sequences keep their first ``max_length`` tokens; the rows cut are counted per
    split in the manifest (``text.<column>.truncated``).
    """

    max_length: int = 128
    """Token ids stored per row (the tensor column's shape is ``[max_length]``)."""
    tokenizer: str | None = None
    """URI of a Hugging Face ``tokenizer.json`` to use as it is (any storage URI); its pad
    token is taken from its padding settings, else ``[PAD]`` / ``<pad>`` in its vocabulary.
    Unset: a tokenizer is trained on the train split (``algorithm``, ``vocab_size``)."""
    algorithm: Literal["bpe", "wordpiece"] = "wordpiece"
    """The model of a trained tokenizer: byte-pair encoding or WordPiece (NFKC-normalized,
    split on whitespace and punctuation; special tokens ``[PAD]`` = 0 and ``[UNK]`` = 1)."""
    vocab_size: int = 8000
    """Vocabulary size of a trained tokenizer (at most; a small corpus gives fewer)."""
    lowercase: bool = True
    """A trained tokenizer lowercases its input."""
    sample_rows: int = 50_000
    """A tokenizer is trained on at most this many good train rows, picked by a seeded hash
    of the key (``etl.split.seed``) and gathered to the driver, each cut to its first 4000
    characters: the driver holds at most ``sample_rows`` × 4000 characters."""
    empty: Literal["keep", "quarantine"] = "keep"
    """A null, empty or whitespace-only value: ``keep`` stores an empty sequence (all pad),
    ``quarantine`` rejects the row (``text_missing``)."""
    max_chars: int = 100_000
    """Longer values are quarantined (``text_too_long``) before tokenization."""

    def check(self, key: str) -> None:
        """Raise :class:`ConfigError` under ``key`` for unusable sizes."""
        check(self.max_length >= 1, f"{key}.max_length", "must be >= 1")
        check(self.vocab_size >= 10, f"{key}.vocab_size", "must be >= 10")
        check(self.sample_rows >= 1, f"{key}.sample_rows", "must be >= 1")
        check(self.max_chars >= 1, f"{key}.max_chars", "must be >= 1")
        if self.tokenizer is not None:
            check(bool(self.tokenizer.strip()), f"{key}.tokenizer", "must not be empty")


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
    arrays: Mapping[str, ArrayConfig] = field(default_factory=dict)
    """Array columns (declared ``array<float>``, ``array<double>``, ``array<int>``…), each
    stored as its own float32 tensor column of the shard files, named as the column."""
    images: Mapping[str, ImageConfig] = field(default_factory=dict)
    """Image columns, each stored as its own uint8 ``[H, W, C]`` tensor column named as the
    column, with the per-channel train mean / std of ``x / 255`` in the manifest."""
    texts: Mapping[str, TextConfig] = field(default_factory=dict)
    """Free-text columns (declared ``string``), each tokenized into its own int32 tensor
    column of token ids named as the column (see :class:`TextConfig`)."""
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
    """Shard file format: ``parquet``, or ``tfrecord`` (``tf.train.Example`` records, one
    feature per column; images as one ``bytes_list`` value of uint8 pixels)."""
    row_group_rows: int = 65536
    """Rows per Parquet row group; for ``tfrecord``, rows per reader piece (same batches)."""

    def __post_init__(self) -> None:
        check(len(self.schema) > 0, "etl.schema", "must declare at least one column")
        for name, dtype in self.schema.items():
            t = dtype.strip().lower()
            ok = t in _INTEGRAL or t in _FRACTIONAL or t in _OTHER or _DECIMAL.match(t)
            check(bool(ok or is_array(t)), f"etl.schema.{name}", _unsupported(dtype))
        self._check_columns()
        self._check_tensors()
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
        check(
            bool(feats or self.arrays or self.images or self.texts),
            "etl.numeric",
            "declare at least one numeric, categorical, array, image or text feature",
        )
        extra = set(self.onehot) - set(self.categorical)
        check(not extra, "etl.onehot", f"{sorted(extra)} are not listed under etl.categorical")
        if len(set(self.numeric)) != len(self.numeric) or len(set(self.categorical)) != len(
            self.categorical
        ):
            raise ConfigError("etl.numeric", "a column is listed twice")

    def _check_tensors(self) -> None:
        """The ``arrays`` / ``images`` columns: declared types, names, format and input."""
        tabular = {*self.numeric, *self.categorical, self.key, self.label}
        groups = (("arrays", self.arrays), ("images", self.images), ("texts", self.texts))
        for group, kind in groups:
            for name, col in kind.items():
                key = f"etl.{group}.{name}"
                check(name in self.schema, key, f"column {name!r} is not declared in etl.schema")
                check(name not in tabular, key, "is also the key, the label or a tabular feature")
                check(
                    name not in _SHARD_NAMES and not name.startswith("_"),
                    key,
                    f"a tensor column may not be named {name!r} (shard columns {_SHARD_NAMES}; "
                    "names starting with '_' are the ETL's)",
                )
                col.check(key)
        both = sorted(set(self.arrays) & set(self.images))
        check(not both, "etl.images", f"{both} also listed under etl.arrays")
        both = sorted(set(self.texts) & {*self.arrays, *self.images})
        check(not both, "etl.texts", f"{both} also listed under etl.arrays or etl.images")
        for name in self.texts:
            t = self.dtype(name)
            check(t == "string", f"etl.texts.{name}", f"is declared {t}; text columns are string")
        for name in self.schema:
            t = self.dtype(name)
            if is_array(t):
                check(
                    name in self.arrays, f"etl.schema.{name}", "declare its shape under etl.arrays"
                )
            if t == "binary":
                check(name in self.images, f"etl.schema.{name}", "only image columns are binary")
        for name in self.arrays:
            t = self.dtype(name)
            check(is_array(t), f"etl.arrays.{name}", f"is declared {t}, not array<float>…")
        for name in self.images:
            t = self.dtype(name)
            check(
                t in ("string", "binary"),
                f"etl.images.{name}",
                f"is declared {t}; image columns are string (a path / URI) or binary",
            )
        self._check_tensor_io()

    def _check_tensor_io(self) -> None:
        """Input formats and shard formats that cannot carry the tensor columns."""
        tensors = (*self.arrays, *self.images, *self.texts)
        check(
            get_format(self.format).any_columns
            or (not tensors and bool(self.numeric or self.categorical)),
            "etl.format",
            f"{self.format} shards hold only key, a features vector and label: use "
            f"{DEFAULT_FORMAT} for array / image / text columns (declared: {list(tensors)}) and for "
            "data sets without numeric or categorical features",
        )
        text = self.input.format in ("csv", "json")
        for name in self.images:
            check(
                not (text and self.dtype(name) == "binary"),
                f"etl.schema.{name}",
                f"a {self.input.format} input holds image paths: declare it string",
            )
        if self.input.format == "image_folder":
            expected = {self.key, self.label, *self.images}
            check(
                len(self.images) == 1 and set(self.schema) == expected,
                "etl.input.format",
                "image_folder makes three columns: declare exactly etl.key (string), "
                "etl.label and one etl.images column (binary) in etl.schema, and no other",
            )
            image = next(iter(self.images))
            check(self.dtype(image) == "binary", f"etl.schema.{image}", "must be binary")
            check(self.dtype(self.key) == "string", f"etl.schema.{self.key}", "must be string")

    @property
    def tensor_columns(self) -> tuple[str, ...]:
        """The array, image and text columns, in ``etl.schema`` order (their shard order)."""
        return tuple(
            c for c in self.schema if c in self.arrays or c in self.images or c in self.texts
        )

    @property
    def has_tabular(self) -> bool:
        """True when there are numeric or categorical columns (a ``features`` vector)."""
        return bool(self.numeric or self.categorical)

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
