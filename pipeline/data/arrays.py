"""Arrow columns of a shard ↔ numpy arrays, checked against the manifest's column specs.

The readers turn the input columns and the ``label`` column of a row group into numpy arrays
(:func:`tensor_to_numpy`, :func:`labels_to_numpy`); the writer turns the batches Spark
produces (vectors as variable-length ``list`` arrays) into the shard schema
(:func:`to_shard_batch`). The Arrow type of a tensor column comes from
:func:`pipeline.data.columns.arrow_type` in both directions.

Which columns a model reads (:func:`input_columns`): every column of the manifest's
``schema`` except the key and the label, in manifest order — the tabular ``features`` vector
(absent from image-only sets), arrays, images and texts (int32 token ids). Each is an :class:`InputColumn`: its
:class:`~pipeline.data.columns.ColumnSpec` plus the optional schema keys ``kind``
(``"tabular"``, ``"array"``, ``"image"``; None in manifests written before they existed) and
``normalize`` (``{"scale", "mean", "std"}``, applied on the training device after the copy,
:mod:`pipeline.train.inputs`). They are read from the manifest's schema entries, so they do
not depend on how :class:`~pipeline.data.columns.ColumnSpec` models them. A manifest without
the keys has one input column, ``features``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa

from pipeline.data.columns import ColumnSpec, arrow_type
from pipeline.data.shardset import (
    FEATURES_COLUMN,
    FORMAT_VERSION,
    KEY_COLUMN,
    LABEL_COLUMN,
    MANIFEST_NAME,
    ShardSet,
    ShardSetError,
)

__all__ = [
    "INPUT_KINDS",
    "InputColumn",
    "Normalize",
    "features_to_numpy",
    "input_columns",
    "labels_to_numpy",
    "tensor_to_numpy",
    "to_shard_batch",
]

INPUT_KINDS: Final = ("tabular", "array", "image", "text")
"""The ``kind`` values of input columns this build reads (None: a manifest without kinds)."""
_OTHER_KINDS: Final = ("key", "label")


@dataclass(frozen=True)
class Normalize:
    """``(x / scale - mean) / std`` of a column, ``mean`` and ``std`` broadcast to its row shape.

    ``mean`` and ``std`` are float64 arrays (``std`` positive) shaped as the manifest gave them
    (e.g. ``[C]`` for per-channel statistics of an ``[H, W, C]`` image); the device computes
    in float32 with them rounded to float32.
    """

    scale: float
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def parse(cls, value: object, spec: ColumnSpec) -> Normalize | None:
        """The manifest's ``normalize`` of ``spec``'s column; ValueError naming the column."""
        if value is None:
            return None
        name = spec.name
        if not isinstance(value, Mapping) or not {"mean", "std"} <= set(value):
            raise ValueError(
                f"column {name!r}: normalize must be {{scale, mean, std}}, got {value!r}"
            )
        try:
            scale = float(value.get("scale", 1.0))
            mean = np.asarray(value["mean"], dtype=np.float64)
            std = np.asarray(value["std"], dtype=np.float64)
            np.broadcast_shapes(mean.shape, std.shape, spec.shape)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"column {name!r}: normalize mean/std must be numbers broadcastable to its "
                f"shape {list(spec.shape)}: {e}"
            ) from None
        if np.broadcast_shapes(mean.shape, std.shape, spec.shape) != spec.shape:
            raise ValueError(
                f"column {name!r}: normalize mean {list(mean.shape)} / std {list(std.shape)} "
                f"do not broadcast to its shape {list(spec.shape)}"
            )
        finite = np.isfinite(scale) and np.isfinite(mean).all() and np.isfinite(std).all()
        if not finite or not scale > 0 or not (std > 0).all():
            raise ValueError(f"column {name!r}: normalize needs finite values, scale > 0, std > 0")
        return cls(scale, mean, std)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest / ``model.json`` form (nested lists)."""
        return {"scale": self.scale, "mean": self.mean.tolist(), "std": self.std.tolist()}


@dataclass(frozen=True)
class InputColumn:
    """A column the model reads: its spec, ``kind`` (None: unknown) and ``normalize``."""

    spec: ColumnSpec
    kind: str | None = None
    normalize: Normalize | None = None

    @property
    def name(self) -> str:
        """The column's name (the key of a batch's ``inputs``)."""
        return self.spec.name

    @property
    def pad_id(self) -> int | None:
        """A text column's padding id (None for other kinds)."""
        return None if self.spec.text is None else int(self.spec.text["pad_id"])

    def to_manifest(self) -> dict[str, Any]:
        """The column as a schema entry, with ``kind`` and ``normalize``."""
        norm = None if self.normalize is None else self.normalize.to_manifest()
        return {**self.spec.to_manifest(), "kind": self.kind, "normalize": norm}

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> InputColumn:
        """An input column from a schema entry; ValueError when it is malformed or unreadable."""
        spec = ColumnSpec.from_manifest(entry)
        kind = entry.get("kind")
        if kind is not None and kind not in INPUT_KINDS:
            raise ValueError(
                f"column {spec.name!r} has kind {kind!r}, which this build does not read "
                f"(format_version {FORMAT_VERSION} input kinds: {', '.join(INPUT_KINDS)})"
            )
        if not spec.is_tensor or spec.numpy_dtype.kind not in "iuf":
            raise ValueError(
                f"input column {spec.name!r} is {spec.dtype} with shape {list(spec.shape)}: the "
                "reader takes numeric tensor columns (a non-empty shape)"
            )
        if kind == "image" and len(spec.shape) != 3:
            raise ValueError(
                f"image column {spec.name!r} has shape {list(spec.shape)}; expected [H, W, C]"
            )
        if kind == "text" and (len(spec.shape) != 1 or spec.dtype != "int32" or not spec.text):
            raise ValueError(
                f"text column {spec.name!r} must be int32 [max_length] with a text entry, got "
                f"{spec.dtype} {list(spec.shape)}"
            )
        return cls(spec, kind, Normalize.parse(entry.get("normalize"), spec))


def input_columns(shards: ShardSet) -> tuple[InputColumn, ...]:
    """The input columns of a shard set, in manifest order (see the module docstring).

    ShardSetError naming the manifest when an entry is malformed, of an unknown kind, or
    when the set has no input column at all.
    """
    where = f"{shards.uri}/{MANIFEST_NAME}"
    entries = shards.info.schema
    shards.columns  # noqa: B018 - validates every entry (ShardSetError naming the manifest)
    try:
        out = tuple(
            InputColumn.from_manifest(e)
            for e in entries
            if e["name"] not in (KEY_COLUMN, LABEL_COLUMN) and e.get("kind") not in _OTHER_KINDS
        )
    except ValueError as e:
        raise ShardSetError(f"{where}: {e}") from e
    if not out:
        raise ShardSetError(f"{where}: the schema has no input column besides key and label")
    return out


def tensor_to_numpy(
    column: pa.ChunkedArray | pa.Array,
    spec: ColumnSpec,
    *,
    where: str = "",
    source: str = "the manifest",
) -> np.ndarray:
    """A tensor column as an ``[N, *spec.shape]`` array of ``spec``'s dtype.

    The column is in either layout of :func:`~pipeline.data.columns.arrow_type` — a
    ``fixed_size_binary`` of the row's little-endian bytes (``format_version`` 2) or a
    ``fixed_size_list`` (version 1) — or a regular ``list`` (as Spark writes vectors) with
    exactly ``spec.size`` values per row, or ``binary`` with exactly the row's bytes per row
    (as Spark holds decoded image pixels). Zero-copy for a single chunk of values of that
    dtype (the result is then a read-only view of the Arrow buffer); several chunks are
    concatenated once, other number types are cast once. Slice offsets are honoured.
    ``where`` (e.g. the file) prefixes error messages, ``source`` names where ``spec`` comes
    from in them (``"the model"`` when scoring).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_tensor(c, spec, where, source) for c in chunks if len(c)]
    if not parts:
        return np.empty((0, *spec.shape), spec.numpy_dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def features_to_numpy(
    column: pa.ChunkedArray | pa.Array, dim: int, *, where: str = ""
) -> np.ndarray:
    """The ``features`` column as a float32 ``[N, dim]`` array (see :func:`tensor_to_numpy`)."""
    return tensor_to_numpy(column, ColumnSpec(FEATURES_COLUMN, "float32", (dim,)), where=where)


def labels_to_numpy(
    column: pa.ChunkedArray | pa.Array, dtype: np.dtype[Any], *, where: str = ""
) -> np.ndarray:
    """The ``label`` column as a 1-D array of ``dtype`` (int64 codes or float32 targets)."""
    if column.null_count:
        raise ShardSetError(f"{where}: column {LABEL_COLUMN!r} has {column.null_count} nulls")
    values = column.to_numpy(zero_copy_only=False)
    out = values.astype(dtype, copy=False)
    if out.dtype.kind == "i" and values.dtype.kind == "f" and not np.array_equal(out, values):
        raise ShardSetError(f"{where}: column {LABEL_COLUMN!r} holds non-integer class codes")
    return out


def _chunk_tensor(arr: pa.Array, spec: ColumnSpec, where: str, source: str) -> np.ndarray:
    kind, name, size = arr.type, spec.name, spec.size
    if arr.null_count:
        raise ShardSetError(f"{where}: column {name!r} has {arr.null_count} null rows")
    if _is_binary(kind):
        return _binary_tensor(arr, spec, where, source)
    if pa.types.is_fixed_size_list(kind):
        if kind.list_size != size:
            raise ShardSetError(
                f"{where}: column {name!r} has vectors of {kind.list_size} values, "
                f"{source} says {size}"
            )
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = np.diff(arr.offsets.to_numpy())
        if (lengths != size).any():
            bad = int(np.flatnonzero(lengths != size)[0])
            raise ShardSetError(
                f"{where}: column {name!r} row {bad} has {lengths[bad]} values, "
                f"{source} says {size}"
            )
    else:
        what = "floats" if spec.numpy_dtype.kind == "f" else "numbers"
        raise ShardSetError(
            f"{where}: column {name!r} has type {kind}; expected a list of {what} or "
            f"{arrow_type(spec)}"
        )
    values = arr.flatten()  # honours the slice offset, unlike .values
    if values.null_count:
        raise ShardSetError(f"{where}: column {name!r} has null elements")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ShardSetError(f"{where}: column {name!r} holds {values.type}, not numbers")
    flat = values.to_numpy(zero_copy_only=False).astype(spec.numpy_dtype, copy=False)
    return flat.reshape(len(arr), *spec.shape)


def _is_binary(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_fixed_size_binary(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


def _binary_tensor(arr: pa.Array, spec: ColumnSpec, where: str, source: str) -> np.ndarray:
    """A binary chunk of the rows' little-endian bytes as ``[n, *shape]``: a view of its data.

    ``fixed_size_binary`` of the row's width, or ``binary`` / ``large_binary`` whose every
    value has exactly that many bytes.
    """
    dtype = spec.numpy_dtype.newbyteorder("<")
    width = spec.size * dtype.itemsize
    takes = f"{source}'s {spec.dtype} {list(spec.shape)} takes {width}"
    if pa.types.is_fixed_size_binary(arr.type):
        if arr.type.byte_width != width:
            raise ShardSetError(
                f"{where}: column {spec.name!r} has values of {arr.type.byte_width} bytes, {takes}"
            )
        data, start = arr.buffers()[1], arr.offset * width
    else:
        kind = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], kind)[arr.offset : arr.offset + len(arr) + 1]
        lengths = np.diff(offsets)
        if (lengths != width).any():
            bad = int(np.flatnonzero(lengths != width)[0])
            raise ShardSetError(
                f"{where}: column {spec.name!r} row {bad} has {lengths[bad]} bytes, {takes}"
            )
        data, start = arr.buffers()[2], int(offsets[0])
    flat = np.frombuffer(data, dtype, count=len(arr) * spec.size, offset=start)
    return flat.astype(spec.numpy_dtype, copy=False).reshape(len(arr), *spec.shape)


def _as_binary(column: pa.Array, field: pa.Field, spec_dtype: np.dtype[Any]) -> pa.Array:
    """``column`` (lists of numbers, or binary values of the right size) as ``field``'s type."""
    width, n = field.type.byte_width, len(column)
    if column.null_count:
        raise ValueError(f"{field.name} values must not be null ({column.null_count} nulls)")
    if pa.types.is_fixed_size_binary(column.type) and column.type.byte_width == width:
        return column
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        kind = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        offsets = np.frombuffer(column.buffers()[1], kind)[column.offset :][: n + 1]
        if (np.diff(offsets) != width).any():
            raise ValueError(f"{field.name} values must all have {width} bytes")
        data = column.buffers()[2][int(offsets[0]) : int(offsets[-1])] if n else None
        return pa.Array.from_buffers(field.type, n, [None, data or pa.py_buffer(b"")])
    size = width // spec_dtype.itemsize
    values = column.flatten()
    if values.null_count or len(values) != n * size:
        raise ValueError(f"{field.name} arrays must all have length {size} and no nulls")
    flat = values.to_numpy(zero_copy_only=False).astype(spec_dtype.newbyteorder("<"), copy=False)
    return pa.Array.from_buffers(field.type, n, [None, pa.py_buffer(np.ascontiguousarray(flat))])


def to_shard_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The columns of ``schema`` from ``batch``, cast to its types (the shard a writer gets).

    Tensor columns may arrive as variable-length lists (Spark's ``vector_to_array``) or, for
    the ``fixed_size_binary`` layout, as binary values (image pixels); every row must then
    hold exactly the fixed size of the schema's type. The element dtype of a
    ``fixed_size_binary`` column is its field's ``dtype`` metadata
    (:func:`~pipeline.data.columns.arrow_schema` sets it), else uint8. ValueError otherwise.
    """
    arrays = []
    for field in schema:
        column = batch.column(field.name)
        if pa.types.is_fixed_size_binary(field.type):
            column = _as_binary(column, field, _element_dtype(field))
        elif pa.types.is_fixed_size_list(field.type):
            values, size = column.flatten(), field.type.list_size
            if column.null_count or len(values) != len(column) * size:
                raise ValueError(f"{field.name} arrays must all have length {size} and no nulls")
            column = pa.FixedSizeListArray.from_arrays(values.cast(field.type.value_type), size)
        else:
            column = column.cast(field.type)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _element_dtype(field: pa.Field) -> np.dtype[Any]:
    """The dtype a ``fixed_size_binary`` field's metadata names (uint8 when it names none)."""
    meta = field.metadata or {}
    return np.dtype(meta.get(b"dtype", b"uint8").decode())
