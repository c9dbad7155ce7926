"""Elastic training on a real standalone cluster: lose a worker for good, go on, grow back.

A master and three one-core workers (the deploy tests' cluster); ``spark-train train`` with
``num_workers: {min: 2, max: 3}`` on 600 training rows, a per-rank batch of 4 at 3 ranks (a
global batch of 12: 6 per rank at 2). Each rank records the rows of every training batch
(:mod:`tests.recording`), and every rank of a launch holds after 10 optimizer steps until
the test lets it go, so the test knows where training stands:

1. launch 0, 3 ranks, holds after step 10 (its checkpoint written): worker 3 and everything
   it runs are SIGKILLed — a node lost for good. The launch fails;
2. the relaunch finds 2 barrier slots and resumes step 10 on 2 ranks (the epoch's remaining
   480 rows re-sharded), holds after 10 more steps; a fourth worker starts and registers;
3. at the next checkpoint boundary rank 0 learns from the driver that 3 slots are there:
   the ranks checkpoint and stop, and the run finishes on 3 ranks.

The records of the steps that count (each launch's up to where the next one resumed) hold
every training row exactly once per epoch, and the bundle's metrics record both resizes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import spark_submit_command
from tests.integration.test_standalone import (
    REGISTER_TIMEOUT_S,
    Standalone,
    _session_members,
    _signal,
    standalone_cluster,
)
from tests.recording import held, records
from tests.reliability.faultkit import poll_until
from tests.shards import make_shardset, read_split

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(900)]

TRAIN_ROWS = 600
EPOCHS = 2
HOLD_AFTER = 10  # optimizer steps of a launch before it holds
EVERY = 5  # checkpoint every this many steps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    with standalone_cluster(tmp_path_factory.mktemp("elastic") / "cluster", workers=3) as c:
        yield c


def _config(tmp: Path, dataset: str, mode: str, record_dir: Path) -> Path:
    train = {
        "dataset": dataset,
        "mode": mode,
        "model": {
            "builder": "tests.recording:recording_mlp",
            "args": {
                "record_dir": str(record_dir),
                "hold": {"0": HOLD_AFTER, "1": HOLD_AFTER},
                "hidden": [8],
            },
        },
        "num_workers": {"min": 2, "max": 3, "wait_s": 120},
        "epochs": EPOCHS,
        "batch_size": 4,
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": EVERY},
        "output": str(tmp / "model"),
        "timeout_s": 240,
        "max_attempts": 2,
        "verify": "size",
    }
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    return path


def _held(record_dir: Path, attempt: int, ranks: int) -> bool:
    found = records(record_dir, attempt)
    waiting = held(record_dir, attempt)  # past the step (and checkpoint) before the hold
    return (
        len(found) == ranks
        and waiting == set(found)
        and all(len(v) >= HOLD_AFTER for v in found.values())
    )


def _registered(cluster: Standalone, worker: str) -> bool:
    """An executor on ``worker`` told its log it registered with the driver."""
    work = cluster.root / f"work{worker.removeprefix('worker')}"
    return any(
        "Successfully registered with driver" in p.read_text(errors="replace")
        for p in work.glob("*/*/stderr")
    )


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_lost_worker_shrinks_the_run_and_a_new_one_grows_it_back(
    cluster: Standalone, tmp_path: Path, mode: str
) -> None:
    dataset = make_shardset(
        tmp_path / "set", rows_per_shard={"train": [150] * 4, "val": [60]}, seed=5
    )
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    config = _config(tmp_path, dataset, mode, record_dir)
    cmd, env = spark_submit_command(
        cluster.url,
        "train",
        "--config",
        str(config),
        conf={
            "spark.executor.cores": "1",
            "spark.cores.max": "3",
            "spark.executor.memory": "640m",
            "spark.driver.host": "127.0.0.1",
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
        },
    )
    log_path = tmp_path / "driver.log"
    with log_path.open("w") as log_file:
        driver = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-5000:]

    lost, added = ("worker3", "worker4") if "worker3" in cluster.procs else ("worker4", "worker5")
    try:
        poll_until(
            lambda: _held(record_dir, 0, 3) or driver.poll() is not None, 300, "3 ranks training"
        )
        assert driver.poll() is None, log_tail()
        assert (tmp_path / "ckpt" / f"step-{HOLD_AFTER:012d}" / "meta.json").is_file()
        cluster.kill(lost)
        (record_dir / "go-0").touch()  # the other ranks meet the lost one in a collective
        poll_until(
            lambda: _held(record_dir, 1, 2) or driver.poll() is not None, 300, "2 ranks training"
        )
        assert driver.poll() is None, log_tail()
        started = time.monotonic()
        cluster.start(added)
        cluster.wait_for_workers(3, REGISTER_TIMEOUT_S)
        poll_until(lambda: _registered(cluster, added), 120, f"an executor on {added}")
        print(f"{added} registered its executor {time.monotonic() - started:.1f} s after start")
        (record_dir / "go-1").touch()
        returncode = driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            for pid in _session_members(driver.pid):
                _signal(pid, signal.SIGKILL)
            driver.wait(10)
    output = log_tail()
    assert returncode == 0, output
    assert "steps on 3→2→3 workers" in output, output

    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    shrink, grow = metrics["resizes"]
    assert (shrink["from"], shrink["to"], shrink["step"]) == (3, 2, HOLD_AFTER)
    assert shrink["why"].startswith("failure: "), shrink
    assert (grow["from"], grow["to"]) == (2, 3) and grow["why"].startswith("grow"), grow
    assert grow["step"] % EVERY == 0 and grow["step"] >= 2 * HOLD_AFTER, grow
    _assert_every_row_once_per_epoch(dataset, record_dir, [0, shrink["step"], grow["step"]])


def _assert_every_row_once_per_epoch(dataset: str, record_dir: Path, starts: list[int]) -> None:
    """Launch ``a`` resumed at step ``starts[a]``; its steps up to ``starts[a + 1]`` count.

    Steps are replayed in order, each step's rows being the union of every rank's batch;
    an epoch is complete when it holds every row, and no row may come twice before that.
    """
    _, features, _ = read_split(dataset, "train")
    row_of = {float(v): i for i, v in enumerate(features[:, 0])}
    assert len(row_of) == TRAIN_ROWS  # the first feature identifies the row
    steps: list[list[int]] = []
    for attempt, start in enumerate(starts):
        by_rank = records(record_dir, attempt)
        end = starts[attempt + 1] if attempt + 1 < len(starts) else None
        count = (end - start) if end is not None else len(by_rank[0])
        assert all(len(v) >= count for v in by_rank.values()), (attempt, count)
        sizes = {r[0]["world"] for r in by_rank.values()}
        assert sizes == {len(by_rank)}, (attempt, sizes)
        for i in range(count):
            batch = [v for r in by_rank.values() for v in r[i]["first"]]
            steps.append([row_of[float(np.float32(v))] for v in batch])
    epochs, seen = 0, np.zeros(TRAIN_ROWS, dtype=np.int64)
    for step, rows in enumerate(steps, start=1):
        np.add.at(seen, rows, 1)
        assert seen.max() == 1, f"a row came twice in epoch {epochs} (step {step})"
        if seen.sum() == TRAIN_ROWS:
            epochs, seen = epochs + 1, np.zeros_like(seen)
    assert (epochs, int(seen.sum())) == (EPOCHS, 0), (epochs, int(seen.sum()), len(steps))
