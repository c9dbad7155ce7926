"""``spark-train evaluate``: a bundle's loss and accuracy / RMSE on one split of a shard set.

Runs in one process without Spark or a process group: the bundle loads from safetensors,
the split streams through the same :class:`~pipeline.data.reader.ShardReader` as training,
and the training run's own evaluation pass (:func:`pipeline.train.metrics.evaluate`) puts
the batches through the training engine's :func:`~pipeline.train.engine.to_model` with the
input columns and normalization recorded in the bundle (:attr:`~pipeline.train.bundle.LoadedBundle.inputs`). The shard set must hold
those columns with the same dtypes and sizes (an old bundle: a ``features`` vector of as many
values as its ``input_shape`` has elements, whatever that shape's layout).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.train.bundle import BundleError, load_bundle
from pipeline.train.inputs import ModelInputs
from pipeline.train.metrics import evaluate

__all__ = ["evaluate_bundle"]


def evaluate_bundle(
    bundle_uri: str, dataset: str | None = None, split: str = "test", *, batch_size: int = 4096
) -> dict[str, Any]:
    """Evaluate ``bundle_uri`` on ``split`` of ``dataset`` (default: the set it was trained on)."""
    started = time.perf_counter()
    bundle = load_bundle(bundle_uri)
    uri = dataset or bundle.spec["shardset"]["uri"]
    shards = ShardSet.open(uri)
    inputs = bundle.inputs
    _check_compatible(bundle.spec, inputs, shards, bundle_uri)
    reader = ShardReader(shards, split, rank=0, world_size=1, batch_size=batch_size, shuffle=False)
    with reader:
        sums = evaluate(bundle.model, reader, inputs, bundle.spec["task"], inference=True)
    return {
        "bundle": bundle_uri,
        "dataset": uri,
        "split": split,
        "rows": int(sums.values[2]),
        **sums.result(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_compatible(
    spec: dict[str, Any], inputs: ModelInputs, shards: ShardSet, bundle_uri: str
) -> None:
    """The shard set must carry the input columns the model was trained on (features in order)."""
    want = spec.get("feature_names") or []
    have = shards.feature_names
    problem = inputs.mismatch(shards)
    if problem is None and want and have and want != have:
        problem = f"its features are {have[:4]}…, the model's {want[:4]}…"
    if problem is not None:
        trained = ", ".join(
            f"{c.name} {c.column.spec.dtype} {list(c.column.spec.shape)}" for c in inputs.columns
        )
        raise BundleError(
            f"{shards.uri} does not fit {bundle_uri} ({problem}); the model was trained on "
            f"{trained}: evaluate on a shard set built with the same etl config"
        )
    if spec["task"] != shards.task:
        raise BundleError(f"{bundle_uri} is a {spec['task']} model; {shards.uri} is {shards.task}")
