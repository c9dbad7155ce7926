"""TFRecord shards of ``tf.train.Example`` records, written and read without TensorFlow.

Framing (TensorFlow's ``TFRecordWriter``): every record is ``uint64 length`` (little-endian),
``uint32 masked_crc32c(length bytes)``, ``data``, ``uint32 masked_crc32c(data)``, where
``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)``. No compression.

Records are ``tf.train.Example`` protobufs with one feature per shard column: ``key``
(int64_list, or bytes_list with the UTF-8 string key), ``label`` (int64_list with the class
code, or float_list with the regression target), and each tensor column (``features``, arrays:
float_list of its values in row-major order; images and other uint8 tensors: one bytes_list
value of their raw bytes; integer tensors such as token ids: int64_list), encoded and decoded
by hand in :mod:`pipeline.data.formats._example` (the tabular layout, with a fast path) and
:mod:`pipeline.data.formats._template` (any columns); CRC32C is computed by
:mod:`pipeline.data.formats._crc32c`. Both are vectorised with numpy over many records at
once (no C extension); their public names are re-exported here.

Shards have no random access, so the reader works on *row groups*: runs of
``row_group_rows`` records (the Parquet writer's row groups have the same sizes), located by
a :class:`ShardIndex` of byte offsets built by one sequential scan of the file.
:class:`TFRecordFormat` is this format's entry in :mod:`pipeline.data.formats`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.data.columns import ColumnSpec
from pipeline.data.formats._crc32c import (
    crc32c,
    crc32c_many,
    mask_crc,
    masked_crc32c,
    windows,
)
from pipeline.data.formats._example import (
    Feature,
    Seg,
    assemble,
    decode_example,
    decode_layout,
    decode_same_length,
    encode_columns,
    encode_payload,
    matrix,
)
from pipeline.data.formats._template import decode_columns
from pipeline.data.formats.base import RowGroupIndex, ShardFormat, ShardWriter, WrittenShard
from pipeline.data.shardset import FEATURES_COLUMN, LABEL_COLUMN, ShardSetError

__all__ = [
    "Feature",
    "RowGroup",
    "ShardIndex",
    "TFRecordError",
    "TFRecordFormat",
    "TFRecordShardWriter",
    "crc32c",
    "crc32c_many",
    "decode_example",
    "encode_examples",
    "index_shard",
    "mask_crc",
    "masked_crc32c",
    "read_columns",
    "read_records",
    "read_row_group",
]

_HEADER: Final = 12  # length (8) + masked CRC of the length (4)
_FOOTER: Final = 4  # masked CRC of the data
_U64: Final = struct.Struct("<Q")
_CHUNK_BYTES: Final = 1 << 21  # bytes of records handled per vectorised step (bounds temporaries)
_SCAN_BYTES: Final = 8 << 20  # read size of the index scan
_EMPTY_I64: Final = np.zeros(0, np.int64)


class TFRecordError(ShardSetError):
    """A TFRecord file is truncated, fails a CRC check, or holds an unexpected record."""


# -- framing on write -------------------------------------------------------------------------
def _frame(payload: list[Seg], n: int) -> np.ndarray:
    """TFRecord framing around each record's ``payload`` segments."""
    size = np.sum([s.lengths for s in payload], axis=0, dtype=np.int64)
    length = size.astype("<u8").view(np.uint8).reshape(n, 8)
    length_crc = mask_crc(crc32c_many(length.reshape(-1), np.arange(n) * 8, np.full(n, 8)))
    segs = [matrix(length), matrix(length_crc.astype("<u4").view(np.uint8).reshape(n, 4))]
    out, starts = assemble([*segs, *payload, matrix(np.zeros((n, _FOOTER), np.uint8))])
    data = starts + _HEADER
    data_crc = mask_crc(crc32c_many(out, data, size)).astype("<u4").view(np.uint8)
    out[((data + size)[:, None] + np.arange(_FOOTER)).reshape(-1)] = data_crc
    return out


def encode_examples(keys: pa.Array | np.ndarray, features: np.ndarray, labels: np.ndarray) -> bytes:
    """TFRecord bytes (framed) of one ``tf.train.Example`` per row.

    ``features`` is ``[N, D]`` (stored as float32), ``labels`` ``[N]``: integers become an
    int64_list (class codes), floats a float_list; ``keys`` integers (int64_list) or an Arrow
    string array (bytes_list, UTF-8).
    """
    feats = np.ascontiguousarray(features, dtype="<f4")
    if feats.ndim != 2 or feats.shape[1] < 1:
        raise ValueError(f"features must be a [N, D] array with D >= 1, got shape {feats.shape}")
    n = len(feats)
    if len(labels) != n or len(keys) != n:
        raise ValueError(f"{n} feature rows but {len(labels)} labels and {len(keys)} keys")
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"labels must be integers or floats, got dtype {labels.dtype}")
    step = max(1, _CHUNK_BYTES // (feats.shape[1] * 4 + 64))
    parts = [
        _encode_chunk(keys[a : a + step], feats[a : a + step], labels[a : a + step])
        for a in range(0, n, step)
    ]
    return b"".join(p.tobytes() for p in parts)


def _encode_chunk(keys: pa.Array | np.ndarray, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return _frame(encode_payload(keys, feats, labels), len(feats))


# -- framing on read --------------------------------------------------------------------------
def _walk(buf: np.ndarray) -> tuple[np.ndarray, int]:
    """Starts of the complete records in ``buf``, and where the rest begins.

    Records of one size mostly follow each other (same key and label widths), so after a
    record the next ``run`` are assumed to have its size and their lengths checked at once;
    the walk goes on from the first that differs. After a short run it steps one record at
    a time for a while (string keys of varied lengths).
    """
    view, unpack, limit = memoryview(buf.data), _U64.unpack_from, len(buf)
    parts: list[np.ndarray] = []
    singles: list[int] = []
    pos, run, cool = 0, 16, 0
    while pos + _HEADER <= limit:
        (n,) = unpack(view, pos)
        size = _HEADER + n + _FOOTER
        if pos + size > limit:
            break
        k = min(run, (limit - pos) // size)
        if cool or k < 4:
            singles.append(pos)
            pos, cool = pos + size, max(cool - 1, 0)
            continue
        cand = pos + size * np.arange(k, dtype=np.int64)
        same = windows(buf, cand, 8).view("<u8").reshape(-1) == n
        m = k if same.all() else int(np.argmin(same))  # cand[0] is pos itself: m >= 1
        parts += [np.array(singles, np.int64), cand[:m]]
        singles, pos = [], pos + m * size
        run, cool = (min(2 * run, 1 << 16), 0) if m == k else (16, 0 if m >= 4 else 32)
    parts.append(np.array(singles, np.int64))
    return np.concatenate(parts), pos


def _u32_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return windows(buf, pos, 4).view("<u4").reshape(-1)


def _check_lengths(buf: np.ndarray, starts: np.ndarray, where: str, first: int) -> np.ndarray:
    """Verify the length CRCs of records at ``starts``; returns their data lengths."""
    if not len(starts):
        return _EMPTY_I64
    length = windows(buf, starts, 8).reshape(-1)
    computed = mask_crc(crc32c_many(length, np.arange(len(starts)) * 8, np.full(len(starts), 8)))
    bad = np.flatnonzero(computed != _u32_at(buf, starts + 8))
    if bad.size:
        raise TFRecordError(
            f"{where}: record {first + int(bad[0])}: the CRC of its length field does not match "
            "(corrupt, or not a TFRecord file)"
        )
    return length.view("<u8").astype(np.int64)


def _check_data(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, where: str, first: int
) -> None:
    data = starts + _HEADER
    computed = mask_crc(crc32c_many(buf, data, lengths))
    stored = _u32_at(buf, data + lengths)
    bad = np.flatnonzero(computed != stored)
    if bad.size:
        i = int(bad[0])
        raise TFRecordError(
            f"{where}: record {first + i}: data CRC32C mismatch (stored {int(stored[i]):#010x}, "
            f"computed {int(computed[i]):#010x}): the record is corrupt"
        )


def _scan(
    buf: np.ndarray, where: str, first: int, *, final: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Records in ``buf`` with verified length CRCs: (starts, data lengths, bytes used).

    Unless ``final``, an incomplete record at the end is left for the caller to complete
    (its length CRC is checked first, so a corrupt length is not mistaken for a long record).
    """
    starts, used = _walk(buf)
    lengths = _check_lengths(buf, starts, where, first)
    rest = len(buf) - used
    if rest >= _HEADER:
        _check_lengths(buf, np.array([used], np.int64), where, first + len(starts))
    if final and rest:
        part = "length" if rest < _HEADER else "data"
        raise TFRecordError(
            f"{where}: truncated: record {first + len(starts)} is cut off in its {part} "
            f"({rest} bytes at the end of the file)"
        )
    return starts, lengths, used


def read_records(data: bytes | memoryview | np.ndarray, *, where: str = "<bytes>") -> list[bytes]:
    """The records of a whole TFRecord file, every CRC verified; errors name ``where``."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    starts, lengths, _ = _scan(buf, where, 0, final=True)
    _check_data(buf, starts, lengths, where, 0)
    return [
        buf[s + _HEADER : s + _HEADER + n].tobytes() for s, n in zip(starts, lengths, strict=True)
    ]


# -- the shard index ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RowGroup:
    """Records ``[first_row, first_row + num_rows)`` of a shard: ``nbytes`` bytes at ``offset``."""

    first_row: int
    num_rows: int
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardIndex:
    """Row groups of a TFRecord shard (the part of Parquet's file metadata the reader uses)."""

    num_rows: int
    row_groups: tuple[RowGroup, ...]

    @property
    def num_row_groups(self) -> int:
        """How many row groups."""
        return len(self.row_groups)

    def row_group(self, i: int) -> RowGroup:
        """Row group ``i``."""
        return self.row_groups[i]


def _row_groups(offsets: list[int], rows: int, size: int, group: int) -> tuple[RowGroup, ...]:
    ends = [*offsets[1:], size][: len(offsets)]
    return tuple(
        RowGroup(i * group, min(group, rows - i * group), a, b - a)
        for i, (a, b) in enumerate(zip(offsets, ends, strict=True))
    )


def index_shard(
    fs: pafs.FileSystem, path: str, row_group_rows: int, *, where: str = ""
) -> ShardIndex:
    """Scan a TFRecord file once (lengths and their CRCs) into row groups of ``row_group_rows``."""
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    where = where or path
    offsets: list[int] = []
    rows = base = 0
    pending = np.zeros(0, np.uint8)
    with fs.open_input_stream(path) as f:
        while True:
            need = _SCAN_BYTES
            if len(pending) >= _HEADER:  # a record longer than one read
                need = max(need, int(pending[:8].view("<u8")[0]) + _HEADER + _FOOTER)
            chunk = np.frombuffer(f.read(need), np.uint8)
            buf = np.concatenate([pending, chunk]) if len(pending) else chunk
            starts, _, used = _scan(buf, where, rows, final=not len(chunk))
            firsts = np.flatnonzero((rows + np.arange(len(starts))) % row_group_rows == 0)
            offsets += (base + starts[firsts]).tolist()
            rows, base, pending = rows + len(starts), base + used, buf[used:]
            if not len(chunk):
                return ShardIndex(rows, _row_groups(offsets, rows, base, row_group_rows))


# -- decoding ---------------------------------------------------------------------------------
def _decode_one(
    record: bytes, dim: int, int_label: bool, where: str
) -> tuple[np.ndarray, np.ndarray]:
    try:
        example = decode_example(record)
    except ValueError as e:
        raise TFRecordError(f"{where}: not a valid tf.train.Example: {e}") from e
    want = "int64_list" if int_label else "float_list"
    for name, kind, count in ((FEATURES_COLUMN, "float_list", dim), (LABEL_COLUMN, want, 1)):
        got = example.get(name)
        if got is None:
            raise TFRecordError(f"{where}: no feature {name!r} (has: {sorted(example)})")
        if got.kind != kind or len(got.values) != count:
            raise TFRecordError(
                f"{where}: feature {name!r} is a {got.kind} of {len(got.values)} values; "
                f"expected a {kind} of {count}"
            )
    return np.asarray(example[FEATURES_COLUMN].values), np.asarray(example[LABEL_COLUMN].values)


def _decode(
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    dim: int,
    label_dtype: np.dtype[Any],
    where: str,
    first: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the framed records at ``starts`` (any valid Example encoding)."""
    int_label = label_dtype.kind in "iu"
    data = starts + _HEADER
    n = len(starts)
    ok, feats = np.zeros(n, bool), np.zeros((n, dim), np.float32)
    labels = np.zeros(n, np.int64 if int_label else np.float32)
    order = np.argsort(lengths, kind="stable")
    for run in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        if len(run) >= 64:  # most records: one length, one structure
            ok[run], feats[run], labels[run] = decode_same_length(
                buf, data[run], int(lengths[run[0]]), dim, int_label
            )
    rest = np.flatnonzero(~ok)
    if rest.size:
        ok[rest], feats[rest], labels[rest] = decode_layout(
            buf, data[rest], data[rest] + lengths[rest], dim, int_label
        )
    for i in np.flatnonzero(~ok):  # another writer's encoding: the general parser decides
        record = buf[data[i] : data[i] + lengths[i]].tobytes()
        f, lab = _decode_one(record, dim, int_label, f"{where}: record {first + i}")
        feats[i], labels[i] = f, lab[0]
    return feats, labels.astype(label_dtype, copy=False)


def read_row_group(
    fs: pafs.FileSystem,
    path: str,
    index: ShardIndex,
    i: int,
    *,
    dim: int,
    label_dtype: np.dtype[Any],
    where: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32 ``[n, dim]``) and labels (``label_dtype``) of row group ``i``.

    Every CRC is verified; errors name ``where`` (default ``path``) and the record's index in
    the file. Labels are an int64_list for an integer ``label_dtype``, else a float_list.
    """
    where = where or path
    buf, starts, lengths = _group_records(fs, path, index, i, where)
    first_row = index.row_group(i).first_row
    parts = [(np.zeros((0, dim), np.float32), np.zeros(0, label_dtype))]
    step = max(1, _CHUNK_BYTES // (4 * dim + 64))
    for a in range(0, len(starts), step):
        rows, first = slice(a, a + step), first_row + a
        parts.append(_decode(buf, starts[rows], lengths[rows], dim, label_dtype, where, first))
    if len(parts) == 2:
        return parts[1]
    return np.concatenate([f for f, _ in parts]), np.concatenate([lab for _, lab in parts])


def _group_records(
    fs: pafs.FileSystem, path: str, index: ShardIndex, i: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row group ``i``'s bytes (with slack), its record starts and data lengths, CRCs checked."""
    group = index.row_group(i)
    buf = _read_group(fs, path, group, f"{where}: row group {i}")
    raw = buf[: group.nbytes]  # the rest is slack for the decoder's varint windows
    starts, lengths, _ = _scan(raw, where, group.first_row, final=True)
    if len(starts) != group.num_rows:
        raise TFRecordError(
            f"{where}: row group {i} holds {len(starts)} records, its index says {group.num_rows} "
            "(the file changed after it was indexed)"
        )
    _check_data(raw, starts, lengths, where, group.first_row)
    return buf, starts, lengths


def read_columns(
    fs: pafs.FileSystem,
    path: str,
    index: ShardIndex,
    i: int,
    *,
    columns: Sequence[ColumnSpec],
    label_dtype: np.dtype[Any],
    where: str = "",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tensor ``columns`` (each ``[n, *shape]``, its dtype) and labels of row group ``i``.

    Every CRC is verified; errors name ``where`` (default ``path``) and the record.
    """
    where = where or path
    buf, starts, lengths = _group_records(fs, path, index, i, where)
    first_row = index.row_group(i).first_row
    row_bytes = sum(4 * c.size for c in columns) + 64
    step = max(1, _CHUNK_BYTES // row_bytes)
    parts = [
        decode_columns(
            buf,
            starts[a : a + step] + _HEADER,
            lengths[a : a + step],
            columns,
            label_dtype,
            where=where,
            first=first_row + a,
        )
        for a in range(0, len(starts), step)
    ]
    if not parts:
        empty = {c.name: np.zeros((0, *c.shape), c.numpy_dtype) for c in columns}
        return empty, np.zeros(0, label_dtype)
    if len(parts) == 1:
        return parts[0]
    tensors = {c.name: np.concatenate([p[0][c.name] for p in parts]) for c in columns}
    return tensors, np.concatenate([p[1] for p in parts])


def _read_group(fs: pafs.FileSystem, path: str, group: RowGroup, where: str) -> np.ndarray:
    """The bytes of a row group followed by 16 zero bytes."""
    buf = np.zeros(group.nbytes + 16, np.uint8)
    try:
        with fs.open_input_file(path) as f:
            f.seek(group.offset)
            got = f.readinto(buf.data[: group.nbytes])
    except (OSError, pa.ArrowException) as e:
        raise TFRecordError(f"{where}: reading failed: {e}") from e
    if got != group.nbytes:
        raise TFRecordError(f"{where}: truncated: {got} of its {group.nbytes} bytes are there")
    return buf


# -- the format -------------------------------------------------------------------------------
class TFRecordShardWriter(ShardWriter):
    """One open TFRecord shard: each batch is encoded and written through a hashing stream."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.path = path
        self.rows = 0
        self._raw = fs.open_output_stream(path)
        self._sink = storage.HashingWriter(self._raw)

    def add(self, batch: pa.RecordBatch) -> None:
        """Encode and write the rows of ``batch`` (every column of the shard schema)."""
        n = batch.num_rows
        row_bytes = sum(
            4 * (f.type.list_size if pa.types.is_fixed_size_list(f.type) else 1)
            for f in batch.schema
        )
        step = max(1, _CHUNK_BYTES // (row_bytes + 64))
        for a in range(0, n, step):
            part = batch.slice(a, step)
            self._sink.write(_frame(encode_columns(part), part.num_rows).tobytes())
        self.rows += n

    def close(self) -> WrittenShard:
        """Close the file (TFRecord has no footer)."""
        self._raw.close()
        return WrittenShard(self.rows, self._sink.size, self._sink.sha256)


class TFRecordFormat(ShardFormat):
    """TFRecord files of ``tf.train.Example`` records (``file_format: tfrecord``)."""

    name: ClassVar[str] = "tfrecord"
    suffix: ClassVar[str] = ".tfrecord"
    index_source: ClassVar[str] = "TFRecord file"
    tensor_layout: ClassVar[str] = "list"  # the Example encoder needs each value's dtype

    def open_writer(
        self, fs: pafs.FileSystem, path: str, schema: pa.Schema, row_group_rows: int
    ) -> TFRecordShardWriter:
        """A writer of records; row groups exist only on read (``row_group_rows`` is unused)."""
        return TFRecordShardWriter(fs, path)

    def index(
        self, fs: pafs.FileSystem, path: str, row_group_rows: int, *, where: str
    ) -> ShardIndex:
        """One scan of the file (length CRCs checked) into runs of ``row_group_rows`` records."""
        return index_shard(fs, path, row_group_rows, where=where)

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
        """Decode row group ``i``, every CRC verified (see :func:`read_row_group`)."""
        if not isinstance(index, ShardIndex):
            raise TypeError(f"a TFRecord shard needs a ShardIndex, got {type(index).__name__}")
        if features.name != FEATURES_COLUMN:
            columns, labels = self.read_columns(
                fs, path, index, i, columns=[features], label_dtype=label_dtype, where=where
            )
            return columns[features.name], labels
        feats, labels = read_row_group(
            fs, path, index, i, dim=features.size, label_dtype=label_dtype, where=where
        )
        return feats.reshape(len(feats), *features.shape), labels

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
        """Decode ``columns`` of row group ``i`` at once (the tabular layout: its fast path)."""
        if not isinstance(index, ShardIndex):
            raise TypeError(f"a TFRecord shard needs a ShardIndex, got {type(index).__name__}")
        if [c.name for c in columns] == [FEATURES_COLUMN]:
            feats, labels = self.read_row_group(
                fs, path, index, i, features=columns[0], label_dtype=label_dtype, where=where
            )
            return {FEATURES_COLUMN: feats}, labels
        try:
            return read_columns(
                fs, path, index, i, columns=columns, label_dtype=label_dtype, where=where
            )
        except TFRecordError:
            raise
        except ShardSetError as e:
            raise TFRecordError(str(e)) from e
