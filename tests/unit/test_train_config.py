from __future__ import annotations

from typing import Any

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.train.config import TrainConfig
from pipeline.train.registry import get_mode

CONTRACT_YAML = """
train:
  dataset: out/shards
  task: classification
  mode: ddp
  model: {builder: "pipeline.train.models:mlp", args: {hidden: [256, 256]}}
  num_workers: 2
  epochs: 5
  batch_size: 512
  optimizer: {name: adamw, lr: 0.001, weight_decay: 0.0}
  lr_schedule: {name: cosine, warmup_steps: 0}
  grad_accum_steps: 1
  precision: fp32
  grad_clip: null
  comm_hook: none
  seed: 0
  timeout_s: 600
  max_attempts: 3
  checkpoint: {dir: out/ckpt, every_steps: 500, keep: 3}
  output: out/model
  resume: false
  verify: auto
"""


def _train(**changes: Any) -> TrainConfig:
    return TrainConfig.from_mapping(changes)


def test_contract_example_parses() -> None:
    cfg = TrainConfig.from_mapping(yaml.safe_load(CONTRACT_YAML)["train"])
    assert cfg.model.args["hidden"] == [256, 256]
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 0.001
    assert cfg.checkpoint.every_steps == 500
    assert cfg.timeout_s == 600.0
    assert cfg.grad_clip is None


def test_defaults_and_round_trip() -> None:
    cfg = TrainConfig.from_mapping({})
    assert cfg == TrainConfig()
    assert TrainConfig.from_mapping(to_dict(cfg)) == cfg
    again = yaml.safe_load(yaml.safe_dump({"train": to_dict(cfg)}))
    assert TrainConfig.from_mapping(again["train"]) == cfg


def test_top_level_loader_builds_train_section() -> None:
    cfg = parse_config(yaml.safe_load(CONTRACT_YAML), overrides=["train.epochs=2"])
    assert cfg.train.epochs == 2


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "train.bogus"),
        (
            {"optimizer": {"name": "adamw", "lr": 0.1, "betas": [0.9, 0.99]}},
            "train.optimizer.betas",
        ),
        ({"checkpoint": {"every": 5}}, "train.checkpoint.every"),
        ({"model": {"builder": "x:y", "kwargs": {}}}, "train.model.kwargs"),
    ],
)
def test_unknown_keys_are_named(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_mapping(data)
    assert e.value.key == key
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"task": "ranking"}, "train.task"),
        ({"epochs": 0}, "train.epochs"),
        ({"epochs": "5"}, "train.epochs"),
        ({"batch_size": -1}, "train.batch_size"),
        ({"num_workers": 0}, "train.num_workers"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps"),
        ({"max_attempts": 0}, "train.max_attempts"),
        ({"timeout_s": 0}, "train.timeout_s"),
        ({"precision": "fp16"}, "train.precision"),
        ({"grad_clip": 0}, "train.grad_clip"),
        ({"grad_clip": "big"}, "train.grad_clip"),
        ({"comm_hook": "int8"}, "train.comm_hook"),
        ({"verify": "sometimes"}, "train.verify"),
        ({"resume": "yes"}, "train.resume"),
        ({"optimizer": {"name": "lion"}}, "train.optimizer.name"),
        ({"optimizer": {"lr": 0}}, "train.optimizer.lr"),
        ({"optimizer": {"weight_decay": -0.1}}, "train.optimizer.weight_decay"),
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "train.optimizer.momentum"),
        ({"optimizer": {"name": "sgd", "momentum": 1.5}}, "train.optimizer.momentum"),
        ({"lr_schedule": {"name": "step"}}, "train.lr_schedule.name"),
        ({"lr_schedule": {"warmup_steps": -1}}, "train.lr_schedule.warmup_steps"),
        ({"checkpoint": {"every_steps": -1}}, "train.checkpoint.every_steps"),
        ({"checkpoint": {"keep": 0}}, "train.checkpoint.keep"),
        ({"checkpoint": {"dir": ""}}, "train.checkpoint.dir"),
        ({"model": {"builder": "no_colon"}}, "train.model.builder"),
        ({"model": {"args": {"num_outputs": 3}}}, "train.model.args.num_outputs"),
        ({"model": {"args": [1, 2]}}, "train.model.args"),
        ({"powersgd": {"start_iter": 1}}, "train.powersgd.start_iter"),
        ({"powersgd": {"matrix_rank": 0}}, "train.powersgd.matrix_rank"),
        ({"output": ""}, "train.output"),
    ],
)
def test_bad_values_name_the_dotted_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_mapping(data)
    assert e.value.key == key, str(e.value)
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("data", "key", "match"),
    [
        ({"mode": "fsdp", "comm_hook": "powersgd"}, "train.comm_hook", "DDP communication hook"),
        ({"mode": "average", "grad_accum_steps": 2}, "train.grad_accum_steps", "batch_size"),
    ],
)
def test_modes_refuse_settings_they_cannot_honour(
    data: dict[str, Any], key: str, match: str
) -> None:
    """A mode's own checks: the config names a registered mode (and imports no torch); the
    mode's settings are checked by the training preflight on the driver, before launch."""
    cfg = TrainConfig.from_mapping(data)
    with pytest.raises(ConfigError, match=match) as e:
        get_mode(cfg.mode).check_config(cfg)
    assert e.value.key == key


def test_sgd_momentum_and_frozen() -> None:
    cfg = _train(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert cfg.optimizer.momentum == 0.9
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.model.args["hidden"] = [1]  # type: ignore[index]


def test_replace_revalidates() -> None:
    cfg = TrainConfig()
    assert cfg.replace(epochs=2).epochs == 2
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        cfg.replace(epochs=0)
