"""Task side of the launcher: one rank's environment, execution and failure report.

:mod:`pipeline.launch.launcher` gathers a :class:`RankInfo` from every barrier task, and each task
then calls :func:`rank_environment` (pure: the torchrun variables, device and threads for one
rank) and :func:`run_rank`, which runs the target with that environment applied, streams
its logs and output to the driver, and on failure sends a report (exception type, message,
the last lines of output and traceback) before re-raising — so the driver can tell the
first real cause from the failures it set off in other ranks.

Spark-free, so it is unit-tested without a SparkSession.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.runtime import distenv, logchannel, progress
from pipeline.runtime.threads import torch_threads

__all__ = [
    "TAIL_LINES",
    "RankInfo",
    "RankSpec",
    "ScriptError",
    "failure_reports",
    "free_port",
    "physical_gpus",
    "rank_environment",
    "report_failure",
    "run_rank",
]

log = logging.getLogger(__name__)

TAIL_LINES = 50
"""Lines of a failed rank's output and traceback that reach the driver's error."""
_GPU_SETTING = "spark.task.resource.gpu.amount"


class ScriptError(RuntimeError):
    """A script rank's child process exited with a nonzero code."""

    def __init__(self, path: str, returncode: int) -> None:
        super().__init__(f"{path} exited with code {returncode}")
        self.returncode = returncode


@dataclass(frozen=True, kw_only=True)
class RankSpec:
    """What every rank runs: a callable with arguments, or a script path with its argv."""

    target: Callable[..., Any] | str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for every rank (applied after the launcher's own)."""


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    """What one task tells the others at rendezvous."""

    host: str
    gpus: tuple[str, ...] = ()
    """Physical GPU ids Spark assigned this task (mapped through CUDA_VISIBLE_DEVICES)."""
    port: int = 0
    """A free port on this host; only rank 0's is used."""

    def to_json(self) -> str:
        """Encode for ``BarrierTaskContext.allGather``."""
        return json.dumps({"host": self.host, "gpus": list(self.gpus), "port": self.port})

    @classmethod
    def from_json(cls, text: str) -> RankInfo:
        """Decode one rank's allGather message."""
        data = json.loads(text)
        return cls(host=data["host"], gpus=tuple(data["gpus"]), port=int(data["port"]))


def free_port(host: str) -> int:
    """A port that was free on ``host`` a moment ago (the usual, unavoidably racy, probe)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def physical_gpus(addresses: Sequence[str], visible: str | None) -> tuple[str, ...]:
    """Map Spark's GPU addresses to ids valid in CUDA_VISIBLE_DEVICES.

    If the executor already runs with CUDA_VISIBLE_DEVICES (a container, a resource manager),
    an address that is one of its entries is kept, and an address that is a position in it
    (``0`` … ``n-1``) is replaced by that entry; otherwise addresses are used as they are.
    """
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    mapped = []
    for address in addresses:
        if entries and address not in entries and address.isdigit() and int(address) < len(entries):
            mapped.append(entries[int(address)])
        else:
            mapped.append(address)
    return tuple(mapped)


def rank_environment(
    rank: int,
    infos: Sequence[RankInfo],
    *,
    cpus: int,
    attempt: int,
    run_token: str,
    log_addr: str,
) -> dict[str, str]:
    """The environment of ``rank``, given every rank's :class:`RankInfo` in rank order.

    LOCAL_RANK / LOCAL_WORLD_SIZE count the ranks that share this rank's host. With GPUs,
    CUDA_VISIBLE_DEVICES lists the GPUs of this host's ranks in local-rank order, so
    ``cuda:LOCAL_RANK`` is this rank's own GPU — as under torchrun.
    """
    host = infos[rank].host
    same_host = [r for r, info in enumerate(infos) if info.host == host]
    local_rank = same_host.index(rank)
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(len(infos)),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(len(same_host)),
        "MASTER_ADDR": infos[0].host,
        "MASTER_PORT": str(infos[0].port),
        distenv.ATTEMPT: str(attempt),
        distenv.RUN_TOKEN: run_token,
        distenv.LOG_ADDR: log_addr,
        "OMP_NUM_THREADS": str(cpus),
    }
    env.update(_device_environment(infos, same_host, local_rank))
    return env


def _device_environment(
    infos: Sequence[RankInfo], same_host: list[int], local_rank: int
) -> dict[str, str]:
    if not any(info.gpus for info in infos):
        # Hide GPUs this task does not own from a stray CUDA initialisation.
        return {distenv.DEVICE: "cpu", "CUDA_VISIBLE_DEVICES": ""}
    for r, info in enumerate(infos):
        if len(info.gpus) != 1:
            got = ", ".join(info.gpus) or "none"
            raise ValueError(
                f"rank {r} was assigned {len(info.gpus)} GPU(s) ({got}); every rank needs "
                f"exactly one: set '{_GPU_SETTING}' to 1"
            )
    host_gpus = [infos[r].gpus[0] for r in same_host]
    if len(set(host_gpus)) == len(host_gpus):
        return {distenv.DEVICE: "cuda", "CUDA_VISIBLE_DEVICES": ",".join(host_gpus)}
    # Executors that isolate GPUs (containers) may report the same id for different GPUs:
    # show each rank only its own, and it is cuda:0 there.
    log.warning(
        "ranks on host %s report the same GPU ids %s; giving each rank only its own GPU, so "
        "LOCAL_RANK does not index CUDA_VISIBLE_DEVICES (use pipeline.runtime.distenv.device_and_backend)",
        infos[same_host[0]].host,
        host_gpus,
    )
    return {distenv.DEVICE: "cuda", "CUDA_VISIBLE_DEVICES": host_gpus[local_rank]}


def task_device_environment(gpus: Sequence[str]) -> dict[str, str]:
    """Device variables for a task outside a barrier job (an averaging round's task).

    The task trains on its first GPU Spark assigned (``cuda:0`` once it is the only one
    visible), or on the CPU with every GPU hidden from a stray CUDA initialisation.
    """
    if not gpus:
        return {distenv.DEVICE: "cpu", "CUDA_VISIBLE_DEVICES": ""}
    visible = physical_gpus(gpus[:1], os.environ.get("CUDA_VISIBLE_DEVICES"))
    return {distenv.DEVICE: "cuda", "CUDA_VISIBLE_DEVICES": visible[0]}


@contextlib.contextmanager
def scoped_environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set ``updates`` in ``os.environ`` and put every touched variable back afterwards."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_rank(spec: RankSpec, env: Mapping[str, str], *, cpus: int) -> Any:
    """Run ``spec`` as one rank with ``env`` applied; return its value (or the script's exit code).

    Logs, output and a failure report go to the driver when a channel client is installed
    (:func:`pipeline.runtime.logchannel.install_client`). The environment, torch's thread count, the
    logging setup and sys.stdout/stderr are restored afterwards, because Spark reuses the
    Python worker for later tasks.
    """
    rank = int(env["RANK"])
    out = _RankOutput(logchannel.active_client())
    try:
        with scoped_environ({**env, **spec.env}), out.forwarding_logs():
            if isinstance(spec.target, str):
                return _run_script(spec.target, spec.args, out)
            with torch_threads(cpus), out.capturing_stdio():
                return spec.target(*spec.args, **spec.kwargs)
    except BaseException as exc:
        report_failure(rank, exc, out.tail)
        raise
    finally:
        _destroy_process_group()


def report_failure(rank: int, exc: BaseException, output: Sequence[str] = ()) -> None:
    """Report ``exc`` with the last lines of ``output`` and of its traceback, once per exception.

    The report goes to the driver through the log channel when a client is installed, and
    also rides in ``exc`` itself as a one-line note, so the Spark error the driver (or a
    Spark Connect client the executors cannot reach) receives still names the rank and
    carries its last lines (:func:`failure_reports` reads it back).
    """
    if any(str(note).startswith(_REPORT_PREFIX) for note in getattr(exc, "__notes__", ())):
        return
    if isinstance(exc, ScriptError):
        lines = [*output, str(exc)]
    else:
        lines = [*output, *"".join(_user_traceback(exc)).splitlines()]
    kind = type(exc)
    report = {
        "t": "failure",
        "rank": rank,
        "type": kind.__qualname__,
        "module": kind.__module__,
        "message": str(exc),
        "tail": lines[-TAIL_LINES:],
    }
    client = logchannel.active_client()
    if client is not None:
        client.send(report)
    if hasattr(exc, "add_note"):  # Python >= 3.11: the report also travels in the error text
        exc.add_note(f"{_REPORT_PREFIX}{json.dumps(report, ensure_ascii=True)}")


_REPORT_PREFIX = "[spark-train failure report] "
_REPORT_RE = re.compile(re.escape(_REPORT_PREFIX) + r"(\{.*\})\s*$", re.MULTILINE)


def failure_reports(text: str) -> list[tuple[int, dict[str, Any]]]:
    """The ``(rank, report)`` pairs :func:`report_failure` left in an error's text, in order."""
    found = []
    for match in _REPORT_RE.finditer(text):
        report = _parse_report(match.group(1))
        if report is not None:  # None: cut short in transit; Spark's own text is still there
            found.append((int(report["rank"]), report))
    return found


def _parse_report(text: str) -> dict[str, Any] | None:
    try:
        report = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(report, dict) and isinstance(report.get("rank"), int)
    return report if ok else None


def _user_traceback(exc: BaseException) -> list[str]:
    """The traceback without the launcher's own frames above the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_launcher_frame(tb.tb_frame.f_code):
        tb = tb.tb_next
    return traceback.format_exception(type(exc), exc, tb)


def _is_launcher_frame(code: Any) -> bool:
    path = os.path.normpath(code.co_filename)
    return any(path.endswith(os.path.join("pipeline", name)) for name in _LAUNCHER_FILES)


_LAUNCHER_FILES = (os.path.join("runtime", "rankrun.py"), os.path.join("launch", "launcher.py"))


def _run_script(path: str, argv: Sequence[Any], out: _RankOutput) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, path, *map(str, argv)]
    with subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        preexec_fn=_die_with_parent(),
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(progress.MARKER):
                out.forward(json.loads(line[len(progress.MARKER) :]))
                continue
            sys.stdout.write(line)  # the executor's log keeps the whole output
            out.line(line.rstrip("\n"))
        returncode = proc.wait()
    if returncode != 0:
        raise ScriptError(path, returncode)
    return returncode


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has the child SIGKILLed when the Python worker dies (a killed task).

    Everything is looked up here, in the parent: the hook runs between fork and exec, where
    importing could deadlock on a lock another thread held.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)


def _destroy_process_group() -> None:
    """A reused Python worker must not keep a default process group into the next task."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as err:
        log.warning("destroying the leftover process group failed: %s", err)


class _RankOutput:
    """A rank's output lines and log records: forwarded to the driver, last lines kept."""

    def __init__(self, client: logchannel.ChannelClient | None) -> None:
        self.client = client
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def forward(self, msg: dict[str, Any]) -> None:
        if self.client is not None:
            self.client.send(msg)

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.forward({"t": "out", "line": text})

    def record(self, record: logging.LogRecord, text: str) -> None:
        self.tail.extend(f"{record.levelname} {text}".splitlines())
        self.forward({"t": "log", "level": record.levelno, "msg": text})

    @contextlib.contextmanager
    def forwarding_logs(self, level: int = logging.INFO) -> Iterator[None]:
        root = logging.getLogger()
        handler = _TailHandler(self, level)
        before = root.level
        root.addHandler(handler)
        if root.getEffectiveLevel() > level:
            root.setLevel(level)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(before)

    @contextlib.contextmanager
    def capturing_stdio(self) -> Iterator[None]:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _LineTee(self, saved[0]), _LineTee(self, saved[1])
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _LineTee):
                    stream.flush_partial()
            sys.stdout, sys.stderr = saved


class _TailHandler(logging.Handler):
    def __init__(self, out: _RankOutput, level: int) -> None:
        super().__init__(level)
        self._out = out
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.record(record, self.format(record))
        except Exception:
            self.handleError(record)


class _LineTee(io.TextIOBase):
    """Writes through to ``stream`` and hands each complete line to the rank's output."""

    def __init__(self, out: _RankOutput, stream: Any) -> None:
        self._out = out
        self._stream = stream
        self._partial = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return int(self._stream.fileno())

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8"))

    def write(self, text: str) -> int:
        self._stream.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._out.line(line)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def flush_partial(self) -> None:
        if self._partial:
            self._out.line(self._partial)
            self._partial = ""
