"""Faults that take out whole processes of a Spark application: an executor JVM, the driver.

Each runs its own Spark application in a subprocess (one Python process holds one
SparkContext) and must end bitwise equal to the fault-free local[2] baseline. The
killed-executor run is also the suite's check that separate executor JVMs train the same
weights as local[2] with the same seed and threads: every step of it, before and after the
kill, ran on local-cluster executors (test_standalone.py trains on a standalone cluster but
compares no weights).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.configbase import to_dict
from pipeline.launch.fit import TrainResult
from pipeline.runtime.faults import FAULT_ENV
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from tests.conftest import spark_submit
from tests.reliability.faultkit import (
    assert_same_run,
    baseline,
    fault_cfg,
    poll_until,
    session_members,
)

pytestmark = [pytest.mark.spark, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(420)]

SPARK_TRAIN = str(Path(sys.executable).parent / "spark-train")
LOCAL_SPARK = {
    "master": "local[2]",
    "conf": {
        "spark.ui.enabled": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
    },
}


@pytest.fixture(scope="module")
def base(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult]:
    return baseline(spark, tmp_path_factory)


def test_a_killed_executor_jvm_is_replaced_and_the_run_resumes_bitwise(
    base: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    """local-cluster[2,1,1024]: rank 1 SIGKILLs its own executor JVM after step 6."""
    cfg = fault_cfg(tmp_path, base[0].dataset, max_attempts=2)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"train": to_dict(cfg)}))
    fault = {"spark.executorEnv." + FAULT_ENV: "rank=1,step=6,kind=kill-executor"}
    proc = spark_submit(
        "local-cluster[2,1,1024]", "train", "--config", str(conf), conf=fault, timeout=360
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "injecting kill-executor on rank 1 at optimizer step 6" in output, output[-4000:]
    assert "attempt 1 of 2 failed, relaunching" in output, output[-4000:]
    trained = "trained 2 epoch(s), 20 steps on 2 workers (attempt 2, resumed from step 4)"
    assert trained in proc.stdout, output[-4000:]
    assert_same_run(cfg, base)
    relaunch = next(line for line in output.splitlines() if "relaunching" in line)
    print(relaunch)


def test_a_killed_driver_leaves_no_ranks_and_resume_is_bitwise(
    base: tuple[TrainConfig, TrainResult], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """SIGKILL `spark-train train` between the checkpoints of steps 4 and 8, then --resume.

    Rank 1 is held in a hang after step 6, so the kill lands between checkpoints for sure.
    Every process of the killed application (its JVM, Python workers, ranks) must exit by
    itself: an orphaned rank would go on writing checkpoints under the resumed run.
    """
    cfg = fault_cfg(tmp_path, base[0].dataset)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"spark": LOCAL_SPARK, "train": to_dict(cfg)}))
    log_path = tmp_path / "first-run.log"
    env = dict(subprocess_env, **{FAULT_ENV: "rank=1,step=6,kind=hang"})
    with log_path.open("w") as log_file:
        driver = subprocess.Popen(
            [SPARK_TRAIN, "train", "--config", str(conf)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its session id is its pid: how its processes are found
        )
    try:
        poll_until(
            lambda: "injecting hang on rank 1" in log_path.read_text() or driver.poll() is not None,
            240,
            "rank 1 reaching step 6",
        )
        assert driver.poll() is None, log_path.read_text()[-4000:]
        started = session_members(driver.pid)  # the driver, its JVM, Python daemon and ranks
        assert len(started) >= 4, started
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        seconds = poll_until(
            lambda: not session_members(driver.pid), 60, "the killed driver's processes exiting"
        )
        print(
            f"the killed driver's {len(started) - 1} processes were gone {seconds:.1f} s after it"
        )
    finally:
        for pid in session_members(driver.pid):  # only what the test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert CheckpointManager(cfg.checkpoint.dir).steps() == [4]

    resumed = subprocess.run(
        [SPARK_TRAIN, "train", "--config", str(conf), "--resume"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "(attempt 1, resumed from step 4)" in resumed.stdout, resumed.stdout
    assert_same_run(cfg, base)
