"""Arrow columns of a shard ↔ numpy arrays, checked against the manifest's column specs.

The readers turn the ``features`` and ``label`` columns of a row group into numpy arrays
(:func:`tensor_to_numpy`, :func:`labels_to_numpy`); the writer turns the batches Spark
produces (vectors as variable-length ``list`` arrays) into the shard schema
(:func:`to_shard_batch`). The Arrow type of a tensor column comes from
:func:`pipeline.data.columns.arrow_type` in both directions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.columns import ColumnSpec, arrow_type
from pipeline.data.shardset import FEATURES_COLUMN, LABEL_COLUMN, ShardSetError

__all__ = ["features_to_numpy", "labels_to_numpy", "tensor_to_numpy", "to_shard_batch"]


def tensor_to_numpy(
    column: pa.ChunkedArray | pa.Array, spec: ColumnSpec, *, where: str = ""
) -> np.ndarray:
    """A tensor column as an ``[N, *spec.shape]`` array of ``spec``'s dtype.

    The column is the ``fixed_size_list`` of :func:`~pipeline.data.columns.arrow_type`, or a
    regular ``list`` (as Spark writes vectors) with exactly ``spec.size`` values per row.
    Zero-copy for a single chunk of values of that dtype (the result is then a read-only view
    of the Arrow buffer); several chunks are concatenated once, other number types are cast
    once. Slice offsets are honoured. ``where`` (e.g. the file) prefixes error messages.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_tensor(c, spec, where) for c in chunks if len(c)]
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


def _chunk_tensor(arr: pa.Array, spec: ColumnSpec, where: str) -> np.ndarray:
    kind, name, size = arr.type, spec.name, arrow_type(spec).list_size
    if arr.null_count:
        raise ShardSetError(f"{where}: column {name!r} has {arr.null_count} null rows")
    if pa.types.is_fixed_size_list(kind):
        if kind.list_size != size:
            raise ShardSetError(
                f"{where}: column {name!r} has vectors of {kind.list_size} values, "
                f"the manifest says {size}"
            )
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = np.diff(arr.offsets.to_numpy())
        if (lengths != size).any():
            bad = int(np.flatnonzero(lengths != size)[0])
            raise ShardSetError(
                f"{where}: column {name!r} row {bad} has {lengths[bad]} values, "
                f"the manifest says {size}"
            )
    else:
        what = "floats" if spec.numpy_dtype.kind == "f" else "numbers"
        raise ShardSetError(f"{where}: column {name!r} has type {kind}; expected a list of {what}")
    values = arr.flatten()  # honours the slice offset, unlike .values
    if values.null_count:
        raise ShardSetError(f"{where}: column {name!r} has null elements")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ShardSetError(f"{where}: column {name!r} holds {values.type}, not numbers")
    flat = values.to_numpy(zero_copy_only=False).astype(spec.numpy_dtype, copy=False)
    return flat.reshape(len(arr), *spec.shape)


def to_shard_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The columns of ``schema`` from ``batch``, cast to its types (the shard a writer gets).

    Tensor columns may arrive as variable-length lists (Spark's ``vector_to_array``); every
    row must then hold exactly the fixed size of the schema's type. ValueError otherwise.
    """
    arrays = []
    for field in schema:
        column = batch.column(field.name)
        if pa.types.is_fixed_size_list(field.type):
            values, size = column.flatten(), field.type.list_size
            if column.null_count or len(values) != len(column) * size:
                raise ValueError(f"{field.name} arrays must all have length {size} and no nulls")
            column = pa.FixedSizeListArray.from_arrays(values.cast(field.type.value_type), size)
        else:
            column = column.cast(field.type)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
