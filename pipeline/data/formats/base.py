"""The interface every shard file format implements (see :mod:`pipeline.data.formats`).

A format is a stateless object with three sides:

* the **writer** the ETL's executors use: :meth:`ShardFormat.open_writer` returns a
  :class:`ShardWriter` that takes the shard's rows as Arrow record batches (already in the
  shard schema, :func:`pipeline.data.arrays.to_shard_batch`) and writes them through a
  :class:`pipeline.core.storage.HashingWriter`, so that :meth:`ShardWriter.close` reports the
  rows, bytes and sha256 the manifest records without reading the file back;
* the **reader** side :class:`pipeline.data.reader.ShardReader` needs:
  :meth:`ShardFormat.index` cuts a shard into row groups with their row counts (a Parquet
  footer; a TFRecord index of byte offsets), and :meth:`ShardFormat.read_columns` decodes
  one row group into the model's input columns (each ``[n, *shape]`` in its stored dtype)
  and the labels, checking them against the manifest (errors name the file and, where the
  format has them, the record); :meth:`ShardFormat.read_row_group` is the same for one
  column;
* **row counting** for the driver's preflight: :meth:`ShardFormat.count_rows`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.columns import ColumnSpec

__all__ = ["RowGroupIndex", "ShardFormat", "ShardWriter", "WrittenShard"]


class WrittenShard(NamedTuple):
    """What a closed writer reports for the manifest."""

    rows: int
    bytes: int
    sha256: str


class _RowGroupInfo(Protocol):
    @property
    def num_rows(self) -> int: ...


class RowGroupIndex(Protocol):
    """Row groups of one shard: what :meth:`ShardFormat.index` returns.

    A Parquet footer's ``FileMetaData`` has this shape; TFRecord builds a ``ShardIndex``.
    """

    @property
    def num_rows(self) -> int:
        """Rows in the shard."""

    @property
    def num_row_groups(self) -> int:
        """How many row groups."""

    def row_group(self, i: int) -> _RowGroupInfo:
        """Row group ``i`` (its ``num_rows``)."""


class ShardWriter(ABC):
    """One shard file being written: :meth:`add` batches in order, then :meth:`close` once."""

    path: str
    rows: int

    @abstractmethod
    def add(self, batch: pa.RecordBatch) -> None:
        """Append ``batch`` (in the shard schema) to the shard."""

    @abstractmethod
    def close(self) -> WrittenShard:
        """Finish the file; its rows, size in bytes and sha256."""


class ShardFormat(ABC):
    """A shard file format: writer, reader and row counting (one instance per registry key)."""

    name: ClassVar[str]
    """Registry key, recorded as the manifest's ``file_format``."""
    suffix: ClassVar[str]
    """File name suffix of a shard, with the dot (``.parquet``)."""
    index_source: ClassVar[str]
    """What :meth:`index` reads, for messages (``Parquet footer``)."""
    tensor_layout: ClassVar[str] = "binary"
    """The Arrow layout of tensor columns the writer takes (:data:`pipeline.data.columns.TENSOR_LAYOUTS`):
    the shard schema is ``arrow_schema(columns, layout=fmt.tensor_layout)``."""
    any_columns: ClassVar[bool] = True
    """Whether a shard may hold any tensor columns (arrays, images), not only the fixed
    ``key`` / ``features`` / ``label`` layout."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @abstractmethod
    def open_writer(
        self, fs: pafs.FileSystem, path: str, schema: pa.Schema, row_group_rows: int
    ) -> ShardWriter:
        """A writer of a new shard at ``path`` with row groups of ``row_group_rows`` rows."""

    def write(
        self,
        fs: pafs.FileSystem,
        path: str,
        data: pa.Table | Iterable[pa.RecordBatch],
        row_group_rows: int,
        schema: pa.Schema | None = None,
    ) -> WrittenShard:
        """Write one whole shard (a table, or batches in ``schema``) and report it."""
        if isinstance(data, pa.Table):
            schema, data = data.schema, data.to_batches()
        if schema is None:
            raise ValueError("writing record batches needs their schema")
        writer = self.open_writer(fs, path, schema, row_group_rows)
        for batch in data:
            writer.add(batch)
        return writer.close()

    @abstractmethod
    def index(
        self, fs: pafs.FileSystem, path: str, row_group_rows: int, *, where: str
    ) -> RowGroupIndex:
        """The row groups of a shard; raises OSError, ``pyarrow`` errors or ShardSetError.

        ``row_group_rows`` is the manifest's, for formats without row groups of their own.
        """

    @abstractmethod
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
        """Features (``[n, *features.shape]``, its dtype) and labels of row group ``i``.

        ``index`` is what :meth:`index` returned for this file. Raises ShardSetError naming
        ``where`` (and the record, where the format can tell).
        """

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
        """The tensor ``columns`` (by name, ``[n, *shape]``) and the labels of row group ``i``.

        This default reads the row group once per column (:meth:`read_row_group`); formats
        that can decode several columns at once override it.
        """
        out: dict[str, np.ndarray] = {}
        labels = np.zeros(0, label_dtype)
        for spec in columns:
            out[spec.name], labels = self.read_row_group(
                fs, path, index, i, features=spec, label_dtype=label_dtype, where=where
            )
        return out, labels

    def count_rows(self, fs: pafs.FileSystem, path: str, *, where: str) -> int:
        """Rows in a shard, from its metadata or a scan (checks what that reads)."""
        return int(self.index(fs, path, 1 << 30, where=where).num_rows)
