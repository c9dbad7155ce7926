"""``tf.train.Example`` protobufs of shard rows, encoded and decoded by hand (no TensorFlow).

The messages (proto3)::

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

Vectorised with numpy over many records at once: encoding concatenates per-record byte
segments with one scatter per segment; decoding parses the fixed layout above for all
records of a row group at once, checking every tag and length (:func:`decode_layout`,
:func:`decode_same_length`), and :func:`decode_example` is the general protobuf parser for
any record that does not follow it. Part of :mod:`pipeline.data.formats.tfrecord`, which
frames these records and re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.data.formats._crc32c import excl_cumsum, ragged_index, windows
from pipeline.data.shardset import FEATURES_COLUMN, KEY_COLUMN, LABEL_COLUMN

__all__ = [
    "Feature",
    "decode_example",
    "decode_layout",
    "decode_same_length",
    "encode_columns",
    "encode_payload",
    "read_varint",
]

_ARANGE10: Final = np.arange(10, dtype=np.int64)
_SHIFTS: Final = (np.arange(10, dtype=np.uint64) * np.uint64(7)).astype(np.uint64)
_EMPTY_I64: Final = np.zeros(0, np.int64)
# Wire tags (field << 3 | wire type) of the Feature kinds.
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 0x0A, 0x12, 0x1A
_KINDS: Final = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


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
    win = windows(buf, pos, 10)
    more = win >= 0x80
    length = np.argmin(more, axis=1) + 1
    ok = ~more.all(axis=1) & (pos + length <= end)
    width = int(length.max())
    parts = (win[:, :width] & 0x7F).astype(np.uint64) << _SHIFTS[:width]
    keep = _ARANGE10[:width] < length[:, None]
    value = np.bitwise_or.reduce(np.where(keep, parts, np.uint64(0)), axis=1)
    return value.astype(np.uint64), pos + length, ok


# -- encoding ---------------------------------------------------------------------------------
class Seg(NamedTuple):
    """One piece of every record.

    ``const``: the same bytes in every record; ``matrix``: row i is ``values[i, :lengths[i]]``;
    ``ragged``: row i is ``values[starts[i] : starts[i] + lengths[i]]``.
    """

    kind: str
    values: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray = _EMPTY_I64


def _const(data: bytes, n: int) -> Seg:
    return Seg("const", np.frombuffer(data, np.uint8), np.full(n, len(data), np.int64))


def matrix(m: np.ndarray) -> Seg:
    return Seg("matrix", m, np.full(m.shape[0], m.shape[1], np.int64))


def _varint_seg(values: np.ndarray) -> Seg:
    if len(values) and (values == values[0]).all():
        return _const(_varint(int(values[0])), len(values))
    m, lengths = _varint_matrix(values)
    if len(lengths) and (lengths == lengths[0]).all():
        m = m[:, : lengths[0]]
    return Seg("matrix", m, lengths)


def _field(tag: int, body: Sequence[Seg], n: int) -> list[Seg]:
    """A length-delimited field: tag, varint size, body."""
    size = np.zeros(n, np.int64)
    for s in body:
        size += s.lengths
    return [_const(bytes([tag]), n), _varint_seg(size), *body]


def _entry(name: str, kind_tag: int, value: Seg, n: int) -> list[Seg]:
    """``Features.feature`` map entry ``name`` → Feature with a one-field list ``value``."""
    key = name.encode()
    feature = _field(kind_tag, _field(0x0A, [value], n), n)
    return _field(
        0x0A, [_const(b"\x0a" + _varint(len(key)) + key, n), *_field(0x12, feature, n)], n
    )


def _merge_consts(segs: list[Seg]) -> list[Seg]:
    out: list[Seg] = []
    for s in segs:
        if out and s.kind == "const" and out[-1].kind == "const":
            data = out[-1].values.tobytes() + s.values.tobytes()
            out[-1] = _const(data, len(s.lengths))
        else:
            out.append(s)
    return out


def _scatter(out: np.ndarray, dst: np.ndarray, s: Seg) -> None:
    if s.kind == "ragged":
        rows, offs = ragged_index(s.lengths)
        out[dst[rows] + offs] = s.values[s.starts[rows] + offs]
        return
    width = s.values.shape[-1]
    if s.kind == "matrix" and not (s.lengths == width).all():
        keep = np.arange(width) < s.lengths[:, None]
        out[(dst[:, None] + np.arange(width))[keep]] = s.values[keep]
        return
    # Rows of one width: assign through overlapping windows, one row copy per record.
    np.lib.stride_tricks.sliding_window_view(out, width, writeable=True)[dst] = s.values


def assemble(segs: list[Seg]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the segments of every record: (bytes, start of each record)."""
    segs = _merge_consts(segs)
    lengths = np.stack([s.lengths for s in segs], axis=1)
    rec_len = lengths.sum(axis=1)
    rec_start = excl_cumsum(rec_len)
    col = rec_start[:, None] + np.cumsum(lengths, axis=1) - lengths
    out = np.empty(int(rec_len.sum()), np.uint8)
    for k, s in enumerate(segs):
        _scatter(out, col[:, k], s)
    return out, rec_start


def _key_seg(keys: pa.Array | np.ndarray) -> Seg:
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
    return Seg("ragged", data, np.diff(offsets), offsets[:-1])


def encode_payload(keys: pa.Array | np.ndarray, feats: np.ndarray, labels: np.ndarray) -> list[Seg]:
    """The ``tf.train.Example`` of every row, as segments (``feats``: ``[n, D]`` ``<f4``)."""
    n = len(feats)
    if labels.dtype.kind == "f":
        label = matrix(labels.astype("<f4").view(np.uint8).reshape(n, 4))
        label_tag = _FLOAT_LIST
    else:
        label, label_tag = _varint_seg(labels.astype(np.int64)), _INT64_LIST
    key = _key_seg(keys)
    entries = [
        *_entry(FEATURES_COLUMN, _FLOAT_LIST, matrix(feats.view(np.uint8).reshape(n, -1)), n),
        *_entry(KEY_COLUMN, _INT64_LIST if key.kind != "ragged" else _BYTES_LIST, key, n),
        *_entry(LABEL_COLUMN, label_tag, label, n),
    ]
    return _field(0x0A, entries, n)


def encode_columns(batch: pa.RecordBatch) -> list[Seg]:
    """The ``tf.train.Example`` of every row of ``batch``, one feature per column, as segments.

    Columns (in name order, as deterministic serialization orders a map): the ``key`` (integer:
    int64_list; string: bytes_list), integer scalars and integer tensors as int64_list, float32
    scalars and tensors as float_list, uint8 tensors as one bytes_list value of their raw bytes
    (row-major). A tensor column is a ``fixed_size_list`` (:mod:`pipeline.data.columns`).
    """
    n = batch.num_rows
    entries: list[Seg] = []
    for name in sorted(batch.schema.names):
        tag, seg = _column_seg(name, batch.column(name), n)
        entries += _entry(name, tag, seg, n)
    return _field(0x0A, entries, n)


def _column_seg(name: str, col: pa.Array, n: int) -> tuple[int, Seg]:
    if col.null_count:
        raise ValueError(f"column {name!r} must not be null ({col.null_count} nulls)")
    kind = col.type
    if name == KEY_COLUMN or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        key = _key_seg(col)
        return (_INT64_LIST if key.kind != "ragged" else _BYTES_LIST), key
    tensor = pa.types.is_fixed_size_list(kind)
    values = col.flatten() if tensor else col
    width = kind.list_size if tensor else 1
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype == np.float32:
        return _FLOAT_LIST, matrix(flat.astype("<f4").view(np.uint8).reshape(n, 4 * width))
    if tensor and flat.dtype == np.uint8:
        return _BYTES_LIST, matrix(flat.reshape(n, width))
    if flat.dtype.kind in "iu" and flat.dtype != np.uint64:
        if not tensor:
            return _INT64_LIST, _varint_seg(flat.astype(np.int64))
        groups, lengths = _varint_matrix(flat.astype(np.int64))
        keep = _ARANGE10 < lengths[:, None]
        per_row = lengths.reshape(n, width).sum(axis=1)
        return _INT64_LIST, Seg("ragged", groups[keep], per_row, excl_cumsum(per_row))
    raise ValueError(
        f"column {name!r}: a TFRecord shard holds float32, uint8 tensors and integers, not "
        f"Arrow type {kind}"
    )


# -- decoding ---------------------------------------------------------------------------------
class Feature(NamedTuple):
    """One ``tf.train.Feature``.

    ``kind`` is ``bytes_list``, ``float_list``, ``int64_list`` or None (no kind set);
    ``values`` a list of bytes, or a float32 / int64 array.
    """

    kind: str | None
    values: np.ndarray | list[bytes]


def read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` of ``data`` and the position after it; ValueError when malformed."""
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
        tag, pos = read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = read_varint(data, pos)
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
    return (windows(buf, pos, len(const)) == np.frombuffer(const, np.uint8)).all(axis=1)


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


def decode_layout(
    buf: np.ndarray, start: np.ndarray, end: np.ndarray, dim: int, int_label: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records in this module's layout, all at once: (ok, features ``[n, dim]``, labels)."""
    lay = _layout(buf, start, end, dim, int_label)
    feats = windows(buf, lay.feats, 4 * dim).view("<f4").astype(np.float32, copy=False)
    labels: np.ndarray
    if int_label:
        labels = _read_varints(buf, lay.label, end)[0].view(np.int64)
    else:
        labels = windows(buf, lay.label, 4).view("<f4").reshape(-1).astype(np.float32)
    return lay.ok, feats, labels


def decode_same_length(
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
        rows = windows(buf, start, length)
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
