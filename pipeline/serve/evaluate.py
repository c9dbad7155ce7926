"""``spark-train evaluate``: a bundle's loss and accuracy / RMSE on one split of a shard set.

Runs in one process without Spark or a process group: the bundle loads from safetensors,
the split streams through the same :class:`~pipeline.data.reader.ShardReader` as training.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.train.bundle import BundleError, load_bundle
from pipeline.train.metrics import EvalSums

__all__ = ["evaluate_bundle"]


def evaluate_bundle(
    bundle_uri: str, dataset: str | None = None, split: str = "test", *, batch_size: int = 4096
) -> dict[str, Any]:
    """Evaluate ``bundle_uri`` on ``split`` of ``dataset`` (default: the set it was trained on)."""
    started = time.perf_counter()
    bundle = load_bundle(bundle_uri)
    uri = dataset or bundle.spec["shardset"]["uri"]
    shards = ShardSet.open(uri)
    _check_compatible(bundle.spec, shards, bundle_uri)
    sums = EvalSums(bundle.spec["task"])
    reader = ShardReader(shards, split, rank=0, world_size=1, batch_size=batch_size, shuffle=False)
    with reader, torch.inference_mode():
        for batch in reader:
            sums.add(bundle.model(batch.features), batch.labels)
    return {
        "bundle": bundle_uri,
        "dataset": uri,
        "split": split,
        "rows": int(sums.values[2]),
        **sums.result(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_compatible(spec: dict[str, Any], shards: ShardSet, bundle_uri: str) -> None:
    """The shard set must carry the features the model was trained on, in the same order."""
    want = spec.get("feature_names") or []
    have = shards.feature_names
    if int(spec["input_shape"][0]) != shards.feature_dim or (want and have and want != have):
        raise BundleError(
            f"{shards.uri} has {shards.feature_dim} features {have[:4]}…, but {bundle_uri} was "
            f"trained on {spec['input_shape'][0]} features {want[:4]}…: evaluate on a shard set "
            "built with the same etl config"
        )
    if spec["task"] != shards.task:
        raise BundleError(f"{bundle_uri} is a {spec['task']} model; {shards.uri} is {shards.task}")
