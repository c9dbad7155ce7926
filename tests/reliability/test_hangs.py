"""Hangs on the session's local[2] Spark: frozen ranks and ranks stuck outside collectives.

Every run must end by itself within a bound derived from ``train.timeout_s`` plus a margin:
relaunched and resumed when attempts are left, otherwise with an error that names the
timeout. Which mechanism ends it (:mod:`pipeline.runtime.timeouts`):

* two ranks, one frozen or stuck: the other one's collective timeout (``train.timeout_s``);
* one rank stuck outside collectives: its progress watchdog (``stall_limit_s``);
* one rank frozen: the driver's heartbeat check (``stall_limit_s``).

Detection time is measured from the moment the fault fired (the rank's own log record,
forwarded to the driver) to the moment the driver gave up on the attempt. No frozen or hung
process may outlive a test: each is looked for and SIGKILLed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch.fit import TrainResult, fit
from pipeline.launch.launcher import DistributedError
from pipeline.runtime.faults import FAULT_ENV
from pipeline.runtime.timeouts import stall_limit_s
from pipeline.train.config import TrainConfig
from tests.reliability.faultkit import (
    assert_same_run,
    baseline,
    descendants,
    fault_cfg,
    kill_stopped_descendants,
    poll_until,
)

TIMEOUT_S = 10
"""train.timeout_s of the two-rank runs."""
SOLO_TIMEOUT_S = 5
"""train.timeout_s of the one-rank runs (their bound is stall_limit_s of it: 15 s)."""
MARGIN_S = 45
"""Bound on what the end may take beyond its limit: Spark failing or cancelling the barrier
stage, killing the hung Python worker (spark.python.task.killTimeout and its monitor's poll),
the driver's 1 s checks and its wait for the ranks' last messages, on a loaded 2-core box."""

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def base(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult]:
    return baseline(spark, tmp_path_factory)


@pytest.fixture()
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Driver-side log records; afterwards, no faulty rank process may be left alive."""
    caplog.set_level(logging.INFO, logger="pipeline")
    try:
        yield caplog
    finally:
        stopped = kill_stopped_descendants()
        hung = _fault_pids(caplog.get_records("call")) & set(descendants(os.getpid()))
        for pid in hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not stopped, f"Spark left frozen rank processes {stopped} behind"
    assert not hung, f"Spark left hung rank processes {hung} behind"


def _fault_pids(records: list[logging.LogRecord]) -> set[int]:
    found = (re.search(r"injecting \S+ on .*\(pid (\d+)\)", r.getMessage()) for r in records)
    return {int(m.group(1)) for m in found if m}


def _when(caplog: pytest.LogCaptureFixture, text: str) -> float:
    """``time.time()`` of the one log record containing ``text``."""
    found = [r.created for r in caplog.records if text in r.getMessage()]
    assert len(found) == 1, (text, [r.getMessage() for r in caplog.records])
    return found[0]


def _detected(caplog: pytest.LogCaptureFixture, fired: str, ended: float | None = None) -> float:
    """Seconds from the fault to the attempt's end (the relaunch message, or ``ended``)."""
    end = _when(caplog, "attempt 1 of 2 failed, relaunching") if ended is None else ended
    seconds = end - _when(caplog, fired)
    print(f"{fired}: the attempt ended {seconds:.1f} s after the fault")
    return seconds


def _gone(pids: set[int]) -> bool:
    return not pids & set(descendants(os.getpid()))


def test_a_frozen_rank_is_relaunched_within_the_timeout(
    spark: Any, base: tuple[TrainConfig, TrainResult], tmp_path: Path, logs: Any
) -> None:
    """SIGSTOP rank 0 (which also hosts the process group's store) after step 6."""
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=2, timeout_s=TIMEOUT_S)
    result = fit(cfg, spark, env={FAULT_ENV: "rank=0,step=6,kind=sigstop"}, show_progress=False)
    detected = _detected(logs, "injecting sigstop on rank 0")
    assert TIMEOUT_S <= detected <= TIMEOUT_S + MARGIN_S, detected
    assert (result.attempt, result.resumed_from) == (1, 4)
    assert_same_run(cfg, base, result.epochs)
    relaunch = next(r.getMessage() for r in logs.records if "relaunching" in r.getMessage())
    assert f"rank 1 waited train.timeout_s={TIMEOUT_S:g} s" in relaunch, relaunch
    assert "no error report from rank 0 (crashed, killed or hung)" in relaunch, relaunch


def test_a_stuck_rank_fails_the_run_naming_the_timeout(
    spark: Any, base: tuple[TrainConfig, TrainResult], tmp_path: Path, logs: Any
) -> None:
    """Rank 1 blocks outside any collective after step 6 (for an hour unless killed)."""
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=1, timeout_s=TIMEOUT_S)
    with pytest.raises(DistributedError) as info:
        fit(cfg, spark, env={FAULT_ENV: "rank=1,step=6,kind=hang"}, show_progress=False)
    detected = _detected(logs, "injecting hang on rank 1", ended=time.time())
    assert TIMEOUT_S <= detected <= TIMEOUT_S + MARGIN_S, detected
    err = info.value
    assert isinstance(err, TimeoutError), repr(err)
    headline = str(err).splitlines()[0]
    assert f"train.timeout_s={TIMEOUT_S:g}" in headline and "rank 1" in headline, headline
    poll_until(lambda: _gone(_fault_pids(logs.records)), 30, "the hung rank's process exiting")


@pytest.mark.slow
def test_a_lone_stuck_rank_is_ended_by_its_watchdog(
    spark: Any, base: tuple[TrainConfig, TrainResult], tmp_path: Path, logs: Any
) -> None:
    """One rank, no peer to time out: the watchdog ends it and says where it was stuck."""
    cfg = fault_cfg(
        tmp_path, base[0].dataset, num_workers=1, max_attempts=1, timeout_s=SOLO_TIMEOUT_S
    )
    with pytest.raises(DistributedError) as info:
        fit(cfg, spark, env={FAULT_ENV: "rank=0,step=6,kind=hang"}, show_progress=False)
    limit = stall_limit_s(SOLO_TIMEOUT_S)
    detected = _detected(logs, "injecting hang on rank 0", ended=time.time())
    assert limit <= detected <= limit + MARGIN_S, detected
    err = info.value
    assert (err.rank, err.exc_type) == (0, "StallError") and isinstance(err, TimeoutError)
    assert f"train.timeout_s={SOLO_TIMEOUT_S:g} s" in str(err).splitlines()[0], str(err)
    stack = "\n".join(err.tail)
    assert "in maybe_fire" in stack and "wait" in stack, stack  # where it was stuck
    poll_until(lambda: _gone(_fault_pids(logs.records)), 30, "the stuck rank's process exiting")


@pytest.mark.slow
def test_a_lone_frozen_rank_is_cancelled_by_the_driver_and_relaunched(
    spark: Any, base: tuple[TrainConfig, TrainResult], tmp_path: Path, logs: Any
) -> None:
    """One rank, SIGSTOPped: only the driver can notice (no heartbeats), and relaunches."""
    cfg = fault_cfg(
        tmp_path, base[0].dataset, num_workers=1, max_attempts=2, timeout_s=SOLO_TIMEOUT_S
    )
    result = fit(cfg, spark, env={FAULT_ENV: "rank=0,step=6,kind=sigstop"}, show_progress=False)
    limit = stall_limit_s(SOLO_TIMEOUT_S)
    detected = _detected(logs, "injecting sigstop on rank 0")
    assert limit <= detected <= limit + MARGIN_S, detected
    relaunch = next(r.getMessage() for r in logs.records if "relaunching" in r.getMessage())
    assert "rank 0 failed with HeartbeatTimeout: sent no heartbeat" in relaunch, relaunch
    assert (result.attempt, result.resumed_from, result.world_size) == (1, 4, 1)
    assert result.steps == 2 * 20  # 625 rows on one rank: 20 batches of 32 per epoch
