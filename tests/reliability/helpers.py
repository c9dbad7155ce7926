"""Small builders shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

from pipeline.bundle import model_spec, write_bundle
from pipeline.models import mlp
from pipeline.shardset import ShardSet
from pipeline.train_config import TrainConfig


def bundle_for(dataset: str, uri: Path) -> Path:
    """An untrained but complete bundle (MLP, hidden [8]) that fits ``dataset``."""
    cfg = TrainConfig.from_mapping({"dataset": dataset, "model": {"args": {"hidden": [8]}}})
    shards = ShardSet.open(dataset)
    spec = model_spec(cfg, shards, input_shape=(shards.feature_dim,), num_outputs=2)
    model = mlp(input_shape=(shards.feature_dim,), num_outputs=2, hidden=[8])
    write_bundle(str(uri), model=model, spec=spec, metrics={}, config={})
    return uri
