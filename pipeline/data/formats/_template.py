"""Named tensor columns of ``tf.train.Example`` records, decoded many records at a time.

A shard written with :func:`pipeline.data.formats._example.encode_columns` holds one feature
per column, each a list with a single field: packed floats (float_list), packed varints
(int64_list) or one bytes value (bytes_list, uint8 tensors). Records of one byte length
almost always share one structure — the same tags, sizes and varint widths, only the values
differ — so the first record of each run of equal lengths is parsed in Python into a
*template* (where every feature's payload lies), the others are compared with it on their
structure bytes (all bytes outside float/bytes payloads; the continuation bits of varints),
and every matching record's values are cut out at the template's offsets for the whole run at
once. A record that does not match goes through the general protobuf parser
(:func:`pipeline.data.formats._example.decode_example`), so any valid encoding reads.

Part of :mod:`pipeline.data.formats.tfrecord`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from pipeline.data.columns import ColumnSpec
from pipeline.data.formats._crc32c import windows
from pipeline.data.formats._example import Feature, decode_example, read_varint
from pipeline.data.shardset import LABEL_COLUMN, ShardSetError

__all__ = ["decode_columns"]

_KIND_OF_TAG: Final = {0x0A: "bytes_list", 0x12: "float_list", 0x1A: "int64_list"}
_MIN_RUN: Final = 16  # shorter runs of one length are decoded record by record


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one feature's values lie in a record: ``[start, end)`` and the list kind."""

    kind: str
    start: int
    end: int


def _template(record: memoryview) -> dict[str, _Slot] | None:
    """Payload offsets of every feature of a record in the one-field-per-list layout."""
    try:
        if not record or record[0] != 0x0A:
            return None
        size, pos = read_varint(record, 1)
        if pos + size != len(record):
            return None
        slots: dict[str, _Slot] = {}
        while pos < len(record):
            parsed = _entry(record, pos)
            if parsed is None:
                return None
            name, slot, pos = parsed
            slots[name] = slot
        return slots
    except (ValueError, IndexError):  # malformed: the general parser reports it
        return None


def _entry(record: memoryview, pos: int) -> tuple[str, _Slot, int] | None:
    """One map entry at ``pos``: (name, its payload, the position after the entry)."""
    if record[pos] != 0x0A:
        return None
    size, at = read_varint(record, pos + 1)
    end = at + size
    if record[at] != 0x0A:  # the entry's key field
        return None
    size, at = read_varint(record, at + 1)
    name = bytes(record[at : at + size]).decode("utf-8")
    at += size
    if at >= end or record[at] != 0x12:  # the Feature
        return None
    size, at = read_varint(record, at + 1)
    kind = _KIND_OF_TAG.get(record[at]) if at + size == end else None
    if kind is None:  # the list
        return None
    size, at = read_varint(record, at + 1)
    if at + size != end or at >= end or record[at] != 0x0A:  # the list's field 1
        return None
    size, at = read_varint(record, at + 1)
    return (name, _Slot(kind, at, end), end) if at + size == end else None


def _structure_mask(slots: dict[str, _Slot], length: int) -> np.ndarray:
    """Bits of each byte that every record of this template has in common."""
    bits = np.full(length, 0xFF, np.uint8)
    for slot in slots.values():
        bits[slot.start : slot.end] = 0x80 if slot.kind == "int64_list" else 0
    return bits


def _varints(rows: np.ndarray, slot: _Slot) -> np.ndarray:
    """The int64 values of a packed varint payload, the same widths in every row."""
    payload = rows[:, slot.start : slot.end]
    first = payload[0]
    starts = np.flatnonzero(np.concatenate([[True], first[:-1] < 0x80]))
    shift = (np.arange(len(first)) - np.repeat(starts, np.diff([*starts, len(first)]))) * 7
    parts = (payload & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts, axis=1).view(np.int64)


def _want(spec: ColumnSpec) -> tuple[str, int]:
    """The list kind and how many values (bytes, for a bytes_list) ``spec`` has per row."""
    dtype = spec.numpy_dtype
    if dtype == np.float32:
        return "float_list", spec.size
    if dtype == np.uint8 and spec.is_tensor:
        return "bytes_list", spec.size
    return "int64_list", spec.size


def _cut(rows: np.ndarray, slot: _Slot, spec: ColumnSpec) -> np.ndarray | None:
    """``spec``'s values ``[n, size]`` from the template's slot; None when they do not fit."""
    kind, size = _want(spec)
    if slot.kind != kind:
        return None
    if kind == "int64_list":
        values = _varints(rows, slot)
        return values if values.shape[1] == size else None
    if slot.end - slot.start != (4 * size if kind == "float_list" else size):
        return None
    data = np.ascontiguousarray(rows[:, slot.start : slot.end])
    return data.view("<f4") if kind == "float_list" else data


def _from_feature(feature: Feature | None, spec: ColumnSpec, where: str) -> np.ndarray:
    """``spec``'s values from a generally parsed feature; TFRecord error when they do not fit."""
    kind, size = _want(spec)
    values = [] if feature is None else feature.values
    if feature is not None and feature.kind == kind:
        if isinstance(values, list):
            if len(values) == 1 and len(values[0]) == size:
                return np.frombuffer(values[0], np.uint8)
        elif len(values) == size:
            return values
    raise ShardSetError(
        f"{where}: feature {spec.name!r} is {_describe(feature)}; expected "
        + (
            f"a bytes_list of one {size}-byte value"
            if kind == "bytes_list"
            else f"a {kind} of {size} values"
        )
        + f" ({spec.dtype} {list(spec.shape)})"
    )


def _describe(feature: Feature | None) -> str:
    if feature is None:
        return "missing"
    if isinstance(feature.values, list):
        sizes = sorted({len(v) for v in feature.values})
        return f"a bytes_list of {len(feature.values)} value(s) of {sizes} bytes"
    return f"a {feature.kind} of {len(feature.values)} values"


def _fill(
    out: dict[str, np.ndarray], specs: Sequence[ColumnSpec], idx: np.ndarray, values: list[Any]
) -> None:
    for spec, v in zip(specs, values, strict=True):
        target = out[spec.name]
        if np.issubdtype(target.dtype, np.integer) and len(v):
            info = np.iinfo(target.dtype)
            if v.min() < info.min or v.max() > info.max:
                raise ValueError(f"column {spec.name!r}: values outside {target.dtype}")
        target[idx] = np.asarray(v).reshape(len(idx), -1).astype(target.dtype, copy=False)


def decode_columns(
    buf: np.ndarray,
    data: np.ndarray,
    lengths: np.ndarray,
    columns: Sequence[ColumnSpec],
    label_dtype: np.dtype[Any],
    *,
    where: str,
    first: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``columns`` (each ``[n, *shape]``) and the labels of the records at ``data``.

    ``buf`` holds the records (``data``: where each record's bytes start; ``lengths``: how
    many); ``first`` is the first record's index in the file, for errors naming ``where``.
    """
    label = ColumnSpec(LABEL_COLUMN, "int64" if label_dtype.kind in "iu" else "float32")
    specs = [*columns, label]
    n = len(data)
    out = {s.name: np.zeros((n, s.size), s.numpy_dtype) for s in specs}
    done = np.zeros(n, bool)
    order = np.argsort(lengths, kind="stable")
    for run in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        if len(run) < _MIN_RUN:
            continue
        length = int(lengths[run[0]])
        slots = _template(memoryview(buf[data[run[0]] : data[run[0]] + length].tobytes()))
        if slots is None or any(s.name not in slots for s in specs):
            continue
        rows = windows(buf, data[run], length)
        bits = _structure_mask(slots, length)
        keep = np.flatnonzero(bits)
        sub = rows[:, keep] & bits[keep]
        same = (sub == sub[0]).all(axis=1)
        cut = [_cut(rows[same], slots[s.name], s) for s in specs]
        if any(c is None for c in cut):
            continue  # the general parser below names the offending feature
        _fill(out, specs, run[same], cut)
        done[run[same]] = True
    for i in np.flatnonzero(~done):
        at = f"{where}: record {first + int(i)}"
        try:
            example = decode_example(buf[data[i] : data[i] + lengths[i]].tobytes())
        except ValueError as e:
            raise ShardSetError(f"{at}: not a valid tf.train.Example: {e}") from e
        values = [_from_feature(example.get(s.name), s, at) for s in specs]
        _fill(out, specs, np.array([i]), values)
    tensors = {s.name: out[s.name].reshape(n, *s.shape) for s in columns}
    return tensors, out[LABEL_COLUMN].reshape(n).astype(label_dtype, copy=False)
