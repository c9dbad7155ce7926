"""What the columns of a shard set are: name, dtype and per-row shape, from the manifest.

The manifest's ``schema`` lists every column of the shard files as
``{"name": ..., "dtype": ..., "shape": [...]}``: ``dtype`` an Arrow/numpy type name
(``float32``, ``int64``, ``int32``, ``uint8``, ``string``…), ``shape`` the shape of one row's
value — ``[]`` for a scalar (``key``, ``label``), ``[D]`` for the ``features`` vector, and
e.g. ``[H, W, C]`` for an image. :class:`ColumnSpec` is that entry, parsed and checked;
:attr:`pipeline.data.shardset.ShardSet.columns` reads them from a manifest.

Two optional keys say what a column is and how to normalize it (both absent in manifests
written before they existed, and left out of an entry when they have their default):

* ``kind``: one of :data:`COLUMN_KINDS` — ``key``, ``label``, ``tabular`` (the Spark ML
  ``features`` vector, already standardized), ``array`` (a declared fixed-shape numeric
  column, stored float32), ``image`` (decoded pixels, uint8 ``[H, W, C]``) or ``text``
  (int32 token ids ``[max_length]``, padded with the pad id);
* ``normalize``: ``{"scale": s, "mean": m, "std": d}``, where ``m`` and ``d`` are (nested)
  lists broadcastable with numpy's rules to the row shape; the model's input is
  ``(x / s - m) / d`` (images: ``s`` = 255 and per-channel ``m``, ``d`` of length ``C``;
  standardized arrays: ``s`` = 1 and per-element ``m``, ``d`` of the row shape).

A ``text`` column also has ``text``: ``{"vocab_size": V, "pad_id": p, "tokenizer": path}``,
the ids' range ``[0, V)``, the padding id and the ``tokenizer.json`` it was encoded with,
relative to the shard set's feature-model directory (copied into a bundle's ``features/``).

In a shard file a scalar column has the Arrow type of its ``dtype``. A tensor column (a
non-empty ``shape``) holds one value per row with the row's values in row-major (C) order,
in one of two layouts (:data:`TENSOR_LAYOUTS`):

* ``binary`` (Parquet shards of ``format_version`` 2): ``fixed_size_binary[prod(shape) *
  itemsize]``, the row's little-endian bytes — a flat Parquet ``FIXED_LEN_BYTE_ARRAY``
  column that decodes at memory speed and turns into ``[N, *shape]`` without a copy
  (``np.frombuffer(column.buffers()[1], dtype).reshape(-1, *shape)``);
* ``list`` (``format_version`` 1 Parquet shards, and the Arrow batches the TFRecord writer
  encodes): ``fixed_size_list<dtype>[prod(shape)]``, a nested column whose Parquet reader
  decodes one definition level per element (17x slower for 64x64x3 images).

:func:`arrow_type` is the one place that mapping is made: the writer's shard schema
(:func:`arrow_schema`) and the readers' checks (:func:`pipeline.data.arrays.tensor_to_numpy`,
which reads both layouts whatever the manifest's version) derive the type from it.

Imports nothing else of the package (the shard set, the formats and the arrays module build
on it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "COLUMN_KINDS",
    "TENSOR_LAYOUTS",
    "ColumnSpec",
    "arrow_schema",
    "arrow_type",
    "columns_from_manifest",
]

COLUMN_KINDS = ("key", "label", "tabular", "array", "image", "text")
"""The values of a schema entry's ``kind``."""
TENSOR_LAYOUTS = ("binary", "list")
"""How a tensor column is stored in Arrow (see the module docstring); ``binary`` is the default."""


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One column of a shard set: its name, element dtype and per-row shape (``()``: scalar).

    ``kind`` (one of :data:`COLUMN_KINDS`, None when the manifest does not say) and
    ``normalize`` (None, or ``{"scale", "mean", "std"}``) are described in the module docstring.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    kind: str | None = None
    normalize: Mapping[str, Any] | None = field(default=None, hash=False)
    text: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a column name must be a non-empty string, got {self.name!r}")
        try:
            pa.type_for_alias(self.dtype)
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"column {self.name!r}: unknown dtype {self.dtype!r}") from None
        shape = tuple(self.shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(
                f"column {self.name!r}: shape must be a list of positive integers, got "
                f"{list(self.shape)!r}"
            )
        object.__setattr__(self, "shape", shape)
        if self.kind is not None and self.kind not in COLUMN_KINDS:
            raise ValueError(
                f"column {self.name!r}: kind must be one of {list(COLUMN_KINDS)}, got {self.kind!r}"
            )
        if self.normalize is not None:
            object.__setattr__(
                self, "normalize", _check_normalize(self.name, self.normalize, shape)
            )
        if self.text is not None:
            object.__setattr__(self, "text", _check_text(self.name, self.text))

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> ColumnSpec:
        """The spec of one manifest ``schema`` entry; ValueError when it is malformed."""
        if not isinstance(entry, Mapping) or "name" not in entry or "dtype" not in entry:
            raise ValueError(f"a schema entry needs a name and a dtype, got {entry!r}")
        shape = entry.get("shape", [])
        if not isinstance(shape, list | tuple):
            raise ValueError(f"column {entry['name']!r}: shape must be a list, got {shape!r}")
        kind = entry.get("kind")
        return cls(
            str(entry["name"]),
            str(entry["dtype"]),
            tuple(shape),
            kind=None if kind is None else str(kind),
            normalize=entry.get("normalize"),
            text=entry.get("text"),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The manifest ``schema`` entry of this column (``kind`` / ``normalize`` when set)."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.kind is not None:
            out["kind"] = self.kind
        if self.normalize is not None:
            out["normalize"] = {
                "scale": self.normalize["scale"],
                "mean": self.normalize["mean"],
                "std": self.normalize["std"],
            }
        if self.text is not None:
            out["text"] = dict(self.text)
        return out

    @property
    def is_tensor(self) -> bool:
        """True for a column with a per-row shape (a tensor column, see :func:`arrow_type`)."""
        return bool(self.shape)

    @property
    def size(self) -> int:
        """Values per row: the product of the shape (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the values (``object`` for strings)."""
        return np.dtype(arrow_type(self, element=True).to_pandas_dtype())


def _check_normalize(
    name: str, normalize: Mapping[str, Any], shape: tuple[int, ...]
) -> dict[str, Any]:
    """``normalize`` as a plain dict, checked; ValueError naming the column otherwise.

    A positive scale, mean and std broadcastable to ``shape``, every std positive.
    """
    if not isinstance(normalize, Mapping) or set(normalize) != {"scale", "mean", "std"}:
        raise ValueError(
            f"column {name!r}: normalize must have exactly the keys scale, mean and std, "
            f"got {normalize!r}"
        )
    scale = normalize["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"column {name!r}: normalize.scale must be a positive number")
    for key in ("mean", "std"):
        try:
            values = np.asarray(normalize[key], dtype=np.float64)
            np.broadcast_shapes(values.shape, shape)
        except (TypeError, ValueError):
            raise ValueError(
                f"column {name!r}: normalize.{key} must be numbers broadcastable to the row "
                f"shape {list(shape)}"
            ) from None
        if not np.isfinite(values).all() or (key == "std" and not (values > 0).all()):
            raise ValueError(f"column {name!r}: normalize.{key} must be finite (std: > 0)")
    return {"scale": float(scale), "mean": normalize["mean"], "std": normalize["std"]}


def _check_text(name: str, text: Mapping[str, Any]) -> dict[str, Any]:
    """A text column's ``text`` entry as a plain dict, checked; ValueError naming the column."""
    keys = {"vocab_size", "pad_id", "tokenizer"}
    if not isinstance(text, Mapping) or set(text) != keys:
        raise ValueError(f"column {name!r}: text must have exactly the keys {sorted(keys)}")
    vocab, pad = text["vocab_size"], text["pad_id"]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (vocab, pad))
    if not ints or not 0 <= pad < vocab:
        raise ValueError(f"column {name!r}: text needs integers 0 <= pad_id < vocab_size")
    return {"vocab_size": vocab, "pad_id": pad, "tokenizer": str(text["tokenizer"])}


def arrow_type(spec: ColumnSpec, *, element: bool = False, layout: str = "binary") -> pa.DataType:
    """The Arrow type of ``spec``'s column in a shard file (``element``: of one value).

    A scalar has the type of its dtype; a tensor is ``fixed_size_binary[size * itemsize]``
    (``layout="binary"``) or ``fixed_size_list<dtype>[size]`` (``layout="list"``).
    """
    value = pa.type_for_alias(spec.dtype)
    if element or not spec.shape:
        return value
    if layout == "binary":
        return pa.binary(spec.size * np.dtype(value.to_pandas_dtype()).itemsize)
    if layout == "list":
        return pa.list_(value, spec.size)
    raise ValueError(f"tensor layout must be one of {list(TENSOR_LAYOUTS)}, got {layout!r}")


def arrow_schema(columns: Iterable[ColumnSpec], *, layout: str = "binary") -> pa.Schema:
    """The Arrow schema of a shard file holding ``columns`` (in that order, none nullable).

    A ``fixed_size_binary`` tensor field carries metadata ``dtype`` (``float32``…), ``shape``
    (JSON) and ``order`` (``C,<``: row-major, little-endian), so the file describes itself.
    """
    return pa.schema([_field(c, layout) for c in columns])


def _field(spec: ColumnSpec, layout: str) -> pa.Field:
    """A shard column; a ``binary`` tensor carries its dtype and shape as field metadata."""
    kind = arrow_type(spec, layout=layout)
    meta = None
    if pa.types.is_fixed_size_binary(kind):
        meta = {"dtype": spec.dtype, "shape": json.dumps(list(spec.shape)), "order": "C,<"}
    return pa.field(spec.name, kind, nullable=False, metadata=meta)


def columns_from_manifest(entries: object) -> tuple[ColumnSpec, ...]:
    """The specs of a manifest's ``schema`` list; ValueError for a malformed or repeated entry."""
    if not isinstance(entries, list | tuple):
        raise ValueError(f"schema must be a list of columns, got {entries!r}")
    specs = tuple(ColumnSpec.from_manifest(e) for e in entries)
    names = [c.name for c in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"schema lists column(s) {repeated} more than once")
    return specs
