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
import yaml

from pipeline import evaluate, fit
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.train.config import TrainConfig
from pipeline.train.registry import BarrierMode, get_mode, mode_names, register_mode, registered
from tests.configs import pipeline_config
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


def test_the_registry_names_what_it_knows(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, str(tmp_path / "no-set"), mode="horovod")  # parses: see below
    # fit resolves the mode first: no shard set opened, no session, no tracking run
    with pytest.raises(ConfigError, match=r"unknown mode 'horovod'; known: 'ddp', 'fsdp'") as e:
        fit(cfg, spark=None)
    assert e.value.key == "train.mode"
    with pytest.raises(ConfigError, match="known:"):
        get_mode("horovod")
    with pytest.raises(ValueError, match="launcher"):

        class Odd(BarrierMode):
            name = "odd"
            launcher = "teleport"

        register_mode(Odd())
    assert [get_mode(n).name for n in ("ddp", "fsdp", "average")] == ["ddp", "fsdp", "average"]


def test_a_custom_mode_name_parses_where_it_is_not_registered() -> None:
    """A rank rebuilds the config from plain data before (or without) registering the mode:
    the name is checked where it is resolved (``get_mode``, on the driver), not on parsing."""
    assert "local-test" not in mode_names()
    cfg = TrainConfig.from_mapping({"mode": "local-test"})
    assert cfg.mode == "local-test" and "local-test" not in mode_names()
    assert TrainConfig.from_mapping(to_dict(cfg)) == cfg


def _train_config_file(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / "c.yaml"
    section = {"dataset": str(tmp_path / "set"), "output": str(tmp_path / "m"), "mode": mode}
    path.write_text(yaml.safe_dump({"train": section}))
    return path


def test_the_cli_and_the_worker_refuse_an_unknown_mode_before_starting(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import cli
    from pipeline import worker

    def no_session(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a Spark session was started for an unknown train.mode")

    monkeypatch.setattr(cli, "spark_session", no_session)
    config = _train_config_file(tmp_path, "horovod")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'train.mode'" in err and "unknown mode 'horovod'; known: 'ddp'" in err, err
    for rank in ("0", "1"):  # every rank of plain torchrun, before joining a process group
        monkeypatch.setenv("RANK", rank)
        assert worker.main(["--config", str(config)]) == 2
        assert "unknown mode 'horovod'" in capsys.readouterr().err
    # demo: before its Spark session and before it writes sample data
    raw, where = tmp_path / "raw", tmp_path / "demo"
    where.mkdir()
    demo = pipeline_config(where, raw, mode="horovod")
    assert cli.main(["demo", "--config", str(demo), "--rows", "100"]) == 2
    assert "unknown mode 'horovod'" in capsys.readouterr().err
    assert not raw.exists()


def test_the_estimator_refuses_an_unknown_mode_when_made(tmp_path: Path) -> None:
    from pipeline.estimator.sections import train_section

    run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown mode 'horovod'") as e:
        train_section({"mode": "horovod"}, task=None, run_dir=run_dir, dataset=run_dir)
    assert e.value.key == "train.mode"
    with registered(LocalMode()):
        made = train_section({"mode": "local-test"}, task=None, run_dir=run_dir, dataset=run_dir)
    assert made.mode == "local-test"
