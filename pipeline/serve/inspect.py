"""``spark-train inspect PATH``: summarize a shard set, a checkpoint directory or a bundle.

Spark-free: it reads only manifests and metadata files.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.core import storage
from pipeline.data.shardset import FEATURES_COLUMN, MANIFEST_NAME, ShardSet
from pipeline.train.bundle import METRICS, WEIGHTS, read_spec
from pipeline.train.checkpoint import CheckpointManager

__all__ = ["describe", "render"]


def describe(uri: str) -> dict[str, Any]:
    """Machine-readable description of what is at ``uri`` (``kind`` says what it is)."""
    fs, root = storage.resolve(uri)
    if storage.exists(fs, storage.join(root, MANIFEST_NAME)):
        return _describe_shardset(ShardSet.open(uri))
    if storage.exists(fs, storage.join(root, WEIGHTS)):
        spec = read_spec(uri)  # a newer format_version: one line saying to upgrade
        metrics_path = storage.join(root, METRICS)
        metrics = (
            json.loads(storage.read_bytes(fs, metrics_path))
            if storage.exists(fs, metrics_path)
            else {}
        )
        return {"kind": "bundle", "uri": uri, "spec": spec, "metrics": metrics}
    ckpt = CheckpointManager(uri)
    steps = ckpt.steps()
    if steps:
        return {
            "kind": "checkpoints",
            "uri": uri,
            "steps": steps,
            "latest_valid": ckpt.latest_step(),
            "paths": [ckpt.path(s) for s in steps],
        }
    if not storage.exists(fs, root):
        raise FileNotFoundError(f"{uri} does not exist")
    raise ValueError(
        f"{uri} is neither a shard set ({MANIFEST_NAME}), a bundle (model.safetensors) nor a "
        "checkpoint directory (complete step-* checkpoints)"
    )


def _describe_shardset(ss: ShardSet) -> dict[str, Any]:
    m = ss.manifest
    splits = {}
    for name, split in ss.splits.items():
        rows = [s.rows for s in split.shards]
        splits[name] = {
            "rows": split.rows,
            "shards": len(rows),
            "min_rows": min(rows, default=0),
            "max_rows": max(rows, default=0),
            "skew": (max(rows) - min(rows)) if rows else 0,
            "bytes": sum(s.bytes for s in split.shards),
        }
    return {
        "kind": "shardset",
        "uri": ss.uri,
        "created_at": m.get("created_at"),
        "created_by": m.get("created_by"),
        "generation": m.get("generation"),
        "file_format": ss.file_format,
        "feature_dim": _feature_dim(ss),
        "columns": [c.to_manifest() for c in ss.columns],
        "label": m.get("label"),
        "splits": splits,
        "reconciliation": m.get("reconciliation"),
        "quarantine": m.get("quarantine"),
        "feature_stats": m.get("feature_stats"),
        "text": m.get("text"),
    }


def _feature_dim(ss: ShardSet) -> int | None:
    """The ``features`` vector's length; None for a set without one (arrays / images only)."""
    if not any(c.name == FEATURES_COLUMN for c in ss.columns):
        return None
    return ss.feature_dim


def _tensors(d: dict[str, Any]) -> str:
    """The tensor columns of a described shard set, e.g. ``image uint8 [8, 8, 1]``."""
    kinds = ("array", "image", "text")
    out = [f"{c['name']} {c['dtype']} {c['shape']}" for c in d["columns"] if c.get("kind") in kinds]
    return ", ".join(out) or "none"


def render(d: dict[str, Any]) -> str:
    """Human-readable text for :func:`describe`'s result."""
    if d["kind"] != "shardset":
        return json.dumps(d, indent=2, default=str)
    lines = [
        f"shard set {d['uri']}  ({d['file_format']}, generation {d['generation']}, {d['created_at']})",
        f"features: {'none' if d['feature_dim'] is None else str(d['feature_dim']) + ' float32'}   "
        f"tensors: {_tensors(d)}   label: {d['label']['column']} "
        f"({d['label']['task']}, classes={d['label'].get('classes')})",
        "split   rows        shards  rows/shard (min..max, skew)   MiB",
    ]
    for name, s in d["splits"].items():
        lines.append(
            f"{name:<7} {s['rows']:<11} {s['shards']:<7} {s['min_rows']}..{s['max_rows']} "
            f"(skew {s['skew']}){'':<8} {s['bytes'] / 2**20:.1f}"
        )
    rec = d["reconciliation"]
    lines.append(
        f"reconciliation: rows_in={rec['rows_in']} = rows_ok={rec['rows_ok']} + "
        f"rows_quarantined={rec['rows_quarantined']}"
    )
    q = d["quarantine"]
    for reason, n in q["by_reason"].items():
        lines.append(f"  quarantined {reason:<20} {n}")
    for col, n in q.get("by_column", {}).items():
        lines.append(f"  quarantined by column {col:<10} {n}")
    stats = d.get("feature_stats") or {}
    for name, st in (stats.get("numeric") or {}).items():
        lines.append(
            f"  {name:<6} mean={st['train_mean']:.4g} std={st['train_std']:.4g} "
            f"impute={st['impute_value']}"
        )
    for name, st in (stats.get("categorical") or {}).items():
        lines.append(
            f"  {name:<6} levels={st['levels']} top={st['top']}{' one-hot' if st['onehot'] else ''}"
        )
    for c in d["columns"]:
        if c.get("kind") == "text":
            cut = ((d.get("text") or {}).get(c["name"]) or {}).get("truncated", {})
            lines.append(
                f"  {c['name']:<6} text vocab={c['text']['vocab_size']} pad_id="
                f"{c['text']['pad_id']} truncated {cut}"
            )
    return "\n".join(lines)
