"""Small builders shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.data.shardset import ShardSet
from pipeline.train.bundle import model_spec, write_bundle
from pipeline.train.config import TrainConfig
from pipeline.train.models import mlp


def bundle_for(dataset: str, uri: Path) -> Path:
    """An untrained but complete bundle (MLP, hidden [8]) that fits ``dataset``."""
    cfg = TrainConfig.from_mapping({"dataset": dataset, "model": {"args": {"hidden": [8]}}})
    shards = ShardSet.open(dataset)
    spec = model_spec(cfg, shards, input_shape=(shards.feature_dim,), num_outputs=2)
    model = mlp(input_shape=(shards.feature_dim,), num_outputs=2, hidden=[8])
    write_bundle(str(uri), model=model, spec=spec, metrics={}, config={})
    return uri


def train_section(tmp: Path, dataset: str, **over: Any) -> dict[str, Any]:
    """A small train section (2 workers, MLP [8], one attempt) over ``dataset``; ``over`` replaces keys."""
    section: dict[str, Any] = {
        "dataset": dataset,
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [8]}},
        "num_workers": 2,
        "epochs": 2,
        "batch_size": 64,
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0},
        "output": str(tmp / "model"),
        "timeout_s": 60,
        "max_attempts": 1,
    }
    section.update(over)
    return section


def train_config_file(tmp: Path, dataset: str, **over: Any) -> Path:
    """``tmp/c.yaml`` with ``spark.master: local[2]`` and :func:`train_section`."""
    path = tmp / "c.yaml"
    data = {"spark": {"master": "local[2]"}, "train": train_section(tmp, dataset, **over)}
    path.write_text(yaml.safe_dump(data))
    return path
