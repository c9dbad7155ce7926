"""Spark-free parts of model averaging: the weighted reduce, its layout, state plumbing, config."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.core.configbase import ConfigError
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.train.config import AveragingConfig, TrainConfig
from pipeline.train.modes.average import (
    average,
    combine,
    contribution,
    load_optimizer_tensors,
    optimizer_tensors,
    reduce_layout,
    shard_view,
)
from pipeline.train.registry import get_mode
from tests.shards import make_shardset


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model/w": torch.randn(7, 5, generator=g),
        "model/b": torch.randn(5, generator=g) * 1e-3,
        "model/count": torch.tensor(10 * (seed + 1), dtype=torch.int64),
    }


def test_sample_weighted_average_is_exact_for_unequal_workers() -> None:
    samples = [190, 110, 3]
    parts = [_tensors(i) for i in range(3)]
    own = [
        contribution(t, samples=n, weighting="samples") for t, n in zip(parts, samples, strict=True)
    ]
    total = combine(combine(own[0], own[1]), own[2])
    result = average(total)

    n = sum(samples)
    for key in ("model/w", "model/b"):
        by_hand = (
            (samples[0] * parts[0][key].double() + samples[1] * parts[1][key].double())
            + samples[2] * parts[2][key].double()
        ) / n
        assert result[key].dtype == torch.float32
        assert torch.equal(result[key], by_hand.float())
    # Integer tensors are averaged and rounded: (190*10 + 110*20 + 3*30) / 303 = 13.83 -> 14.
    assert result["model/count"].dtype == torch.int64 and int(result["model/count"]) == 14
    assert total.samples == n and total.workers == 3
    assert total.nbytes == sum(c.nbytes for c in own)


def test_uniform_weighting_is_the_plain_mean() -> None:
    parts = [_tensors(i) for i in range(2)]
    own = [
        contribution(t, samples=n, weighting="uniform")
        for t, n in zip(parts, (190, 110), strict=True)
    ]
    result = average(combine(own[0], own[1]))
    by_hand = (parts[0]["model/w"].double() + parts[1]["model/w"].double()) / 2
    assert torch.equal(result["model/w"], by_hand.float())


def test_one_worker_gets_its_own_weights_back_bit_for_bit() -> None:
    part = _tensors(5)
    result = average(contribution(part, samples=77, weighting="samples"))
    for key, value in part.items():
        assert torch.equal(result[key], value)


def test_combine_is_commutative_bit_for_bit() -> None:
    own = [contribution(_tensors(i), samples=10 + i, weighting="samples") for i in range(4)]
    pairs = [average(combine(a, b)) for a, b in itertools.permutations(own[:2])]
    assert all(torch.equal(pairs[0][k], pairs[1][k]) for k in pairs[0])
    # A fixed binary tree gives the same bits in any operand order at each node.
    left, right = combine(own[0], own[1]), combine(own[3], own[2])
    a = average(combine(left, right))
    b = average(combine(combine(own[2], own[3]), combine(own[1], own[0])))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reduce_errors() -> None:
    a = contribution({"model/w": torch.ones(2)}, samples=1, weighting="samples")
    b = contribution({"model/v": torch.ones(2)}, samples=1, weighting="samples")
    with pytest.raises(ValueError, match="different tensors"):
        combine(a, b)
    with pytest.raises(ValueError, match="nothing to average"):
        average(contribution({"model/w": torch.ones(2)}, samples=0, weighting="samples"))
    with pytest.raises(ValueError, match="weighting"):
        contribution({"model/w": torch.ones(2)}, samples=1, weighting="rows")


@pytest.mark.parametrize(
    ("workers", "layout"),
    [(1, (1, 2)), (2, (2, 2)), (4, (4, 2)), (5, (8, 4)), (8, (8, 4)), (9, (16, 5)), (64, (64, 7))],
)
def test_reduce_layout(workers: int, layout: tuple[int, int]) -> None:
    assert reduce_layout(workers) == layout


def test_optimizer_state_round_trip() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    flat = optimizer_tensors(optimizer.state_dict())
    assert sorted(flat) == [f"{i}/{n}" for i in (0, 1) for n in ("exp_avg", "exp_avg_sq", "step")]
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer_tensors(fresh, flat)
    assert fresh.param_groups[0]["lr"] == 0.5  # the groups stay the optimizer's own
    for key, value in optimizer_tensors(fresh.state_dict()).items():
        assert torch.equal(value, flat[key])


def test_shard_view_gives_a_worker_every_wth_shard(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path / "set", rows_per_shard={"train": [50, 30, 7, 0, 11]})
    shards = ShardSet.open(uri)
    views = [shard_view(shards, w, 2) for w in (0, 1)]
    assert [v.split("train").rows for v in views] == [50 + 7 + 11, 30 + 0]
    with ShardReader(views[1], "train", rank=0, world_size=1, batch_size=8) as reader:
        assert sum(b.labels.shape[0] for b in reader) == 30
    assert shards.split("train").rows == 98  # the original is untouched


def _train(**changes: Any) -> TrainConfig:
    return TrainConfig.from_mapping({"mode": "average", **changes})


@pytest.mark.parametrize(
    ("averaging", "key"),
    [
        ({"rounds": 0}, "train.averaging.rounds"),
        ({"local_epochs": 0}, "train.averaging.local_epochs"),
        ({"local_steps": -1}, "train.averaging.local_steps"),
        ({"local_epochs": 1, "local_steps": 5}, "train.averaging.local_steps"),
        ({"optimizer_state": "keep"}, "train.averaging.optimizer_state"),
        ({"weighting": "rows"}, "train.averaging.weighting"),
        ({"partition": "files"}, "train.averaging.partition"),
        ({"warmup_ddp_epochs": -1}, "train.averaging.warmup_ddp_epochs"),
        ({"rounds": "10"}, "train.averaging.rounds"),
        ({"local_epoch": 2}, "train.averaging.local_epoch"),
    ],
)
def test_averaging_config_errors_name_the_key(averaging: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _train(averaging=averaging)
    assert e.value.key == key, str(e.value)
    assert key in str(e.value)


def test_average_mode_rejects_settings_it_cannot_honour() -> None:
    """The mode's own checks (run by the training preflight on the driver, before launch)."""
    mode = get_mode("average")
    with pytest.raises(ConfigError, match=r"raise train\.batch_size") as e:
        mode.check_config(_train(grad_accum_steps=4))
    assert e.value.key == "train.grad_accum_steps"
    with pytest.raises(ConfigError, match="DDP warm-up") as e:
        mode.check_config(_train(comm_hook="fp16"))
    assert e.value.key == "train.comm_hook"
    # The hook is fine when a DDP warm-up uses it.
    mode.check_config(_train(comm_hook="fp16", averaging={"warmup_ddp_epochs": 1}))
    # DDP runs ignore the averaging section.
    assert TrainConfig.from_mapping({"grad_accum_steps": 4}).averaging == AveragingConfig()


def test_local_length_defaults_to_one_epoch() -> None:
    assert AveragingConfig().epochs_per_round == 1
    assert AveragingConfig(local_epochs=3).epochs_per_round == 3
    assert AveragingConfig(local_steps=7).epochs_per_round is None
    cfg = _train(averaging={"rounds": 4, "local_steps": 7, "optimizer_state": "local"})
    assert cfg.averaging.rounds == 4 and cfg.averaging.optimizer_state == "local"


def test_the_ddp_worker_refuses_average_mode() -> None:
    """Under torchrun (no Spark) an averaging config must not silently run as DDP."""
    from pipeline.train.loop import train_worker

    with pytest.raises(ConfigError) as e:
        train_worker({"mode": "average"})
    assert e.value.key == "train.mode"


def test_a_round_keeps_each_groups_learning_rate_multiplier(tmp_path: Path) -> None:
    # train.optimizer.lr_multipliers in mode average: the schedule scales each group's own
    # peak (lr x factor), it does not reset every group to lr.
    from pipeline.train import engine
    from pipeline.train.modes.average import _LocalLoop, _Steps

    uri = make_shardset(tmp_path / "set", rows_per_shard={"train": [40]})
    shards = ShardSet.open(uri)
    cfg = TrainConfig.from_mapping({
        "dataset": uri, "mode": "average", "batch_size": 8,
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [4]}},
        "optimizer": {"name": "sgd", "lr": 0.02, "lr_multipliers": {"3.*": 3.0}},
        "lr_schedule": {"name": "cosine"},
    })  # fmt: skip
    model = engine.new_model(cfg, shards)
    optimizer = engine.new_optimizer(model, cfg)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.02, 0.06])
    loop = _LocalLoop(
        cfg, model, optimizer, torch.device("cpu"), engine.model_inputs(cfg, shards),
        task=shards.task, warmup=False,
    )  # fmt: skip
    with ShardReader(shards, "train", rank=0, world_size=1, batch_size=8) as reader:
        loop.run(reader, _Steps(first=1, count=3, total=10, epoch=0, batch=0), fault=None,
                 worker=0, attempt=0)  # fmt: skip
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert 0 < lrs[0] < 0.02 and lrs[1] == pytest.approx(3 * lrs[0])
