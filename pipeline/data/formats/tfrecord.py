"""TFRecord files of ``tf.train.Example`` records, written and read without TensorFlow.

Framing (TensorFlow's ``TFRecordWriter``): every record is ``uint64 length`` (little-endian),
``uint32 masked_crc32c(length bytes)``, ``data``, ``uint32 masked_crc32c(data)``, where
``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)``. No compression.

Records are ``tf.train.Example`` protobufs, encoded and decoded here by hand::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }   // entry: string key = 1; Feature value = 2
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

A shard record holds the features ``features`` (float_list of D floats), ``key``
(int64_list, or bytes_list with the UTF-8 string key) and ``label`` (int64_list with the
class code, or float_list with the regression target). Map entries are written in key
order, so a record is byte for byte what protobuf's deterministic serialization gives.

Speed without a C extension: everything is vectorised with numpy over many records at
once. CRC32C runs slicing-by-8 with four 16-bit tables over a matrix of records, one row
each: records of one length are viewed in place (their first ``length % 8`` bytes fed one
at a time); others are left-padded with zeros to a common width (leading zeros leave a CRC
with a zero initial state unchanged, and the usual ``0xffffffff`` initial state is the
same as inverting the first four data bytes). Encoding concatenates per-record byte segments
with one scatter per segment; decoding parses the fixed layout above for all records of a
row group at once, checking every tag and length, and falls back to a general protobuf
parser (:func:`decode_example`) for any record that does not follow it.

Shards have no random access, so the reader works on *row groups*: runs of
``row_group_rows`` records (the Parquet writer's row groups have the same sizes), located by
a :class:`ShardIndex` of byte offsets built by one sequential scan of the file.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.shardset import FEATURES_COLUMN, KEY_COLUMN, LABEL_COLUMN, ShardSetError

__all__ = [
    "Feature",
    "RowGroup",
    "ShardIndex",
    "TFRecordError",
    "crc32c",
    "crc32c_many",
    "decode_example",
    "encode_examples",
    "index_shard",
    "mask_crc",
    "masked_crc32c",
    "read_records",
    "read_row_group",
]

_POLY: Final = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MASK_DELTA: Final = 0xA282EAD8
_HEADER: Final = 12  # length (8) + masked CRC of the length (4)
_FOOTER: Final = 4  # masked CRC of the data
_U64: Final = struct.Struct("<Q")
_CHUNK_BYTES: Final = 1 << 21  # bytes of records handled per vectorised step (bounds temporaries)
_CRC_BYTES: Final = 8 << 20  # bytes of records per CRC matrix (wide rows keep numpy busy)
_SCAN_BYTES: Final = 8 << 20  # read size of the index scan
_ARANGE10: Final = np.arange(10, dtype=np.int64)
_SHIFTS: Final = (np.arange(10, dtype=np.uint64) * np.uint64(7)).astype(np.uint64)
_EMPTY_I64: Final = np.zeros(0, np.int64)
# Wire tags (field << 3 | wire type) of the Feature kinds.
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 0x0A, 0x12, 0x1A
_KINDS: Final = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


class TFRecordError(ShardSetError):
    """A TFRecord file is truncated, fails a CRC check, or holds an unexpected record."""


# -- CRC32C -----------------------------------------------------------------------------------
@functools.cache
def _byte_tables() -> np.ndarray:
    """``t[k][b]``: CRC contribution of byte ``b`` followed by ``k`` zero bytes (k < 8)."""
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, (c >> 1) ^ np.uint32(_POLY), c >> 1).astype(np.uint32)
    t = np.empty((8, 256), np.uint32)
    t[0] = c
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


@functools.cache
def _pair_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Slicing-by-8 with 16-bit lookups: table ``j`` takes bytes ``2j, 2j+1`` of a step."""
    t, x = _byte_tables(), np.arange(1 << 16, dtype=np.uint32)
    u0, u1, u2, u3 = (t[7 - 2 * j][x & 0xFF] ^ t[6 - 2 * j][x >> 8] for j in range(4))
    return u0, u1, u2, u3


def _crc_rows(m: np.ndarray, crc: np.ndarray) -> np.ndarray:
    """CRC registers after feeding each row of ``m`` (uint8, width % 8 == 0) from ``crc``."""
    u0, u1, u2, u3 = _pair_tables()
    halves = np.ascontiguousarray(m.view("<u2").T)  # one row per 2-byte column, records along it
    for j in range(0, halves.shape[0], 4):
        lo = (crc & 0xFFFF).astype(np.uint16) ^ halves[j]
        hi = (crc >> 16).astype(np.uint16) ^ halves[j + 1]
        crc = u0[lo] ^ u1[hi] ^ u2[halves[j + 2]] ^ u3[halves[j + 3]]
    return crc


def _crc_bytewise(data: bytes | memoryview | np.ndarray) -> int:
    t0 = _byte_tables()[0]
    c = 0xFFFFFFFF
    for b in bytes(data):
        c = int(t0[(c ^ b) & 0xFF]) ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _ragged_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``lengths`` bytes laid end to end: (row of each byte, its offset in the row)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(len(rows), dtype=np.int64) - np.repeat(_excl_cumsum(lengths), lengths)


def _windows(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """``buf[p : p + width]`` for every ``p`` (a copy); ``p`` is clipped into the buffer."""
    if len(buf) < width:
        buf = np.concatenate([buf, np.zeros(width - len(buf), np.uint8)])
    view = np.lib.stride_tricks.sliding_window_view(buf, width)
    return view[np.minimum(np.maximum(pos, 0), len(buf) - width)]


def _crc_group(buf: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of records of >= 4 bytes ending at ``ends``, as rows of a zero-left-padded matrix.

    ``buf`` holds at least the matrix width of bytes before every record.
    """
    width = -(-int(lengths.max()) // 8) * 8
    pad = width - lengths
    m = _windows(buf, ends - width, width)
    m *= np.arange(width) >= pad[:, None]
    rows = np.arange(len(lengths))
    for k in range(4):  # the initial state 0xffffffff = inverting the first four data bytes
        m[rows, pad + k] ^= 0xFF
    return _crc_rows(m, np.zeros(len(lengths), np.uint32)) ^ np.uint32(0xFFFFFFFF)


def _crc_equal(buf: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """CRC32C of records of one ``length``: the first ``length % 8`` bytes go byte by byte."""
    n, step = len(starts), int(starts[1] - starts[0]) if len(starts) > 1 else 0
    if n > 1 and step > 0 and (np.diff(starts) == step).all():  # evenly spaced: a strided view
        m = np.lib.stride_tricks.as_strided(buf[starts[0] :], (n, length), (step, 1))
    else:
        m = _windows(buf, starts, length)
    t0, head = _byte_tables()[0], length % 8
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    for j in range(head):
        crc = t0[(crc ^ m[:, j]) & 0xFF] ^ (crc >> 8)
    return _crc_rows(m[:, head:], crc) ^ np.uint32(0xFFFFFFFF)


def _groups(lengths: np.ndarray) -> list[slice]:
    """Runs of (sorted) ``lengths`` whose padded matrix stays under the chunk budget."""
    widths = (lengths + 7) // 8 * 8
    out, a, n = [], 0, len(lengths)
    while a < n:
        # at most twice the narrowest width (bounds the padding), and the byte budget
        b = int(np.searchsorted(widths, 2 * widths[a], side="right"))
        b = min(b, a + max(64, _CRC_BYTES // int(widths[b - 1])))
        out.append(slice(a, b))
        a = b
    return out


def crc32c_many(buf: np.ndarray | bytes, starts: Any, lengths: Any) -> np.ndarray:
    """CRC32C (uint32) of ``buf[starts[i] : starts[i] + lengths[i]]`` for every ``i``."""
    data = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    s = np.asarray(starts, np.int64).reshape(-1)
    n = np.asarray(lengths, np.int64).reshape(-1)
    if len(s) != len(n) or (
        len(n) and ((s < 0).any() or (n < 0).any() or (s + n).max() > len(data))
    ):
        raise ValueError(f"byte ranges must be {len(s)} pairs inside the {len(data)}-byte buffer")
    out = np.empty(len(n), np.uint32)
    for i in np.flatnonzero(n < 4):  # too short for the inverted-prefix identity
        out[i] = _crc_bytewise(data[s[i] : s[i] + n[i]])
    big = np.flatnonzero(n >= 4)
    if not big.size:
        return out
    order = big[np.argsort(n[big], kind="stable")]
    mixed = []
    for run in np.split(order, np.flatnonzero(np.diff(n[order])) + 1):
        if len(run) < 64:  # rare lengths share zero-padded matrices
            mixed.append(run)
            continue
        step = max(64, _CRC_BYTES // int(n[run[0]]))
        for a in range(0, len(run), step):
            out[run[a : a + step]] = _crc_equal(data, s[run[a : a + step]], int(n[run[0]]))
    order = np.concatenate(mixed) if mixed else order[:0]
    if not order.size:
        return out
    front = -(-int(n[order[-1]]) // 8) * 8  # zeros before the data: room for any row's padding
    padded = np.concatenate([np.zeros(front, np.uint8), data])
    for g in _groups(n[order]):
        rows = order[g]
        out[rows] = _crc_group(padded, front + s[rows] + n[rows], n[rows])
    return out


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC32C of one buffer (``crc32c(b"123456789") == 0xE3069283``)."""
    arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    return int(crc32c_many(arr.reshape(-1).view(np.uint8), [0], [arr.nbytes])[0])


def mask_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masking of CRCs (uint32 arrays)."""
    c = crc.astype(np.uint32)
    return (((c >> 15) | (c << 17)) + np.uint32(_MASK_DELTA)).astype(np.uint32)


def masked_crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """The masked CRC32C that TFRecord stores after a length and after the data."""
    return int(mask_crc(np.array([crc32c(data)], np.uint32))[0])


# -- varints ----------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_matrix(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints of uint64 (or two's-complement int64) values: bytes ``(n, 10)`` and lengths."""
    v = values.astype(np.int64, copy=False).view(np.uint64) if values.dtype.kind == "i" else values
    v = v.astype(np.uint64, copy=False)
    groups = ((v[:, None] >> _SHIFTS) & np.uint64(0x7F)).astype(np.uint8)
    lengths = 1 + ((v[:, None] >> _SHIFTS[1:]) != 0).sum(axis=1)
    groups |= np.where(_ARANGE10 < (lengths - 1)[:, None], 0x80, 0).astype(np.uint8)
    return groups, lengths.astype(np.int64)


def _read_varints(
    buf: np.ndarray, pos: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Varints at ``pos`` (each within ``end``): (uint64 values, position after, ok).

    ``buf`` must extend at least 10 bytes past every ``end`` (windows are clipped into it).
    """
    first = _byte_at(buf, pos)
    if not (first & 0x80).any():  # the common case: every value < 128, one byte each
        return first.astype(np.uint64), pos + 1, pos + 1 <= end
    win = _windows(buf, pos, 10)
    more = win >= 0x80
    length = np.argmin(more, axis=1) + 1
    ok = ~more.all(axis=1) & (pos + length <= end)
    width = int(length.max())
    parts = (win[:, :width] & 0x7F).astype(np.uint64) << _SHIFTS[:width]
    keep = _ARANGE10[:width] < length[:, None]
    value = np.bitwise_or.reduce(np.where(keep, parts, np.uint64(0)), axis=1)
    return value.astype(np.uint64), pos + length, ok


# -- encoding ---------------------------------------------------------------------------------
class _Seg(NamedTuple):
    """One piece of every record.

    ``const``: the same bytes in every record; ``matrix``: row i is ``values[i, :lengths[i]]``;
    ``ragged``: row i is ``values[starts[i] : starts[i] + lengths[i]]``.
    """

    kind: str
    values: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray = _EMPTY_I64


def _const(data: bytes, n: int) -> _Seg:
    return _Seg("const", np.frombuffer(data, np.uint8), np.full(n, len(data), np.int64))


def _matrix(m: np.ndarray) -> _Seg:
    return _Seg("matrix", m, np.full(m.shape[0], m.shape[1], np.int64))


def _varint_seg(values: np.ndarray) -> _Seg:
    if len(values) and (values == values[0]).all():
        return _const(_varint(int(values[0])), len(values))
    m, lengths = _varint_matrix(values)
    if len(lengths) and (lengths == lengths[0]).all():
        m = m[:, : lengths[0]]
    return _Seg("matrix", m, lengths)


def _field(tag: int, body: Sequence[_Seg], n: int) -> list[_Seg]:
    """A length-delimited field: tag, varint size, body."""
    size = np.zeros(n, np.int64)
    for s in body:
        size += s.lengths
    return [_const(bytes([tag]), n), _varint_seg(size), *body]


def _entry(name: str, kind_tag: int, value: _Seg, n: int) -> list[_Seg]:
    """``Features.feature`` map entry ``name`` → Feature with a one-field list ``value``."""
    key = name.encode()
    feature = _field(kind_tag, _field(0x0A, [value], n), n)
    return _field(
        0x0A, [_const(b"\x0a" + _varint(len(key)) + key, n), *_field(0x12, feature, n)], n
    )


def _merge_consts(segs: list[_Seg]) -> list[_Seg]:
    out: list[_Seg] = []
    for s in segs:
        if out and s.kind == "const" and out[-1].kind == "const":
            data = out[-1].values.tobytes() + s.values.tobytes()
            out[-1] = _const(data, len(s.lengths))
        else:
            out.append(s)
    return out


def _scatter(out: np.ndarray, dst: np.ndarray, s: _Seg) -> None:
    if s.kind == "ragged":
        rows, offs = _ragged_index(s.lengths)
        out[dst[rows] + offs] = s.values[s.starts[rows] + offs]
        return
    width = s.values.shape[-1]
    if s.kind == "matrix" and not (s.lengths == width).all():
        keep = np.arange(width) < s.lengths[:, None]
        out[(dst[:, None] + np.arange(width))[keep]] = s.values[keep]
        return
    # Rows of one width: assign through overlapping windows, one row copy per record.
    np.lib.stride_tricks.sliding_window_view(out, width, writeable=True)[dst] = s.values


def _assemble(segs: list[_Seg]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the segments of every record: (bytes, start of each record)."""
    segs = _merge_consts(segs)
    lengths = np.stack([s.lengths for s in segs], axis=1)
    rec_len = lengths.sum(axis=1)
    rec_start = _excl_cumsum(rec_len)
    col = rec_start[:, None] + np.cumsum(lengths, axis=1) - lengths
    out = np.empty(int(rec_len.sum()), np.uint8)
    for k, s in enumerate(segs):
        _scatter(out, col[:, k], s)
    return out, rec_start


def _key_seg(keys: pa.Array | np.ndarray) -> _Seg:
    if isinstance(keys, np.ndarray):
        if keys.dtype.kind not in "iu":
            raise ValueError(f"numpy keys must be integers, got dtype {keys.dtype}")
        return _varint_seg(keys.astype(np.int64))
    if keys.null_count:
        raise ValueError(f"keys must not be null ({keys.null_count} nulls)")
    if pa.types.is_integer(keys.type):
        return _varint_seg(keys.to_numpy(zero_copy_only=False).astype(np.int64))
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        raise ValueError(f"keys must be integers or strings, got Arrow type {keys.type}")
    wide = pa.types.is_large_string(keys.type)
    _, off_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(off_buf, np.int64 if wide else np.int32)
    offsets = offsets[keys.offset : keys.offset + len(keys) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return _Seg("ragged", data, np.diff(offsets), offsets[:-1])


def _frame(payload: list[_Seg], n: int) -> np.ndarray:
    """TFRecord framing around each record's ``payload`` segments."""
    size = np.sum([s.lengths for s in payload], axis=0, dtype=np.int64)
    length = size.astype("<u8").view(np.uint8).reshape(n, 8)
    length_crc = mask_crc(crc32c_many(length.reshape(-1), np.arange(n) * 8, np.full(n, 8)))
    segs = [_matrix(length), _matrix(length_crc.astype("<u4").view(np.uint8).reshape(n, 4))]
    out, starts = _assemble([*segs, *payload, _matrix(np.zeros((n, _FOOTER), np.uint8))])
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
    n = len(feats)
    if labels.dtype.kind == "f":
        label = _matrix(labels.astype("<f4").view(np.uint8).reshape(n, 4))
        label_tag = _FLOAT_LIST
    else:
        label, label_tag = _varint_seg(labels.astype(np.int64)), _INT64_LIST
    key = _key_seg(keys)
    entries = [
        *_entry(FEATURES_COLUMN, _FLOAT_LIST, _matrix(feats.view(np.uint8).reshape(n, -1)), n),
        *_entry(KEY_COLUMN, _INT64_LIST if key.kind != "ragged" else _BYTES_LIST, key, n),
        *_entry(LABEL_COLUMN, label_tag, label, n),
    ]
    return _frame(_field(0x0A, entries, n), n)


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
        same = _windows(buf, cand, 8).view("<u8").reshape(-1) == n
        m = k if same.all() else int(np.argmin(same))  # cand[0] is pos itself: m >= 1
        parts += [np.array(singles, np.int64), cand[:m]]
        singles, pos = [], pos + m * size
        run, cool = (min(2 * run, 1 << 16), 0) if m == k else (16, 0 if m >= 4 else 32)
    parts.append(np.array(singles, np.int64))
    return np.concatenate(parts), pos


def _u32_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return _windows(buf, pos, 4).view("<u4").reshape(-1)


def _check_lengths(buf: np.ndarray, starts: np.ndarray, where: str, first: int) -> np.ndarray:
    """Verify the length CRCs of records at ``starts``; returns their data lengths."""
    if not len(starts):
        return _EMPTY_I64
    length = _windows(buf, starts, 8).reshape(-1)
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
class Feature(NamedTuple):
    """One ``tf.train.Feature``.

    ``kind`` is ``bytes_list``, ``float_list``, ``int64_list`` or None (no kind set);
    ``values`` a list of bytes, or a float32 / int64 array.
    """

    kind: str | None
    values: np.ndarray | list[bytes]


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 70:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _fields(data: memoryview) -> list[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of a message; LEN values are memoryviews."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {field})")
        if pos > len(data) or field == 0:
            raise ValueError(f"field {field} runs past the end of its message")
        out.append((field, wire, value))
    return out


def _packed_varints(data: memoryview) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    if not len(b):
        return np.zeros(0, np.int64)
    if b[-1] >= 0x80:
        raise ValueError("truncated packed varint")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    slack = np.concatenate([b, np.zeros(10, np.uint8)])
    values, after, ok = _read_varints(slack, starts, np.full(len(starts), len(b)))
    if not ok.all() or not np.array_equal(after, ends + 1):
        raise ValueError("packed varint longer than 10 bytes")
    return values.view(np.int64)


def _list_values(kind: int, data: memoryview) -> np.ndarray | list[bytes]:
    items = [(w, v) for f, w, v in _fields(data) if f == 1]
    if kind == 1:
        return [bytes(v) for w, v in items if w == 2]
    parts: list[np.ndarray] = []
    for w, v in items:
        if kind == 2 and w in (2, 5):
            if len(v) % 4:
                raise ValueError(f"packed float list of {len(v)} bytes")
            parts.append(np.frombuffer(v, "<f4"))
        elif kind == 3 and w == 2:
            parts.append(_packed_varints(v))
        elif kind == 3 and w == 0:
            parts.append(np.array([v], np.uint64).view(np.int64))
    dtype = np.float32 if kind == 2 else np.int64
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _feature(data: bytes) -> Feature:
    kind, parts = 0, list[bytes]()
    for f, w, v in _fields(memoryview(data)):
        if f in _KINDS and w == 2:
            if f != kind:  # a oneof: a later member replaces an earlier one
                kind, parts = f, []
            parts.append(bytes(v))  # repeated occurrences of a message merge
    if not kind:
        return Feature(None, np.zeros(0, np.float32))
    return Feature(_KINDS[kind], _list_values(kind, memoryview(b"".join(parts))))


def decode_example(record: bytes | memoryview) -> dict[str, Feature]:
    """Parse a serialized ``tf.train.Example`` (any valid encoding); ValueError when malformed."""
    data = memoryview(record)
    features = b"".join(bytes(v) for f, w, v in _fields(data) if f == 1 and w == 2)
    out: dict[str, Feature] = {}
    for f, w, entry in _fields(memoryview(features)):
        if f != 1 or w != 2:
            continue
        name, value = "", []
        for ef, ew, ev in _fields(entry):
            if ef == 1 and ew == 2:
                name = bytes(ev).decode("utf-8")
            elif ef == 2 and ew == 2:
                value.append(bytes(ev))
        out[name] = _feature(b"".join(value))  # a later entry for the same key wins
    return out


def _byte_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return buf[np.minimum(pos, len(buf) - 1)]


def _matches(buf: np.ndarray, pos: np.ndarray, const: bytes) -> np.ndarray:
    return (_windows(buf, pos, len(const)) == np.frombuffer(const, np.uint8)).all(axis=1)


def _fills(size: np.ndarray, pos: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``size`` (uint64) is exactly the room between ``pos`` and ``stop``."""
    return (pos <= stop) & (size == np.maximum(stop - pos, 0).astype(np.uint64))


def _parse_entry(
    buf: np.ndarray, pos: np.ndarray, end: np.ndarray, name: str, kinds: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A map entry ``name`` → Feature whose list is one field.

    Returns (ok, the Feature's kind tag, payload start, entry end).
    """
    ok = _byte_at(buf, pos) == 0x0A
    size, p, good = _read_varints(buf, pos + 1, end)
    room = np.maximum(end - p, 0).astype(np.uint64)
    ok &= good & (size <= room)
    stop = p + np.minimum(size, room).astype(np.int64)
    head = b"\x0a" + _varint(len(name)) + name.encode() + b"\x12"
    ok &= _matches(buf, p, head)
    size, p, good = _read_varints(buf, p + len(head), stop)  # the Feature
    kind = _byte_at(buf, p)
    ok &= good & _fills(size, p, stop) & np.isin(kind, kinds)
    size, p, good = _read_varints(buf, p + 1, stop)  # the list
    ok &= good & _fills(size, p, stop) & (_byte_at(buf, p) == 0x0A)
    size, p, good = _read_varints(buf, p + 1, stop)  # its field 1: packed values or one bytes
    return ok & good & _fills(size, p, stop), kind, p, stop


class _Layout(NamedTuple):
    """Where the values of records in this module's layout are (absolute positions)."""

    ok: np.ndarray
    feats: np.ndarray  # the packed floats of ``features``
    key_kind: np.ndarray  # the Feature kind tag of ``key``
    key: np.ndarray  # ``key``'s payload: [key, key_end)
    key_end: np.ndarray
    label: np.ndarray  # ``label``'s payload: [label, record end)


def _layout(
    buf: np.ndarray, start: np.ndarray, end: np.ndarray, dim: int, int_label: bool
) -> _Layout:
    """Parse records in this module's layout, all at once, checking every tag and length."""
    ok = (_byte_at(buf, start) == 0x0A) & (start < end)
    size, p, good = _read_varints(buf, start + 1, end)
    ok &= good & _fills(size, p, end)
    good, _, feats, stop = _parse_entry(buf, p, end, FEATURES_COLUMN, (_FLOAT_LIST,))
    ok &= good & (stop - feats == 4 * dim)
    kinds = (_BYTES_LIST, _FLOAT_LIST, _INT64_LIST)
    good, key_kind, key, key_end = _parse_entry(buf, stop, end, KEY_COLUMN, kinds)
    ok &= good
    label_kind = (_INT64_LIST,) if int_label else (_FLOAT_LIST,)
    good, _, label, stop = _parse_entry(buf, key_end, end, LABEL_COLUMN, label_kind)
    ok &= good & (stop == end)
    if int_label:  # exactly one varint
        _, after, good = _read_varints(buf, label, stop)
        ok &= good & (after == stop)
    else:
        ok &= stop - label == 4
    return _Layout(ok, feats, key_kind, key, key_end, label)


def _values(
    rows: np.ndarray, feats: int, label: int, dim: int, int_label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels from records of one layout, ``rows`` ``[n, length]``."""
    f = np.ascontiguousarray(rows[:, feats : feats + 4 * dim]).view("<f4")
    if not int_label:
        lab = np.ascontiguousarray(rows[:, label : label + 4]).view("<f4").reshape(-1)
        return f.astype(np.float32, copy=False), lab.astype(np.float32, copy=False)
    value = np.zeros(len(rows), np.uint64)
    for k in range(rows.shape[1] - label):  # a varint of the same width in every row
        value |= (rows[:, label + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return f.astype(np.float32, copy=False), value.view(np.int64)


def _decode_layout(
    buf: np.ndarray, start: np.ndarray, end: np.ndarray, dim: int, int_label: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records in this module's layout, all at once: (ok, features ``[n, dim]``, labels)."""
    lay = _layout(buf, start, end, dim, int_label)
    feats = _windows(buf, lay.feats, 4 * dim).view("<f4").astype(np.float32, copy=False)
    labels: np.ndarray
    if int_label:
        labels = _read_varints(buf, lay.label, end)[0].view(np.int64)
    else:
        labels = _windows(buf, lay.label, 4).view("<f4").reshape(-1).astype(np.float32)
    return lay.ok, feats, labels


def _decode_same_length(
    buf: np.ndarray, start: np.ndarray, length: int, dim: int, int_label: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records of one length: parse the first, compare the others' structure bytes with it.

    Records with the first one's tags, lengths and varint widths (continuation bits) decode
    at its offsets; the others get ``ok`` False.
    """
    n, step = len(start), int(start[1] - start[0]) if len(start) > 1 else 0
    if n > 1 and step > 0 and (np.diff(start) == step).all():  # evenly spaced: a strided view
        rows = np.lib.stride_tricks.as_strided(buf[start[0] :], (n, length), (step, 1))
    else:
        rows = _windows(buf, start, length)
    lay = _layout(buf, start[:1], start[:1] + length, dim, int_label)
    if not lay.ok[0]:
        return np.zeros(n, bool), np.zeros((n, dim), np.float32), np.zeros(n)
    at = {k: int(getattr(lay, k)[0] - start[0]) for k in ("feats", "key", "key_end", "label")}
    bits = np.full(length, 0xFF, np.uint8)
    bits[at["feats"] : at["feats"] + 4 * dim] = 0
    bits[at["key"] : at["key_end"]] = 0x80 if lay.key_kind[0] == _INT64_LIST else 0
    bits[at["label"] :] = 0x80 if int_label else 0
    cols = np.flatnonzero(bits)
    sub = rows[:, cols] & bits[cols]
    ok = (sub == sub[0]).all(axis=1)
    feats, labels = _values(rows, at["feats"], at["label"], dim, int_label)
    return ok, feats, labels


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
            ok[run], feats[run], labels[run] = _decode_same_length(
                buf, data[run], int(lengths[run[0]]), dim, int_label
            )
    rest = np.flatnonzero(~ok)
    if rest.size:
        ok[rest], feats[rest], labels[rest] = _decode_layout(
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
    parts = [(np.zeros((0, dim), np.float32), np.zeros(0, label_dtype))]
    step = max(1, _CHUNK_BYTES // (4 * dim + 64))
    for a in range(0, len(starts), step):
        rows, first = slice(a, a + step), group.first_row + a
        parts.append(_decode(buf, starts[rows], lengths[rows], dim, label_dtype, where, first))
    if len(parts) == 2:
        return parts[1]
    return np.concatenate([f for f, _ in parts]), np.concatenate([lab for _, lab in parts])


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
