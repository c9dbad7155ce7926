"""Image columns on the Spark side: the ``image_folder`` input and decoding in the executors.

:func:`read_image_folder` lists a tree ``<path>/<class>/<file>`` with Spark's ``binaryFile``
source (so any Hadoop URI; files whose names start with ``.`` or ``_`` are hidden to Spark and
not read) and gives each file one row: the key column holds the file's URI, the label column
the name of its parent folder, the image column the bytes. Spark's file scans skip
zero-byte files; those are found in the listing (one ``listStatus`` per folder) and added as
rows with empty bytes, so that they are counted and quarantined (``image_invalid``). Spark
would give every small file a partition's worth of open cost (thousands of tiny tasks for a
folder of thumbnails); the listing's totals size the partitions instead: at least one per
core, one per :data:`PARTITION_BYTES` of files and one per :data:`PARTITION_FILES` files.

:func:`decode_images` decodes every image column of a DataFrame with Pillow in
``mapInArrow`` (Arrow batches, no pandas, no per-row UDF): for each column ``c`` it adds
``_img_<c>`` (the uint8 ``[H, W, C]`` pixels as ``binary``), ``_isum_<c>`` (per-channel sums
of ``x / 255`` and of its square, for the train statistics) and ``_ierr_<c>`` (the reason of
a bad image, :data:`~preprocessing.read.imagedecode.IMAGE_REASONS`). The partitioning and
row order of the input are kept (the shard plan counts rows per input partition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig
from preprocessing.read.imagedecode import ImageSpec, decode_column

__all__ = [
    "ARROW_BATCH_ROWS",
    "decode_images",
    "image_error",
    "image_pixels",
    "image_spec",
    "image_sums",
    "read_image_folder",
]

ARROW_BATCH_ROWS = "256"
"""``spark.sql.execution.arrow.maxRecordsPerBatch`` while the ETL runs with image columns:
a batch holds encoded files and decoded pixels, so it is kept small."""


PARTITION_BYTES = 64 << 20
"""Bytes of image files per input partition of an ``image_folder`` read (at most)."""
PARTITION_FILES = 20_000
"""Image files per input partition of an ``image_folder`` read (at most)."""


def image_pixels(column: str) -> str:
    """Name of the decoded pixels of image column ``column``."""
    return f"_img_{column}"


def image_sums(column: str) -> str:
    """Name of the per-row channel sums of image column ``column``."""
    return f"_isum_{column}"


def image_error(column: str) -> str:
    """Name of the decode reason of image column ``column``."""
    return f"_ierr_{column}"


def image_spec(cfg: EtlConfig, column: str) -> ImageSpec:
    """The decoder's spec of ``etl.images.<column>``."""
    img = cfg.images[column]
    return ImageSpec(
        height=img.size[0],
        width=img.size[1],
        channels=img.channels,
        resize=img.resize,
        resample=img.resample,
        max_pixels=img.max_pixels,
    )


def read_image_folder(spark: SparkSession, cfg: EtlConfig, source: str, corrupt: str) -> DataFrame:
    """One row per file under ``etl.input.path``: key (URI), label (folder), image (bytes)."""
    image = next(iter(cfg.images))
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .options(**dict(cfg.input.options))
        .load(cfg.input.path)
        .select("path", "content")
    )
    empty, count, size = _listing(spark, files.inputFiles())
    parts = max(spark.sparkContext.defaultParallelism, -(-size // PARTITION_BYTES))
    files = files.coalesce(max(parts, -(-count // PARTITION_FILES)))
    if empty:
        schema = "path string, content binary"
        files = files.unionByName(spark.createDataFrame([(p, b"") for p in empty], schema))
    return files.select(
        F.col("path").alias(cfg.key),
        F.element_at(F.split(F.col("path"), "/"), -2).alias(cfg.label),
        F.col("content").alias(image),
        F.col("path").alias(source),
        F.lit(None).cast("string").alias(corrupt),
    )


def _listing(spark: SparkSession, files: list[str]) -> tuple[list[str], int, int]:
    """The zero-byte files among ``files``, how many entries their folders hold and their bytes.

    One ``listStatus`` per folder and one JVM call per entry (its length; the path only for
    zero-byte ones). Paths are compared without scheme (``inputFiles()`` spells ``file:///x``,
    ``listStatus`` ``file:/x``) and returned as ``binaryFile`` spells them.
    """
    jvm = spark.sparkContext._jvm
    assert jvm is not None, "listing runs on the driver"
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    by_dir: dict[str, set[str]] = {}
    for f in files:
        by_dir.setdefault(f.rsplit("/", 1)[0], set()).add(unquote(urlparse(f).path))
    empty, count, size = [], 0, 0
    for parent, wanted in sorted(by_dir.items()):
        path = jvm.org.apache.hadoop.fs.Path(parent)
        for st in path.getFileSystem(conf).listStatus(path):
            length = int(st.getLen())
            count, size = count + 1, size + length
            if length == 0:
                name = str(st.getPath().toString())
                if unquote(urlparse(name).path) in wanted:
                    empty.append(name)
    return sorted(empty), count, size


def _decoder(
    specs: Mapping[str, ImageSpec], sources: Mapping[str, str]
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def decode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            arrays, names = list(batch.columns), list(batch.schema.names)
            for column, spec in specs.items():
                pixels, sums, errors = decode_column(batch.column(sources[column]), spec)
                arrays += [pixels, sums, errors]
                names += [image_pixels(column), image_sums(column), image_error(column)]
            yield pa.RecordBatch.from_arrays(arrays, names=names)

    return decode


def decode_images(df: DataFrame, cfg: EtlConfig, sources: Mapping[str, str]) -> DataFrame:
    """``df`` + the decoded columns of every ``etl.images`` column (see the module docstring).

    ``sources[c]`` is the column of ``df`` holding image ``c``'s path (string) or bytes
    (binary); a null there gives null pixels and no reason (the caller's missing check).
    """
    specs = {c: image_spec(cfg, c) for c in cfg.images}
    fields = list(df.schema.fields)
    for c in specs:
        fields += [
            T.StructField(image_pixels(c), T.BinaryType(), True),
            T.StructField(image_sums(c), T.ArrayType(T.DoubleType(), True), True),
            T.StructField(image_error(c), T.StringType(), True),
        ]
    return df.mapInArrow(_decoder(specs, dict(sources)), T.StructType(fields))
