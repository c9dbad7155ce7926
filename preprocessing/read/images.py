"""Image columns on the Spark side: the ``image_folder`` input and decoding in the executors.

:func:`read_image_folder` turns the driver's ``pyarrow.fs`` listing of a tree
``<path>/<class>/<file>`` (:mod:`preprocessing.read.listing`, the fingerprint's too: any
local, HDFS, S3 or GCS URI; files whose names start with ``.`` or ``_`` are hidden, as to
Spark's file sources) into one row per file: the key column holds the file's URI, the label
column the name of its parent folder (Spark SQL on the path, no per-file call), and the image
column the URI too — the decoder reads each file itself with ``pyarrow.fs`` in the Python
worker. Spark's ``binaryFile`` source, which this replaced, cost about 2 ms per file in the
JVM (open, stat, row) before any pixel was decoded and sent every file's bytes to the Python
worker and back, and its scans skip zero-byte files, which are rows here (quarantined as
``image_invalid``); a file deleted after the listing is quarantined as ``image_unreadable``.
A quarantined row keeps the file's URI in the image column (its bytes are in the file). The
listing's totals size the partitions: one per :data:`PARTITION_BYTES` of files and one per
:data:`PARTITION_FILES` files, rounded up to a multiple of the task slots (whole rounds of
decoding on every core).

:func:`decode_images` decodes every image column of a DataFrame with Pillow in
``mapInArrow`` (Arrow batches, no pandas, no per-row UDF): for each column ``c`` it adds
``_img_<c>`` (the uint8 ``[H, W, C]`` pixels as ``binary``), ``_isum_<c>`` (per-channel integer
sums of ``x`` and of ``x²``, for the train statistics) and ``_ierr_<c>`` (the reason of
a bad image, :data:`~preprocessing.read.imagedecode.IMAGE_REASONS`). The partitioning and
row order of the input are kept (the shard plan counts rows per input partition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig
from preprocessing.read.imagedecode import ImageSpec, decode_column
from preprocessing.read.listing import InputFile

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
        decode=img.decode,
    )


def read_image_folder(
    spark: SparkSession, cfg: EtlConfig, files: Sequence[InputFile], source: str, corrupt: str
) -> DataFrame:
    """One row per file of ``files``: key (URI), label (parent folder), image (the URI to read).

    ``files`` is the input's listing (:func:`~preprocessing.read.listing.list_input_files`);
    the decoder reads each file itself (see the module docstring).
    """
    image = next(iter(cfg.images))
    cores = default_parallelism(spark)
    size = sum(f.size for f in files)
    parts = max(cores, -(-size // PARTITION_BYTES), -(-len(files) // PARTITION_FILES))
    paths = spark.createDataFrame([(f.path,) for f in files], "path string")
    paths = paths.repartition(-(-parts // cores) * cores)  # whole rounds of tasks on every core
    return paths.select(
        F.col("path").alias(cfg.key),
        F.element_at(F.split(F.col("path"), "/"), -2).alias(cfg.label),
        F.col("path").alias(image),
        F.col("path").alias(source),
        F.lit(None).cast("string").alias(corrupt),
    )


def default_parallelism(spark: SparkSession) -> int:
    """The session's default parallelism (task slots), also under Spark Connect."""
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no SparkContext: ask a job how many slices it got
        n = spark.range(0, 1 << 16).select(F.max(F.spark_partition_id())).first()
        return 1 + int(n[0]) if n is not None and n[0] is not None else 1


def _decoder(
    specs: Mapping[str, ImageSpec], sources: Mapping[str, str], keep: str | None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    binary = [sources[c] for c in specs]

    def decode(batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays, names = list(batch.columns), list(batch.schema.names)
        all_ok = pa.array(np.ones(batch.num_rows, bool))
        for column, spec in specs.items():
            pixels, sums, errors = decode_column(batch.column(sources[column]), spec)
            all_ok = pc.and_kleene(all_ok, pixels.is_valid())
            arrays += [pixels, sums, errors]
            names += [image_pixels(column), image_sums(column), image_error(column)]
        if keep is not None:  # the encoded bytes of a row that will be good are not needed
            drop = pc.and_(all_ok, pc.invert(batch.column(keep)))
            for i, name in enumerate(names[: batch.num_columns]):
                if name in binary and pa.types.is_binary(arrays[i].type):
                    arrays[i] = pc.if_else(drop, pa.nulls(batch.num_rows, pa.binary()), arrays[i])
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def decode_all(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield decode(batch)

    return decode_all


def decode_images(
    df: DataFrame, cfg: EtlConfig, sources: Mapping[str, str], keep: str | None = None
) -> DataFrame:
    """``df`` + the decoded columns of every ``etl.images`` column (see the module docstring).

    ``sources[c]`` is the column of ``df`` holding image ``c``'s path (string) or bytes
    (binary); a null there gives null pixels and no reason (the caller's missing check).
    ``keep`` names a boolean column of ``df``: where it is false and every image decoded, the
    binary sources come back null (the row will be good, its encoded bytes are not needed, and
    they need not travel back from the Python worker).
    """
    specs = {c: image_spec(cfg, c) for c in cfg.images if c in sources}
    fields = list(df.schema.fields)
    for c in specs:
        fields += [
            T.StructField(image_pixels(c), T.BinaryType(), True),
            T.StructField(image_sums(c), T.ArrayType(T.LongType(), True), True),
            T.StructField(image_error(c), T.StringType(), True),
        ]
    return df.mapInArrow(_decoder(specs, dict(sources), keep), T.StructType(fields))
