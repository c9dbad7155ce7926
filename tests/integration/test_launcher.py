"""The Spark barrier launcher on the session's local[2] and on local-cluster[2,1,1024].

Functions run by the ranks live at module level: Spark's Python workers import this module
(they start in the repository root), so they are pickled by reference.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch import rendezvous as rendezvous_module
from pipeline.launch.launcher import (
    DistributedError,
    DistributedTimeoutError,
    barrier_slots,
    run_distributed,
)
from pipeline.runtime.distenv import ATTEMPT, RUN_TOKEN, TORCHRUN_VARS

DATA = Path(__file__).resolve().parents[1] / "data"
SCRIPT = str(DATA / "allreduce_script.py")
LAUNCHER_VARS = (*TORCHRUN_VARS, ATTEMPT, RUN_TOKEN)

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]

# Test order matters for speed: a rank that raises ends its Python worker, so the failure
# tests come after the ones that reuse warm workers (torch already imported), and the
# timeout test, which has its workers killed, comes last.


# -- what the ranks run --------------------------------------------------------------------


def allreduce_rank(offset: float) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from pipeline.runtime.distenv import device_and_backend

    device, backend = device_and_backend()
    dist.init_process_group(backend, init_method="env://")
    value = torch.tensor([dist.get_rank() + offset], device=device)
    dist.all_reduce(value)
    dist.destroy_process_group()
    return {
        "sum": value.item(),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in LAUNCHER_VARS},
    }


def chatty_rank(steps: int) -> int:
    from pipeline.runtime.distenv import current
    from pipeline.runtime.progress import report

    rank = current().rank
    logging.getLogger("user.train").info("hello from the training loop of rank %d", rank)
    print(f"printed by rank {rank}")
    for step in range(1, steps + 1):
        report(epoch=0, step=step, steps=steps, samples_per_s=100.0 * step, loss=1.0 / step)
    return rank


def failing_rank() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    if dist.get_rank() == 1:
        print("rank 1 reached step 3")
        raise ValueError("boom at step 3")
    dist.all_reduce(torch.zeros(1))  # rank 0 fails here, after rank 1 died


def fails_on_first_attempt() -> int:
    attempt = int(os.environ["SPARK_TRAIN_ATTEMPT"])
    if attempt == 0 and os.environ["RANK"] == "1":
        raise RuntimeError("lost an executor on attempt 0")
    return attempt


def always_fails() -> None:
    raise ArithmeticError(f"rank {os.environ['RANK']} attempt {os.environ['SPARK_TRAIN_ATTEMPT']}")


def crashes() -> None:
    if os.environ["RANK"] == "1":
        print("rank 1 is about to crash", flush=True)
        os._exit(7)  # no exception, no report: like a segfault or the OOM killer
    threading.Event().wait(60)  # Spark kills this rank once rank 1 is gone


def blocks() -> None:
    threading.Event().wait(120)  # never set: only the job timeout ends this


# -- tests ---------------------------------------------------------------------------------


def test_callable_allreduce_returns_rank_order_and_restores_env(spark: Any) -> None:
    results = run_distributed(allreduce_rank, 10.0, num_workers=2, spark=spark)
    assert [r["sum"] for r in results] == [21.0, 21.0]
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    for r in results:
        env = r["env"]
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0 and env["SPARK_TRAIN_ATTEMPT"] == "0"
        assert r["backend"] == "gloo" and r["threads"] == 1  # spark.task.cpus
    assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert len({r["env"]["SPARK_TRAIN_RUN_TOKEN"] for r in results}) == 1

    # The same (reused) Python workers run the next task without the launcher's variables.
    seen = (
        spark.sparkContext.parallelize(range(2), 2)
        .map(lambda _: [os.environ.get(k) for k in LAUNCHER_VARS])
        .collect()
    )
    assert seen == [[None] * len(LAUNCHER_VARS)] * 2


def test_rendezvous_falls_back_to_allgather(spark: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # As when a rank cannot reach the driver: the driver stops waiting at once and every
    # rank uses BarrierTaskContext.allGather.
    monkeypatch.setattr(rendezvous_module, "RENDEZVOUS_WAIT_S", 0.0)
    results = run_distributed(allreduce_rank, 1.0, num_workers=2, spark=spark)
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]


def test_logs_output_and_progress_reach_the_driver(
    spark: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    assert run_distributed(chatty_rank, 3, num_workers=2, spark=spark) == [0, 1]
    messages = [r.getMessage() for r in caplog.records]
    for rank in (0, 1):
        assert f"[rank {rank}] user.train: hello from the training loop of rank {rank}" in messages
        assert f"[rank {rank}] printed by rank {rank}" in messages
    assert "progress: epoch 0 step 3/3 loss 0.3333 300.0 samples/s" in messages


def test_more_workers_than_slots_fails_fast(spark: Any) -> None:
    assert barrier_slots(spark).slots == 2
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"num_workers=3 .* 2 barrier slot\(s\)") as info:
        run_distributed(allreduce_rank, 0.0, num_workers=3, spark=spark)
    assert time.monotonic() - start < 5
    assert "spark.task.cpus=1" in str(info.value) and "local[3]" in str(info.value)


def test_driver_only_helpers_refuse_to_run_in_a_task(spark: Any) -> None:
    def probe(which: int) -> str:
        from pipeline.serve.score import score_table

        try:
            if which == 0:
                barrier_slots()
            else:
                score_table(spark=None, bundle="b", input="i", output="o")  # type: ignore[arg-type]
        except RuntimeError as err:
            return str(err)
        return "no error"

    slots, scoring = spark.sparkContext.parallelize([0, 1], 2).map(probe).collect()
    assert "driver-only" in slots and "barrier_slots" in slots
    assert "driver-only" in scoring and "pipeline.serve.score.score_table" in scoring


def test_torchrun_script_exit_codes(spark: Any) -> None:
    assert run_distributed(SCRIPT, num_workers=2, spark=spark) == [0, 0]
    with pytest.raises(DistributedError) as info:
        run_distributed(SCRIPT, "--exit-code", "3", num_workers=2, spark=spark)
    err = info.value
    assert err.rank == 1 and "exited with code 3" in str(err)
    assert "rank 1/2 all_reduce sum=3" in err.tail and "rank 1 exiting with code 3" in err.tail


def test_relaunch_after_a_failed_attempt(spark: Any) -> None:
    assert run_distributed(fails_on_first_attempt, num_workers=2, spark=spark, max_attempts=2) == [
        1,
        1,
    ]
    with pytest.raises(RuntimeError, match="lost an executor on attempt 0"):
        run_distributed(fails_on_first_attempt, num_workers=2, spark=spark, max_attempts=1)


def test_all_attempts_failing_lists_each_cause(spark: Any) -> None:
    with pytest.raises(DistributedError) as info:
        run_distributed(always_fails, num_workers=2, spark=spark, max_attempts=2)
    err = info.value
    lines = str(err).splitlines()
    assert lines[0] == "all 2 attempts failed:"
    assert "attempt 0:" in lines[1] and "ArithmeticError" in lines[1] and "attempt 0 (" in lines[1]
    assert "attempt 1:" in lines[2] and "ArithmeticError" in lines[2] and "attempt 1 (" in lines[2]
    assert [e.attempt for e in err.attempts] == [0, 1] and isinstance(err, ArithmeticError)


def test_rank_error_names_rank_type_and_traceback(spark: Any) -> None:
    with pytest.raises(ValueError, match="boom at step 3") as info:
        run_distributed(failing_rank, num_workers=2, spark=spark)
    err = info.value
    assert isinstance(err, DistributedError) and err.rank == 1 and err.exc_type == "ValueError"
    text = str(err)
    assert text.startswith("rank 1 failed with ValueError: boom at step 3")
    assert "Traceback (most recent call last):" in text
    assert 'raise ValueError("boom at step 3")' in text and "rank 1 reached step 3" in text


def test_a_crashed_rank_is_named_from_sparks_error(spark: Any) -> None:
    with pytest.raises(DistributedError) as info:
        run_distributed(crashes, num_workers=2, spark=spark, timeout_s=60)
    err = info.value
    assert err.rank == 1 and "Python worker exited unexpectedly" in str(err)
    assert err.tail[0] == "rank 1 is about to crash"


def test_whole_job_timeout_cancels_and_names_it(spark: Any) -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError, match=r"timeout_s=5 ") as info:
        run_distributed(blocks, num_workers=2, spark=spark, timeout_s=5)
    elapsed = time.monotonic() - start
    assert 5 <= elapsed < 40, elapsed
    assert isinstance(info.value, TimeoutError) and "cancelled" in str(info.value)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_cluster_two_executor_jvms(subprocess_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(DATA / "cluster_driver.py")],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    results = found["results"]
    assert [r["rank"] for r in results] == [0, 1] and {r["sum"] for r in results} == {3.0}
    assert results[0]["pid"] != results[1]["pid"]  # two executors, two Python workers
    assert {r["local_world_size"] for r in results} == {2}  # both executors on 127.0.0.1
    assert (found["slots"], found["executors"]) == (2, 2)
    assert "2 barrier slot(s)" in found["too_many"]
    assert "spark.executor.instances" in found["too_many"]
    assert found["fail_s"] < 5
