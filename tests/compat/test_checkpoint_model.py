"""Which model a resumed checkpoint is built as (:func:`pipeline.train.engine.checkpoint_builder`).

Only a checkpoint whose weights are those of 0.1.0's ``cnn`` (and not of today's), written by
0.1.0 or by a later run that resumed one, is resumed as ``cnn_v1``; every other checkpoint
keeps ``train.model.builder``.
The end-to-end resume of a real 0.1.0 checkpoint is in ``test_fixtures.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline.core import compat
from pipeline.data.shardset import ShardSet
from pipeline.train import engine
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import ModelConfig, TrainConfig

SHARDS = Path(__file__).resolve().parent / "fixtures" / "cb86e62" / "shards"
CNN = "pipeline.train.models:cnn"


def _cfg(tmp_path: Path, builder: str = CNN, *, resume: bool = True) -> TrainConfig:
    return TrainConfig.from_mapping(
        {
            "dataset": str(SHARDS),
            "model": {"builder": builder, "args": {"channels": [4, 8]}},
            "resume": resume,
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "output": str(tmp_path / "out"),
        }
    )


def _save(cfg: TrainConfig, builder: str, *, writer: str | None = None) -> CheckpointManager:
    """A checkpoint of ``builder``'s weights; ``writer``: the spark_train its meta records."""
    shards = ShardSet.open(cfg.dataset)
    args = {} if builder.endswith(":mlp") else dict(cfg.model.args)
    model = engine.new_model(cfg.replace(model=ModelConfig(builder=builder, args=args)), shards)
    ckpt = CheckpointManager(cfg.checkpoint.dir)
    path = Path(ckpt.save(3, {"model": model.state_dict(), "step": 3}))
    meta = json.loads((path / "meta.json").read_text())
    if writer is None:
        del meta["spark_train"]  # as 0.1.0 wrote it
    else:
        meta["spark_train"] = writer
    (path / "meta.json").write_text(json.dumps(meta))
    return ckpt


def _decide(cfg: TrainConfig, ckpt: CheckpointManager, caplog: Any, **kw: Any) -> str:
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        return engine.checkpoint_builder(cfg, ShardSet.open(cfg.dataset), ckpt, **kw)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == compat.DEPRECATION_LOGGER]


def test_a_0_1_0_checkpoint_of_the_old_cnn_is_resumed_as_cnn_v1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path)
    ckpt = _save(cfg, engine.CNN_V1)
    assert _decide(cfg, ckpt, caplog) == engine.CNN_V1
    assert _lines(caplog) == [
        f"train.model.builder {CNN!r}: checkpoint {ckpt.path(3)} was written by spark-train "
        f"0.1.0 for the 0.1.0 cnn architecture; resuming it with {engine.CNN_V1!r} (set "
        f"train.model.builder to {engine.CNN_V1!r} to silence this)"
    ]
    # A relaunch after a failure resumes too; a fresh run does not read the checkpoint.
    assert _decide(_cfg(tmp_path, resume=False), ckpt, caplog, relaunch=True) == engine.CNN_V1
    caplog.clear()
    assert _decide(_cfg(tmp_path, resume=False), ckpt, caplog) == CNN
    assert _lines(caplog) == []


@pytest.mark.parametrize(
    ("weights", "writer"),
    [
        ("pipeline.train.models:cnn", None),  # 0.1.0's main after the cnn changed
        ("pipeline.train.models:mlp", None),  # fits neither: loading it says why
    ],
)
def test_other_checkpoints_keep_the_configured_builder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, weights: str, writer: str | None
) -> None:
    cfg = _cfg(tmp_path)
    ckpt = _save(cfg, weights, writer=writer)
    assert _decide(cfg, ckpt, caplog) == CNN
    assert _lines(caplog) == []


def test_a_resumed_0_1_0_checkpoint_is_mapped_again_on_the_next_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The first resume wrote its checkpoints as 0.2.0 with cnn_v1 weights; the same config
    # resumes them again (the weights decide, not the writer).
    cfg = _cfg(tmp_path)
    ckpt = _save(cfg, engine.CNN_V1, writer="0.2.0")
    assert _decide(cfg, ckpt, caplog) == engine.CNN_V1
    assert len(_lines(caplog)) == 1 and "written by spark-train 0.2.0" in _lines(caplog)[0]


def test_a_builder_other_than_cnn_is_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, engine.CNN_V1)
    ckpt = _save(cfg, "pipeline.train.models:cnn")
    assert _decide(cfg, ckpt, caplog) == engine.CNN_V1
    assert engine.with_builder(cfg, engine.CNN_V1) is cfg
