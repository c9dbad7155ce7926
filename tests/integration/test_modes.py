"""A training mode is one class and one registry entry: registered here, in the tests only.

``LocalMode`` trains one process without a process group (the defaults of
:class:`~pipeline.train.registry.BarrierMode`). It goes through the normal ``fit`` path —
preflight, the barrier launcher, the shared loop, checkpoints, the bundle — without touching
a product file, and since one DDP rank averages its gradient with nobody, it must end with
exactly the weights of ``ddp`` on one worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipeline import evaluate, fit
from pipeline.core.configbase import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.registry import BarrierMode, get_mode, mode_names, register_mode, registered
from tests.integration.test_training import _assert_same_weights, _cfg, _untimed, _weights
from tests.shards import make_shardset

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


class LocalMode(BarrierMode):
    """One rank, no process group, no wrapper: the plainest barrier mode there is."""

    name: ClassVar[str] = "local-test"
    process_group: ClassVar[bool] = False


def _local_cfg(tmp: Path, dataset: str, mode: str) -> TrainConfig:
    return _cfg(tmp / mode, dataset, mode=mode, num_workers=1, epochs=2)


def test_a_mode_registered_in_the_tests_trains_through_fit(spark: Any, tmp_path: Path) -> None:
    dataset = make_shardset(
        tmp_path / "set", rows_per_shard={"train": [90, 70], "val": [40]}, seed=5
    )
    assert "local-test" not in mode_names()
    with registered(LocalMode()):
        assert "local-test" in mode_names()
        local_cfg = _local_cfg(tmp_path, dataset, "local-test")
        local = fit(local_cfg, spark)
    assert "local-test" not in mode_names()  # the registration ended with the block
    ddp_cfg = _local_cfg(tmp_path, dataset, "ddp")
    ddp = fit(ddp_cfg, spark)
    assert local.world_size == ddp.world_size == 1 and local.steps == ddp.steps > 0
    assert local.final["val_loss"] < local.epochs[0]["train_loss"]  # it learned something
    assert _untimed(local.epochs) == _untimed(ddp.epochs)
    _assert_same_weights(_weights(local_cfg), _weights(ddp_cfg))
    # The bundle is an ordinary one: it evaluates like any other.
    assert evaluate(local.bundle, split="val")["rows"] == 40


def test_mode_checks_run_before_launch(spark: Any, tmp_path: Path) -> None:
    dataset = make_shardset(tmp_path / "set", rows_per_shard={"train": [20]}, seed=1)
    with registered(LocalMode()), pytest.raises(ConfigError) as e:
        fit(_cfg(tmp_path, dataset, mode="local-test", num_workers=2), spark)
    assert e.value.key == "train.num_workers" and "without a process group" in str(e.value)


def test_the_registry_names_what_it_knows() -> None:
    with pytest.raises(ConfigError, match=r"unknown mode 'horovod'; known: 'ddp', 'fsdp'") as e:
        TrainConfig.from_mapping({"mode": "horovod"})
    assert e.value.key == "train.mode"
    with pytest.raises(ConfigError, match="known:"):
        get_mode("horovod")
    with pytest.raises(ValueError, match="launcher"):

        class Odd(BarrierMode):
            name = "odd"
            launcher = "teleport"

        register_mode(Odd())
    assert [get_mode(n).name for n in ("ddp", "fsdp", "average")] == ["ddp", "fsdp", "average"]
