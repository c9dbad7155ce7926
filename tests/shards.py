"""Write small, real shard sets for tests and benchmarks, without Spark.

:func:`make_shardset` writes exactly what the ETL commits (see ``pipeline/data/shardset.py`` and
DESIGN.md, "Shard set"): Parquet shards ``<split>/part-NNNNN-<gen>.parquet`` with ``key``
(int64, unique over the whole set), ``features`` (``fixed_size_binary`` of ``dim`` float32,
the ``format_version`` 2 layout of :func:`pipeline.data.columns.arrow_type`) and
``label`` columns, and a ``manifest.json`` with each shard's real size and sha256, written
last. Features are standard normal; labels are a learnable function of them:

* classification: ``label = argmax(features @ W)`` over ``num_classes`` classes
  (``features @ w > 0`` for two), so a linear model can reach ~100 % accuracy;
* regression: ``label = features @ w + 0.01 * noise`` (float32).

With ``file_format`` the shards are written by that format's writer from
:mod:`pipeline.data.formats` (the one the ETL's executors use) instead of ``pq.write_table``.
No ``features/`` PipelineModel is written (that needs Spark), although the manifest names
one as the ETL's does. The same ``seed`` gives byte-identical files. :func:`read_split` returns a split's rows in
manifest order, for comparing against what a reader yields.

Tensor columns (the issue "Tensor data end to end"): ``extra`` adds columns (:class:`Extra`:
name, dtype, shape, kind, normalize) after ``features`` — uint8 images hold random pixels,
float arrays standard normal values — and ``features=False`` leaves the tabular vector out
(an image-only set; labels are still drawn from the unseen vector). The manifest then gives
every column its ``kind`` (and ``normalize``) as the ETL does; without extras it stays the
old layout, with neither key. :func:`write_columns` writes given arrays (e.g. real images) as
a shard set, and :func:`read_columns` reads a split's input columns back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.data.columns import ColumnSpec
from pipeline.data.formats import DEFAULT_FORMAT, get_format
from pipeline.data.shardset import FORMAT_VERSION, MANIFEST_NAME, ShardSet

__all__ = [
    "Extra",
    "make_shardset",
    "read_columns",
    "read_split",
    "shard_entry",
    "tensor_values",
    "write_columns",
    "write_manifest",
]

Task = Literal["classification", "regression"]
FeatureType = Literal["binary", "fixed_size_list", "list"]


@dataclass(frozen=True)
class Extra:
    """A tensor column besides ``features``: its manifest entry, values drawn at random."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str | None = "array"
    normalize: Mapping[str, Any] | None = None
    signal: int = 0
    """Added to the values of rows with an odd label (so that the column predicts it)."""

    def entry(self) -> dict[str, Any]:
        """The manifest schema entry."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        out["kind"] = self.kind
        if self.normalize is not None:
            out["normalize"] = dict(self.normalize)
        return out

    def draw(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        """A random row per label: uint8 pixels, or standard normal values of the dtype."""
        shape = (len(labels), *self.shape)
        odd = (labels.astype(np.int64) % 2).reshape(-1, *[1] * len(self.shape))
        if np.dtype(self.dtype) == np.uint8:
            pixels = rng.integers(0, 256 - self.signal, shape, dtype=np.int64)
            return (pixels + self.signal * odd).astype(np.uint8)
        return (rng.standard_normal(shape) + self.signal * odd).astype(self.dtype)


def _tensor_array(values: np.ndarray, layout: str = "binary") -> pa.Array:
    """``[n, *shape]`` values as a tensor column (row-major): ``binary`` or ``fixed_size_list``."""
    size = math.prod(values.shape[1:])
    if layout == "binary":
        flat = np.ascontiguousarray(values, values.dtype.newbyteorder("<"))
        kind = pa.binary(size * values.dtype.itemsize)
        return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size)


def tensor_values(
    column: pa.ChunkedArray, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    """A tensor column of either layout as ``[n, *shape]`` (independently of the reader)."""
    col = column.combine_chunks()
    if pa.types.is_fixed_size_binary(col.type):
        raw = b"".join(v.as_py() for v in col)
        return (
            np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(len(col), *shape).copy()
        )
    return col.flatten().to_numpy().astype(dtype).reshape(len(col), *shape)


def make_shardset(
    root: Path,
    *,
    rows_per_shard: dict[str, list[int]],
    dim: int = 8,
    seed: int = 0,
    row_group_rows: int = 64,
    task: Task = "classification",
    num_classes: int = 2,
    feature_type: FeatureType = "binary",
    compression: str = "snappy",
    file_format: str | None = None,
    extra: Sequence[Extra] = (),
    features: bool = True,
) -> str:
    """Write a committed shard set under ``root`` and return its URI (the path as a string).

    ``rows_per_shard`` maps a split name to the row count of each of its shards, e.g.
    ``{"train": [100, 3, 0, 57], "val": [20]}``; a 0 writes a valid Parquet file with no rows.
    Splits of ``train``/``val``/``test`` that are not given are recorded with no shards.
    ``feature_type="list"`` writes ``list<float32>`` as Spark's ``vector_to_array`` does,
    ``"fixed_size_list"`` the ``format_version`` 1 layout (tensor columns too).
    ``file_format`` (a name in :mod:`pipeline.data.formats`) writes every shard with that
    format's writer (``compression`` and ``feature_type`` then do not apply).
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be classification or regression, got {task!r}")
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((dim, max(num_classes, 1))).astype(np.float32)
    generation = f"g{seed:08x}"
    splits: dict[str, list[dict[str, object]]] = {}
    key = 0
    for split, counts in rows_per_shard.items():
        splits[split] = []
        for i, n in enumerate(counts):
            ftype = feature_type
            if file_format is not None:  # what that format's writer takes
                binary = get_format(file_format).tensor_layout == "binary"
                ftype = "binary" if binary else "fixed_size_list"
            table = _table(rng, key, n, weights, task, num_classes, ftype)
            layout = "list" if ftype == "fixed_size_list" else "binary"
            table = _with_extra(table, rng, extra, features, layout)
            key += n
            suffix = get_format(file_format or DEFAULT_FORMAT).suffix
            rel = f"{split}/part-{i:05d}-{generation}{suffix}"
            (root / split).mkdir(parents=True, exist_ok=True)
            if file_format is None:
                pq.write_table(
                    table, root / rel, row_group_size=row_group_rows, compression=compression
                )
            else:
                fs = pafs.LocalFileSystem()
                get_format(file_format).write(fs, str(root / rel), table, row_group_rows)
            splits[split].append(shard_entry(root, rel, n))
    classes = list(range(num_classes)) if task == "classification" else None
    write_manifest(
        root,
        splits,
        dim=dim,
        task=task,
        classes=classes,
        seed=seed,
        row_group_rows=row_group_rows,
        file_format=file_format or DEFAULT_FORMAT,
        extra=extra,
        features=features,
        format_version=1 if feature_type == "fixed_size_list" and file_format is None else None,
    )
    return str(root)


def _with_extra(
    table: pa.Table,
    rng: np.random.Generator,
    extra: Sequence[Extra],
    features: bool,
    layout: str = "binary",
) -> pa.Table:
    """``table`` with the extra columns before the label (and without ``features``)."""
    if not extra and features:
        return table
    label = table.column("label")
    table = table.drop_columns(["label"] if features else ["label", "features"])
    for column in extra:
        values = column.draw(rng, label.to_numpy())
        table = table.append_column(column.name, _tensor_array(values, layout))
    return table.append_column("label", label)


def write_manifest(
    root: Path,
    splits: dict[str, list[dict[str, object]]],
    *,
    dim: int,
    task: Task = "classification",
    classes: Sequence[object] | None = (0, 1),
    seed: int = 0,
    row_group_rows: int = 64,
    file_format: str = DEFAULT_FORMAT,
    extra: Sequence[Extra] = (),
    features: bool = True,
    format_version: int | None = None,
) -> None:
    """Write ``manifest.json`` for shards already on disk (``splits``: name → shard entries).

    Tests that hand-craft shards (e.g. a Spark-style file) call this to commit them. With
    ``extra`` columns (or without ``features``) every entry gets its ``kind``.
    """
    for name in ("train", "val", "test"):
        splits.setdefault(name, [])
    label = ColumnSpec("label", "int64" if task == "classification" else "float32")
    schema = [ColumnSpec("key", "int64").to_manifest()]
    if features:
        schema.append(ColumnSpec("features", "float32", (dim,)).to_manifest())
    schema += [c.entry() for c in extra] + [label.to_manifest()]
    if extra or not features:
        kinds = {"key": "key", "features": "tabular", "label": "label"}
        schema = [{**e, "kind": e.get("kind") or kinds[e["name"]]} for e in schema]
    rows = {name: sum(int(s["rows"]) for s in shards) for name, shards in splits.items()}
    total = sum(rows.values())
    manifest = {
        "format_version": format_version or FORMAT_VERSION,
        "created_by": "tests.shards.make_shardset",
        "generation": f"g{seed:08x}",
        "file_format": file_format,
        "config": {"seed": seed, "row_group_rows": row_group_rows},
        "fingerprint": {"combined": f"synthetic-{seed}"},
        "schema": schema,
        "feature_names": [f"f{i}" for i in range(dim)] if features else [],
        "label": {"column": "label", "task": task, "classes": list(classes or [])},
        "row_group_rows": row_group_rows,
        "quarantine": {"rows": 0, "by_reason": {}, "by_column": {}, "path": None},
        "reconciliation": {"rows_in": total, "rows_ok": total, "rows_quarantined": 0},
        "feature_stats": {"mean": [0.0] * dim, "std": [1.0] * dim} if features else {},
        "features_model": "features",
        "splits": {name: {"rows": rows[name], "shards": shards} for name, shards in splits.items()},
    }
    tmp = root / f".tmp-{MANIFEST_NAME}"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / MANIFEST_NAME)


def read_split(uri: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, features [N, dim] float32, labels)`` of a split, shards in manifest order."""
    shardset = ShardSet.open(uri)
    keys, feats, labels = [], [], []
    for shard in shardset.split(split).shards:
        t = pq.read_table(shardset.shard_path(shard))
        keys.append(t.column("key").to_numpy())
        feats.append(tensor_values(t.column("features"), np.float32, (shardset.feature_dim,)))
        labels.append(t.column("label").to_numpy())
    if not keys:
        return np.empty(0, np.int64), np.empty((0, shardset.feature_dim), np.float32), np.empty(0)
    return np.concatenate(keys), np.concatenate(feats), np.concatenate(labels)


def _table(
    rng: np.random.Generator,
    first_key: int,
    n: int,
    weights: np.ndarray,
    task: Task,
    num_classes: int,
    feature_type: FeatureType,
) -> pa.Table:
    dim = weights.shape[0]
    x = rng.standard_normal((n, dim)).astype(np.float32)
    scores = x @ weights
    if task == "regression":
        y: np.ndarray = (scores[:, 0] + 0.01 * rng.standard_normal(n)).astype(np.float32)
    elif num_classes == 2:
        y = (scores[:, 0] > 0).astype(np.int64)
    else:
        y = scores.argmax(axis=1).astype(np.int64)
    values = pa.array(x.reshape(-1), pa.float32())
    if feature_type == "binary":
        features: pa.Array = _tensor_array(x)
    elif feature_type == "fixed_size_list":
        features = pa.FixedSizeListArray.from_arrays(values, dim)
    else:
        offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
        features = pa.ListArray.from_arrays(offsets, values)
    return pa.table(
        {
            "key": pa.array(np.arange(first_key, first_key + n, dtype=np.int64)),
            "features": features,
            "label": pa.array(y),
        }
    )


def shard_entry(root: Path, rel: str, rows: int) -> dict[str, object]:
    """The manifest entry of the file ``root/rel`` holding ``rows`` rows (real size and sha256)."""
    digest, size = storage.sha256_file(pafs.LocalFileSystem(), str(root / rel))
    return {"path": rel, "rows": rows, "bytes": size, "sha256": digest}


def write_columns(
    root: Path,
    splits: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    *,
    columns: Sequence[Extra],
    classes: Sequence[object],
    shards: int = 2,
    row_group_rows: int = 64,
) -> str:
    """Write given rows as a committed shard set: ``splits[name] = (inputs, labels)``.

    ``inputs`` maps each of ``columns`` (in that order; ``features`` may be one of them,
    kind ``tabular``) to its ``[n, *shape]`` values; each split is cut into ``shards`` files.
    """
    entries: dict[str, list[dict[str, object]]] = {}
    key = 0
    for split, (inputs, labels) in splits.items():
        entries[split] = []
        for i, rows in enumerate(np.array_split(np.arange(len(labels)), shards)):
            data = {"key": pa.array((key + rows).astype(np.int64))}
            data.update({c.name: _tensor_array(np.asarray(inputs[c.name])[rows]) for c in columns})
            data["label"] = pa.array(np.asarray(labels)[rows].astype(np.int64))
            rel = f"{split}/part-{i:05d}-g00000000.parquet"
            (root / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(data), root / rel, row_group_size=row_group_rows)
            entries[split].append(shard_entry(root, rel, len(rows)))
        key += len(labels)
    tabular = [c for c in columns if c.name == "features"]
    dim = tabular[0].shape[0] if tabular else 0
    write_manifest(
        root, entries, dim=dim, classes=classes, row_group_rows=row_group_rows,
        extra=[c for c in columns if c.name != "features"], features=bool(tabular),
    )  # fmt: skip
    return str(root)


def read_columns(uri: str, split: str) -> dict[str, np.ndarray]:
    """Every tensor column of a split as ``[N, *shape]`` arrays (and ``label``), manifest order."""
    shardset = ShardSet.open(uri)
    specs = {c.name: c for c in shardset.columns}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in specs}
    for shard in shardset.split(split).shards:
        table = pq.read_table(shardset.shard_path(shard))
        for name, c in specs.items():
            col = table.column(name)
            if c.shape:
                parts[name].append(tensor_values(col, c.numpy_dtype, c.shape))
            else:
                parts[name].append(col.to_numpy())
    return {name: np.concatenate(p) for name, p in parts.items() if p}
