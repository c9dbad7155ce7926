"""Parquet shards: the default format.

A shard is one Parquet file in the shard schema (``key``, ``features``, the other tensor
columns, ``label``; :func:`pipeline.data.columns.arrow_schema`), in row groups of the
manifest's ``row_group_rows`` rows, snappy-compressed. A tensor column is a flat
``FIXED_LEN_BYTE_ARRAY`` of the rows' little-endian bytes (``format_version`` 2), written
without dictionary encoding or statistics (neither helps a column of distinct multi-KB
values; the dictionary attempt only costs time and falls back), so a row group decodes
into one buffer that numpy views as ``[n, *shape]``. Version 1 files (``fixed_size_list``
columns) are read as before (:func:`pipeline.data.arrays.tensor_to_numpy`). The reader takes
row groups and the row count from the file's footer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.data.arrays import labels_to_numpy, tensor_to_numpy
from pipeline.data.columns import ColumnSpec
from pipeline.data.formats.base import RowGroupIndex, ShardFormat, ShardWriter, WrittenShard
from pipeline.data.shardset import LABEL_COLUMN, ShardSetError

__all__ = ["ParquetFormat", "ParquetShardWriter"]


class ParquetShardWriter(ShardWriter):
    """One open shard: buffers batches up to a row group, writes through a hashing stream."""

    def __init__(
        self, fs: pafs.FileSystem, path: str, schema: pa.Schema, row_group_rows: int
    ) -> None:
        self.path = path
        self._schema = schema
        self._rg = row_group_rows
        self._buf: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self._raw = fs.open_output_stream(path)
        self._sink = storage.HashingWriter(self._raw)
        scalars = [f.name for f in schema if not _is_tensor(f.type)]
        self._writer = pq.ParquetWriter(
            pa.PythonFile(self._sink, mode="w"),
            schema,
            use_dictionary=scalars,
            write_statistics=scalars,
        )

    def add(self, batch: pa.RecordBatch) -> None:
        """Buffer ``batch``; write every full row group."""
        self._buf.append(batch)
        self._buffered += batch.num_rows
        while self._buffered >= self._rg:
            self._flush(self._rg)

    def _flush(self, n: int) -> None:
        table = pa.Table.from_batches(self._buf, schema=self._schema)
        self._writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self._buf = rest.to_batches()
        self._buffered = rest.num_rows
        self.rows += n

    def close(self) -> WrittenShard:
        """Write the last (short) row group and the footer."""
        if self._buffered:
            self._flush(self._buffered)
        self._writer.close()
        self._raw.close()
        return WrittenShard(self.rows, self._sink.size, self._sink.sha256)


def _is_tensor(kind: pa.DataType) -> bool:
    return bool(pa.types.is_fixed_size_binary(kind) or pa.types.is_fixed_size_list(kind))


class ParquetFormat(ShardFormat):
    """Parquet files (``file_format: parquet``)."""

    name: ClassVar[str] = "parquet"
    suffix: ClassVar[str] = ".parquet"
    index_source: ClassVar[str] = "Parquet footer"

    def open_writer(
        self, fs: pafs.FileSystem, path: str, schema: pa.Schema, row_group_rows: int
    ) -> ParquetShardWriter:
        """A writer of row groups of ``row_group_rows`` rows (the last may be shorter)."""
        return ParquetShardWriter(fs, path, schema, row_group_rows)

    def index(
        self, fs: pafs.FileSystem, path: str, row_group_rows: int, *, where: str
    ) -> RowGroupIndex:
        """The file's footer (``pyarrow.parquet.FileMetaData``); ``row_group_rows`` is unused."""
        with fs.open_input_file(path) as f:
            metadata: RowGroupIndex = pq.read_metadata(f)
        return metadata

    def read_row_group(
        self,
        fs: pafs.FileSystem,
        path: str,
        index: RowGroupIndex,
        i: int,
        *,
        features: ColumnSpec,
        label_dtype: np.dtype[Any],
        where: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode row group ``i`` (opens its own file handle: runs in the read pool)."""
        columns, labels = self.read_columns(
            fs, path, index, i, columns=[features], label_dtype=label_dtype, where=where
        )
        return columns[features.name], labels

    def read_columns(
        self,
        fs: pafs.FileSystem,
        path: str,
        index: RowGroupIndex,
        i: int,
        *,
        columns: Sequence[ColumnSpec],
        label_dtype: np.dtype[Any],
        where: str,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Decode ``columns`` and the label of row group ``i`` in one read (own file handle)."""
        try:
            with fs.open_input_file(path) as source:
                # One thread per row group: the reader decodes several row groups at once
                # on its own pool; pyarrow's pool would only split a row group by column.
                table = pq.ParquetFile(source, metadata=index).read_row_group(
                    i, columns=[*(c.name for c in columns), LABEL_COLUMN], use_threads=False
                )
            out = {
                c.name: tensor_to_numpy(table.column(j), c, where=where)
                for j, c in enumerate(columns)
            }
            labels = labels_to_numpy(table.column(len(columns)), label_dtype, where=where)
        except ShardSetError:
            raise
        except Exception as e:
            raise ShardSetError(f"shard {where}: reading row group {i} failed: {e}") from e
        return out, labels

    def count_rows(self, fs: pafs.FileSystem, path: str, *, where: str) -> int:
        """The footer's row count."""
        with fs.open_input_file(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
