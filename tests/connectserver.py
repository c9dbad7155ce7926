"""A real Spark Connect server for the tests: pyspark's ``sbin/start-connect-server.sh``.

Started in the foreground (``--wait``) in its own process group on 127.0.0.1 and a free
port, ready once the port accepts connections, stopped by ending that process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect_server"]

REPO = Path(__file__).resolve().parents[1]
_START_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def connect_server(work: Path, master: str = "local[2]") -> Iterator[str]:
    """Run a Connect server on ``master``; yield its ``sc://127.0.0.1:PORT`` URL."""
    import pyspark

    home = Path(pyspark.__file__).resolve().parent
    port = _free_port()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        SPARK_HOME=str(home),
        SPARK_LOG_DIR=str(work),
        SPARK_PID_DIR=str(work),
        SPARK_LOCAL_IP="127.0.0.1",
        PYSPARK_PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
    )
    conf = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": "4",
        "spark.sql.session.timeZone": "UTC",
    }
    cmd = ["bash", str(home / "sbin" / "start-connect-server.sh"), "--wait", "--master", master]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    log = (work / "server.log").open("ab")
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + _START_S
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Spark Connect server did not start (see {work / 'server.log'})"
                )
            time.sleep(0.2)  # polling the port: the server has no readiness signal
        yield f"sc://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
