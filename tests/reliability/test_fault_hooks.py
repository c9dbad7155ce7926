"""The fault hooks and the bounds of pipeline.runtime.timeouts, in real processes but without Spark.

Quick checks of the pieces the Spark scenarios (test_training_faults, test_hangs,
test_process_faults) rely on: a checkpoint write killed between its files, the watchdog
ending a stuck process, timeout errors that name train.timeout_s, and the driver's choice of
the first real cause when the culprit reported nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.launch import errors, launcher
from pipeline.runtime import progress
from pipeline.runtime.faults import (
    EXIT_CODE,
    FAULT_ENV,
    Fault,
    InjectedFault,
    executor_jvm_pid,
    parse_fault,
)
from pipeline.runtime.timeouts import (
    STALL_EXIT_CODE,
    CollectiveTimeoutError,
    naming_timeout,
    stall_limit_s,
)
from pipeline.train.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _python(
    code: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_fault_specs_for_every_kind() -> None:
    assert parse_fault("rank=1,step=6,attempt=*,kind=raise") == Fault(1, 6, None, "raise")
    assert parse_fault("rank=0,step=2,kind=hang,seconds=1.5") == Fault(0, 2, 0, "hang", 1.5)
    for kind in ("sigkill", "sigstop", "kill-executor", "checkpoint-exit"):
        assert parse_fault(f"rank=0,step=1,kind={kind}") == Fault(0, 1, 0, kind)
    with pytest.raises(ValueError, match="attempt an integer or"):
        parse_fault("rank=0,step=1,attempt=any")
    with pytest.raises(ValueError, match="kind must be one of raise, exit, sigkill"):
        parse_fault("rank=0,step=1,kind=segfault")
    every = Fault(rank=1, step=6, attempt=None)
    for attempt in (0, 3):
        with pytest.raises(InjectedFault, match=f"step 6, attempt {attempt}"):
            every.maybe_fire(rank=1, step=6, attempt=attempt)
    Fault(0, 1, 0, "checkpoint-exit").maybe_fire(rank=0, step=1, attempt=0)  # not a step kind


def test_kill_executor_refuses_a_process_outside_an_executor() -> None:
    with pytest.raises(InjectedFault, match="no CoarseGrainedExecutorBackend JVM"):
        executor_jvm_pid()


def test_a_crash_between_checkpoint_files_leaves_the_previous_one(tmp_path: Path) -> None:
    code = f"""
        from pipeline.train.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(4, {{"step": 4}})
        mgr.save(8, {{"step": 8}})
        raise SystemExit("the fault did not fire")
    """
    proc = _python(code, {FAULT_ENV: "rank=0,step=8,kind=checkpoint-exit", "RANK": "0"})
    assert proc.returncode == EXIT_CODE, proc.stderr
    half, done = sorted(tmp_path.iterdir())  # "." sorts first
    assert done.name == "step-000000000004"
    assert half.name.startswith(".tmp-") and half.name.endswith("step-000000000008")
    assert [p.name for p in half.iterdir()] == ["state.pt"]  # meta.json never written
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.latest_step() == 4 and mgr.load() == {"step": 4}
    mgr.save(8, {"step": 8})  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000000004",
        "step-000000000008",
    ]


@pytest.mark.parametrize("beating", [False, True], ids=["stuck", "beating"])
def test_the_watchdog_ends_only_a_stuck_process(beating: bool) -> None:
    # The limit is shortened for the test; everything else is the real watchdog thread.
    code = f"""
        import logging, threading, time
        from pipeline.runtime import timeouts
        logging.basicConfig()
        timeouts.stall_limit_s = lambda timeout_s: 0.5
        with timeouts.watchdog(3, 0.2):
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                if {beating}:
                    timeouts.beat()
                threading.Event().wait(0.1)
    """
    start = time.monotonic()
    proc = _python(code, {})
    if beating:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert time.monotonic() - start < 20
    assert "rank 3 made no progress" in proc.stderr and "train.timeout_s=0.2 s" in proc.stderr


def test_stall_limit_leaves_collective_timeouts_time_to_fire_first() -> None:
    assert stall_limit_s(10) == 20 and stall_limit_s(600) == 750


def test_backend_timeouts_name_the_setting() -> None:
    gloo = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation"
    )
    with pytest.raises(CollectiveTimeoutError) as info, naming_timeout(1, 10):
        raise gloo
    assert str(info.value).startswith("rank 1 waited train.timeout_s=10 s for the other ranks")
    assert info.value.__cause__ is gloo
    for other in (RuntimeError("timeout_s must be > 0"), ValueError("gloo timed out")):
        with pytest.raises(type(other)) as raw, naming_timeout(0, 10):
            raise other
        assert raw.value is other


def _collector(*failures: launcher._Failure) -> launcher._Collector:
    collector = launcher._Collector(progress.ProgressDisplay(enabled=False), ranks=2)
    collector.failures.extend(failures)
    return collector


def test_a_rank_that_reported_nothing_is_the_cause_of_its_peers_errors() -> None:
    peer = launcher._Failure(1, "RuntimeError", "builtins", "Connection closed by peer", [])
    crashed = RuntimeError(
        "Job aborted due to stage failure: Could not recover from a failed barrier ResultStage."
        " Most recent failure reason: Stage failed because barrier task ResultTask(3, 0) "
        "finished unsuccessfully.\norg.apache.spark.SparkException: Python worker exited "
        "unexpectedly (crashed)\n\tat org.apache.spark.Foo(Foo.scala:1)"
    )
    err = launcher._attempt_error(_collector(peer), crashed, attempt=0)
    assert (err.rank, err.exc_type) == (0, "SparkException"), str(err)
    assert "Python worker exited unexpectedly" in str(err)
    assert "also failed after it: rank 1 RuntimeError" in str(err)
    # Spark saw only the peer fail (the culprit is hung): the peer's error, naming the silent.
    timeout = launcher._Failure(
        1, "CollectiveTimeoutError", "pipeline.runtime.timeouts", "waited", []
    )
    peer_only = RuntimeError(crashed.args[0].replace("ResultTask(3, 0)", "ResultTask(3, 1)"))
    err = launcher._attempt_error(_collector(timeout), peer_only, attempt=0)
    assert (err.rank, err.exc_type) == (1, "CollectiveTimeoutError")
    assert "no error report from rank 0 (crashed, killed or hung)" in str(err)
    assert isinstance(err, TimeoutError)


def test_a_lost_executor_is_named_from_sparks_reason() -> None:
    text = (
        "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe."
        "\n: org.apache.spark.SparkException: Job aborted due to stage failure: Could not "
        "recover from a failed barrier ResultStage. Most recent failure reason: Stage failed "
        "because barrier task ResultTask(1, 1) finished unsuccessfully.\nExecutorLostFailure "
        "(executor 1 exited caused by one of the running tasks) Reason: Command exited with "
        "code 137\nDriver stacktrace:\n\tat org.apache.spark.Foo(Foo.scala:1)"
    )
    err = errors.from_spark_error(RuntimeError(text), attempt=0)
    assert (err.rank, err.exc_type) == (1, "ExecutorLostFailure")
    assert err.exc_message.endswith("Reason: Command exited with code 137")
