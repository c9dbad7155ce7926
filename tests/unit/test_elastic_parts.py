"""The parts of elastic training and preemption, one at a time (the whole: test_elastic.py).

The config range and its world sizes, the launch size against the real local[2] session's
barrier slots (waiting, then failing with the slot arithmetic), growing, a checkpoint's
entries at another world size, SIGTERM turned into a flag, and the stop agreement.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch

from pipeline.core.configbase import ConfigError
from pipeline.launch.elastic import Elastic, can_grow, launch_size, planned_stop
from pipeline.launch.errors import DistributedError
from pipeline.runtime import preempt
from pipeline.train import elastic
from pipeline.train.collectives import SingleProcess
from pipeline.train.config import TrainConfig, WorkersConfig


def _cfg(**over: Any) -> TrainConfig:
    return TrainConfig.from_mapping({"batch_size": 64, **over})


# -- config ------------------------------------------------------------------------------------
def test_a_range_allows_the_sizes_that_divide_the_global_batch() -> None:
    cfg = _cfg(num_workers={"min": 2, "max": 8})
    assert cfg.elastic and isinstance(cfg.num_workers, WorkersConfig)
    assert (cfg.min_workers, cfg.max_workers, cfg.global_batch) == (2, 8, 512)
    assert cfg.world_sizes() == (8, 4, 2)  # 7, 6, 5 and 3 do not divide 512
    assert [cfg.rank_batch(w) for w in cfg.world_sizes()] == [64, 128, 256]
    fixed = _cfg(num_workers=3)
    assert not fixed.elastic and fixed.world_sizes() == (3,) and fixed.rank_batch(3) == 64


@pytest.mark.parametrize(
    ("value", "key", "message"),
    [
        ({"min": 0, "max": 2}, "train.num_workers.min", "must be >= 1"),
        ({"min": 3, "max": 2}, "train.num_workers.max", "must be >= train.num_workers.min"),
        ({"min": 1, "wait_s": -1}, "train.num_workers.wait_s", "must be >= 0"),
        ({"mn": 1}, "train.num_workers.mn", "unknown key"),
        (0, "train.num_workers", "must be >= 1"),
        ("four", "train.num_workers", "does not fit int | mapping"),
    ],
)
def test_a_bad_range_names_its_key(value: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(num_workers=value)
    assert info.value.key == key


def test_a_world_size_outside_the_range_is_refused_naming_the_sizes() -> None:
    cfg = _cfg(num_workers={"min": 2, "max": 4})
    elastic.check_world_size(cfg, 2)
    with pytest.raises(ConfigError, match=r"this run has 3 ranks; the range allows 4, 2"):
        elastic.check_world_size(cfg, 3)


def test_the_schedule_counts_steps_at_the_largest_world() -> None:
    cfg = _cfg(num_workers={"min": 2, "max": 3})
    assert elastic.schedule_steps(cfg, 1000, reader_steps=999) == 6  # 333 rows / 64
    assert elastic.schedule_steps(_cfg(num_workers=2), 1000, reader_steps=8) == 8


# -- launcher ----------------------------------------------------------------------------------
@pytest.mark.spark
def test_a_launch_takes_the_largest_size_the_slots_hold(spark: Any) -> None:
    assert launch_size(spark, Elastic(sizes=(4, 2, 1))) == 2  # local[2]: 2 slots


@pytest.mark.spark
def test_too_few_slots_for_longer_than_the_wait_fails_naming_them(spark: Any) -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launch_size(spark, Elastic(sizes=(4, 3), wait_s=0.5))
    waited = time.monotonic() - start
    assert 0.5 <= waited < 5, waited
    message = str(info.value)
    assert "needs at least 3 ranks (the world sizes it allows: 4, 3)" in message, message
    assert "but the cluster has 2 barrier slot(s)" in message, message
    assert "train.num_workers.wait_s=0.5 s" in message, message


@pytest.mark.spark
def test_the_driver_grows_a_run_only_into_slots_it_has(spark: Any) -> None:
    sizes = Elastic(sizes=(4, 2, 1))
    assert can_grow(spark, sizes, 1)  # 2 slots hold 2 ranks
    assert not can_grow(spark, sizes, 2)  # 4 do not fit
    assert not can_grow(spark, Elastic(sizes=(2,)), 1)  # a fixed size never grows


def test_planned_stops_are_counted_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    stops = Elastic(sizes=(2,), stopped=lambda results: results[0].get("stopped"))
    assert planned_stop(stops, [{"stopped": None}], 0) == (0, None)
    assert planned_stop(stops, [{"stopped": "preempted"}], 0) == (1, "preempted")
    monkeypatch.setattr("pipeline.launch.elastic.MAX_PLANNED", 3)
    with pytest.raises(DistributedError, match="stopped on purpose 4 times"):
        planned_stop(stops, [{"stopped": "grow"}], 3)


@pytest.mark.parametrize("sizes", [(), (2, 3), (2, 2), (0,)])
def test_elastic_sizes_are_distinct_positive_and_largest_first(sizes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Elastic\.sizes"):
        Elastic(sizes=sizes)


# -- inside the ranks ---------------------------------------------------------------------------
def _entry(loss: float, rows: int, seconds: float) -> dict[str, Any]:
    reader = {"epoch": 1, "batches_in_epoch": 5, "world_size": 3, "batch_size": 4, "seed": 0}
    return {
        "reader": reader,
        "rng": {"r": 1},
        "loss_sum": loss,
        "loss_rows": rows,
        "epoch_seconds": seconds,
    }


def test_a_checkpoint_of_three_ranks_resumes_on_two() -> None:
    ranks = [_entry(1.0, 20, 3.0), _entry(2.0, 20, 4.0), _entry(4.0, 20, 2.0)]
    assert elastic.rank_entry(ranks, 1, 3) == ranks[1]  # the same world: its own entry
    first, second = (elastic.rank_entry(ranks, r, 2) for r in (0, 1))
    assert (first["loss_sum"], first["loss_rows"]) == (7.0, 60)  # the epoch's sums, once
    assert (second["loss_sum"], second["loss_rows"]) == (0.0, 0)
    assert first["reader"] == second["reader"] == ranks[0]["reader"]
    assert first["rng"] is None and first["epoch_seconds"] == 4.0


def test_reseeding_depends_on_seed_step_and_rank() -> None:
    draws = []
    for key in [(0, 10, 1), (0, 10, 1), (0, 10, 0), (0, 11, 1), (1, 10, 1)]:
        elastic.reseed(*key)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
    assert all(not torch.equal(draws[0], d) for d in draws[2:])


def test_resize_records_say_when_from_to_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_TRAIN_LAUNCH_REASON", "failure: rank 2 lost")
    record = elastic.resize_record(step=10, epoch=0, old=3, new=2)
    assert {k: record[k] for k in ("step", "epoch", "from", "to", "why")} == {
        "step": 10,
        "epoch": 0,
        "from": 3,
        "to": 2,
        "why": "failure: rank 2 lost",
    }
    assert record["time"].endswith("+00:00")


def test_sigterm_becomes_a_flag_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with preempt.notice() as notice:
        assert not notice.received
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.received and notice.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_stopper_stops_on_a_notice_and_grows_only_at_a_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = []
    monkeypatch.setattr(preempt, "more_slots", lambda: asked.append(1) or True)
    notice = preempt.Notice()
    growing = elastic.Stopper(SingleProcess(), notice, can_grow=True)
    assert growing.check(boundary=False) is None and not asked  # no question between them
    assert growing.check(boundary=True) == elastic.GROW and len(asked) == 1
    fixed = elastic.Stopper(SingleProcess(), notice, can_grow=False)
    assert fixed.check(boundary=True) is None and len(asked) == 1
    notice.signal = signal.SIGTERM
    assert fixed.check(boundary=False) == elastic.PREEMPTED
