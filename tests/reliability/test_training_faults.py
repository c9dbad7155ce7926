"""Faults during training on the session's local[2] Spark: real ranks, real checkpoints.

Each fault ends in a completed run whose weights are bitwise equal to the fault-free
baseline (CPU, fixed seed), or — when every attempt fails — in an error listing each
attempt's cause. ``kind=exit`` (``os._exit``) is covered by
``tests/integration/test_training.py::test_spark_relaunch_after_a_hard_crash_resumes_exactly``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch.fit import TrainResult, fit
from pipeline.launch.launcher import DistributedError
from pipeline.runtime.faults import FAULT_ENV
from pipeline.train.config import TrainConfig
from tests.reliability.faultkit import assert_same_run, baseline, fault_cfg

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def base(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult]:
    return baseline(spark, tmp_path_factory)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    ("fault", "resumed_from", "cause"),
    [
        # An exception mid-epoch: the relaunch resumes from the checkpoint of step 4.
        ("rank=1,step=6,kind=raise", 4, "rank 1 failed with InjectedFault"),
        # The Python worker of rank 0 (which writes checkpoints) SIGKILLed on the last step
        # of epoch 0, before that epoch's checkpoint: resumes from step 8.
        ("rank=0,step=10,kind=sigkill", 8, "rank 0 failed with"),
        # Rank 0 dies between state.pt and meta.json of step 12: that half-written
        # checkpoint is ignored and the epoch-end one of step 10 is used.
        ("rank=0,step=12,kind=checkpoint-exit", 10, "rank 0 failed with"),
    ],
    ids=["raise", "sigkill", "checkpoint-exit"],
)
def test_a_failed_rank_is_relaunched_and_resumes_bitwise(
    spark: Any,
    base: tuple[TrainConfig, TrainResult],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    resumed_from: int,
    cause: str,
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=2)
    result = fit(cfg, spark, env={FAULT_ENV: fault}, show_progress=False)
    assert (result.attempt, result.resumed_from) == (1, resumed_from)
    assert_same_run(cfg, base, result.epochs)
    relaunch = [m for m in _messages(caplog) if "attempt 1 of 2 failed, relaunching" in m]
    assert len(relaunch) == 1 and cause in relaunch[0], relaunch
    if "checkpoint-exit" in fault:
        assert any(
            "an unfinished checkpoint write" in m and ".tmp-" in m and "step-000000000012" in m
            for m in _messages(caplog)
        ), "the relaunch did not see (and skip) the half-written checkpoint"
        leftovers = [p.name for p in Path(cfg.checkpoint.dir).iterdir() if p.name.startswith(".")]
        assert leftovers == []  # the next save pruned it


def test_a_fault_in_every_attempt_fails_with_each_attempts_cause(
    spark: Any, base: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    """More failures than train.max_attempts (the launcher-level proof is
    ``test_launcher.py::test_all_attempts_failing_lists_each_cause``)."""
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=2)
    env = {FAULT_ENV: "rank=1,step=6,attempt=*,kind=raise"}
    with pytest.raises(DistributedError) as info:
        fit(cfg, spark, env=env, show_progress=False)
    err = info.value
    lines = str(err).splitlines()
    assert lines[0] == "all 2 attempts failed:"
    for attempt in (0, 1):
        assert lines[1 + attempt].startswith(
            f"  attempt {attempt}: rank 1 failed with InjectedFault: {FAULT_ENV}: injected "
            f"failure on rank 1 at optimizer step 6, attempt {attempt}"
        ), lines
    assert [e.attempt for e in err.attempts] == [0, 1]
    assert all(e.rank == 1 and e.exc_type == "InjectedFault" for e in err.attempts)
    assert "Traceback" in "\n".join(err.tail)


def test_sigterm_checkpoints_at_the_next_step_boundary_and_resumes_bitwise(
    spark: Any,
    base: tuple[TrainConfig, TrainResult],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A preemption notice: SIGTERM to rank 1's process right after optimizer step 6.

    Both ranks agree at that step boundary, rank 0 writes a checkpoint of step 6 (not a
    regular one: those are every 4 steps), every rank returns, and the launcher relaunches
    without counting a failed attempt (``max_attempts: 1``); the run ends bitwise equal to
    the uninterrupted one, with no step lost.
    """
    caplog.set_level(logging.INFO, logger="pipeline")
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=1)
    result = fit(cfg, spark, env={FAULT_ENV: "rank=1,step=6,kind=sigterm"}, show_progress=False)
    assert (result.attempt, result.resumed_from) == (1, 6)
    assert_same_run(cfg, base, result.epochs)
    stops = [m for m in _messages(caplog) if "stopped at a step boundary" in m]
    assert len(stops) == 1 and "preempted: SIGTERM" in stops[0], stops
    assert result.resizes == []  # the same two ranks came back
