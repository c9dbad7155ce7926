"""The whole pipeline through spark-submit on a real Spark standalone cluster.

A master and two workers (one core, 1 GiB each) are started from the pip-installed pyspark
with ``spark-class``, each in its own session so that stopping it takes its executors and
their Python workers along; ``jobs/run.py`` then runs ETL → barrier-mode training on both
workers → evaluation. Every wait is bounded, and the test fails if any process of the
cluster outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.configs import pipeline_config
from tests.conftest import spark_submit

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(900)]

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
REGISTER_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, sig)


@dataclass
class Standalone:
    """A running standalone cluster: the master's URL, its JSON endpoint, the JVM processes."""

    url: str
    ui: str
    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """The master's state as its web UI serves it (``/json/``)."""
        with urllib.request.urlopen(f"{self.ui}/json/", timeout=5) as r:
            return dict(json.load(r))

    def log_tail(self, name: str, lines: int = 40) -> str:
        text = (self.root / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                )

    def wait_for_workers(self, count: int, timeout_s: float) -> dict[str, Any]:
        """Poll the master until ``count`` workers are ALIVE; bounded by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | str = "no answer yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = self.state()
                alive = [w for w in last["workers"] if w["state"] == "ALIVE"]
                if len(alive) >= count:
                    return last
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                last = repr(err)  # the master's UI is not listening yet
            try:  # the pause between polls doubles as a liveness check of the master
                self.procs["master"].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError(f"{count} workers did not register in {timeout_s:.0f}s: {last}")

    def start(self, name: str, args: Sequence[str] = ()) -> None:
        """Start the master (``args``: its command line) or a worker (``name`` "workerN",
        one core, 1 GiB, registering with :attr:`url`) in its own session."""
        spark_home = _spark_home()
        env = dict(
            os.environ,
            SPARK_HOME=str(spark_home),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_LOG_DIR=str(self.root / "logs"),
            PYSPARK_PYTHON=sys.executable,
        )
        args = list(args)
        if name.startswith("worker"):
            work = self.root / f"work{name.removeprefix('worker')}"
            env["SPARK_WORKER_DIR"] = str(work)
            args = [
                WORKER_CLASS,
                "--host",
                "127.0.0.1",
                "--cores",
                "1",
                "--memory",
                "1g",
                "--webui-port",
                "0",
                "--work-dir",
                str(work),
                self.url,
            ]
        with open(self.root / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [str(spark_home / "bin" / "spark-class"), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,  # its own session: stop() finds every descendant
            )

    def kill(self, name: str) -> None:
        """SIGKILL a worker and everything it started (its executors, their Python workers),
        and wait until they are gone: a node lost for good."""
        proc = self.procs.pop(name)
        for pid in _session_members(proc.pid):
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)  # not our children: nothing to wait on but /proc
        assert not _session_members(proc.pid), f"{name}'s processes outlived SIGKILL"

    def stop(self) -> list[int]:
        """SIGTERM every process of every session (workers first), then SIGKILL what is left.

        Returns the processes that were still there after SIGKILL (none, or the test fails).
        """
        order = [n for n in self.procs if n != "master"] + ["master"]
        for names, sig, limit in (
            (order, signal.SIGTERM, STOP_TIMEOUT_S),
            (order, signal.SIGKILL, 10.0),
        ):
            for name in names:
                for pid in _session_members(self.procs[name].pid):
                    _signal(pid, sig)
            deadline = time.monotonic() + limit
            for name in names:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.procs[name].wait(timeout=max(deadline - time.monotonic(), 0.1))
            left = self._left(deadline)
            if not left:
                return []
        return left

    def _left(self, deadline: float) -> list[int]:
        """Processes still in the cluster's sessions, waiting for them until ``deadline``."""
        while True:
            left = [pid for p in self.procs.values() for pid in _session_members(p.pid)]
            if not left or time.monotonic() >= deadline:
                return left
            # They are not our children (executors, Python workers): nothing to wait on but
            # their entries in /proc, so poll, bounded by the deadline.
            time.sleep(0.2)


@contextmanager
def standalone_cluster(root: Path, workers: int = 2) -> Iterator[Standalone]:
    """Start a master and ``workers`` workers on 127.0.0.1; stop them all on exit."""
    root.mkdir(parents=True)
    port, ui_port = _free_port(), _free_port()
    cluster = Standalone(
        url=f"spark://127.0.0.1:{port}", ui=f"http://127.0.0.1:{ui_port}", root=root
    )
    master = [MASTER_CLASS, "--host", "127.0.0.1", "--port", str(port)]
    try:
        cluster.start("master", [*master, "--webui-port", str(ui_port)])
        # The master moves to the next port when its chosen one was taken meanwhile (Spark's
        # port retries): workers connect to the URL it actually reports.
        cluster.url = str(cluster.wait_for_workers(0, REGISTER_TIMEOUT_S)["url"])
        for i in range(1, workers + 1):
            cluster.start(f"worker{i}")
        cluster.wait_for_workers(workers, REGISTER_TIMEOUT_S)
        yield cluster
    finally:
        leaked = cluster.stop()
        assert not leaked, f"processes of the standalone cluster outlived it: {leaked}"


def test_spark_submit_runs_the_pipeline_on_a_standalone_cluster(spark: Any, tmp_path: Path) -> None:
    from preprocessing.make_data import make_data

    raw = tmp_path / "raw"
    make_data(spark, 3000, str(raw), seed=11)
    cfg = pipeline_config(tmp_path, raw, master=None, timeout_s=180, max_attempts=1)
    summary = tmp_path / "summary.json"
    with standalone_cluster(tmp_path / "cluster") as cluster:
        proc = spark_submit(
            cluster.url,
            "run",
            "--config",
            str(cfg),
            "--summary",
            str(summary),
            conf={
                "spark.executor.cores": "1",
                "spark.cores.max": "2",
                "spark.executor.memory": "768m",
                "spark.driver.host": "127.0.0.1",
                # start no job before both executors registered (the barrier stage needs 2)
                "spark.scheduler.minRegisteredResourcesRatio": "1.0",
                "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
            },
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        state = cluster.state()
        work_dirs = [cluster.root / f"work{i}" for i in (1, 2)]

    doc = json.loads(summary.read_text())
    assert (doc["status"], doc["exit_status"]) == ("succeeded", 0)
    assert [s["status"] for s in doc["stages"]] == ["ran", "ran", "ran"]
    assert doc["spark"]["master"] == cluster.url
    etl, train, _ = doc["stages"]
    assert etl["counts"]["rows_in"] == 3000 and etl["counts"]["shards"] == 6
    assert train["counts"]["world_size"] == 2 and train["counts"]["steps"] > 0
    assert 0.0 <= doc["metrics"]["accuracy"] <= 1.0 and doc["metrics"]["rows"] > 0
    assert "test metrics" in proc.stdout

    bundle = tmp_path / "model"
    for name in ("model.safetensors", "model.json", "metrics.json", "config.yaml"):
        assert (bundle / name).is_file(), name
    assert len(json.loads((bundle / "metrics.json").read_text())["epochs"]) == 1

    # The application ran on the cluster: the master lists it as finished with both cores,
    # and each worker started an executor for it (its own work directory).
    app_id = doc["spark"]["app_id"]
    [app] = [a for a in state["completedapps"] + state["activeapps"] if a["id"] == app_id]
    assert app["cores"] == 2
    for work in work_dirs:
        executors = list((work / app_id).iterdir())
        assert len(executors) == 1 and (executors[0] / "stderr").is_file(), work
