"""Bounds on a training rank's waits, and errors that say which bound ran out.

Three mechanisms end a hung run by itself, all derived from ``train.timeout_s``:

* **Collective timeouts.** A rank that waits longer than ``train.timeout_s`` in a collective
  (or the rendezvous) gets a backend error such as gloo's ``Timed out waiting 600000ms for
  recv operation to complete``; :func:`naming_timeout` re-raises it as
  :class:`CollectiveTimeoutError`, which names the setting and the likely cause. The
  launcher treats it as a consequence of another rank's failure, so the rank that sent no
  report of its own — the hung one — is named next to it.
* **The progress watchdog** (:func:`watchdog`). A rank stuck *outside* collectives (so that
  no timeout of torch's fires: a world of one, or every rank stuck) reads no batch for
  :func:`stall_limit_s` seconds: the watchdog thread reports :class:`StallError` to the
  driver with the stuck thread's stack, and ends the process. The limit exceeds
  ``train.timeout_s`` so that, when a peer hangs, the waiting rank's collective timeout
  fires first and the hung rank is the one blamed.
* **Heartbeats.** While the rank makes progress the watchdog sends the driver an ``alive``
  message every :data:`HEARTBEAT_S`; a frozen process (SIGSTOP, a paused VM) sends none, and
  the launcher cancels and relaunches the attempt (``run_distributed(heartbeat_timeout_s=)``).

Imports neither pyspark nor (at import time) torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Final

from pipeline.runtime import logchannel, rankrun

__all__ = [
    "HEARTBEAT_S",
    "STALL_EXIT_CODE",
    "CollectiveTimeoutError",
    "StallError",
    "beat",
    "naming_timeout",
    "stall_limit_s",
    "watchdog",
]

log = logging.getLogger(__name__)

HEARTBEAT_S: Final = 2.0
"""Interval of the watchdog's checks and of its ``alive`` messages to the driver."""
STALL_EXIT_CODE: Final = 75
"""Exit code of a rank ended by its watchdog."""
_TIMED_OUT: Final = re.compile(r"timed out|timeout", re.IGNORECASE)
_BACKENDS: Final = re.compile(r"gloo|nccl|TCPStore|ProcessGroup", re.IGNORECASE)
_last_beat = time.monotonic()


class CollectiveTimeoutError(TimeoutError):
    """A collective operation (or the process-group rendezvous) ran past ``train.timeout_s``."""


class StallError(TimeoutError):
    """A rank made no progress for :func:`stall_limit_s` seconds outside any collective."""


def stall_limit_s(timeout_s: float) -> float:
    """How long a rank may read no batch: ``timeout_s`` plus a grace of max(10 s, 25 %)."""
    return timeout_s + max(10.0, 0.25 * timeout_s)


def beat() -> None:
    """Mark progress of this process's training loop (the shard reader calls it per batch)."""
    global _last_beat
    _last_beat = time.monotonic()


def _is_timeout(exc: BaseException) -> bool:
    """True for torch.distributed's (and its backends') timeout errors."""
    if not isinstance(exc, RuntimeError | TimeoutError) or isinstance(
        exc, CollectiveTimeoutError | StallError
    ):
        return False
    text = str(exc)
    if not _TIMED_OUT.search(text):
        return False
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None)
    return (isinstance(dist_error, type) and isinstance(exc, dist_error)) or bool(
        _BACKENDS.search(text)
    )


@contextlib.contextmanager
def naming_timeout(rank: int, timeout_s: float, key: str = "train.timeout_s") -> Iterator[None]:
    """Re-raise a collective timeout inside the block as :class:`CollectiveTimeoutError`.

    The message names ``rank``, ``key=timeout_s`` and the usual causes; the original error
    stays chained as ``__cause__``.
    """
    try:
        yield
    except Exception as exc:
        if not _is_timeout(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveTimeoutError(
            f"rank {rank} waited {key}={timeout_s:g} s for the other ranks (in a collective "
            "operation or the rendezvous) and gave up: another rank is hung, frozen or gone "
            f"(or much slower: then raise {key}). The backend said: {first}"
        ) from exc


@contextlib.contextmanager
def watchdog(rank: int, timeout_s: float, key: str = "train.timeout_s") -> Iterator[None]:
    """Bound the block's progress by :func:`stall_limit_s` and send heartbeats meanwhile.

    Progress is a :func:`beat` (one per batch read). When none came for the limit, the
    watchdog logs and reports :class:`StallError` with the stack of the thread that entered
    the block, then ends the process with :data:`STALL_EXIT_CODE`: a thread blocked in C
    code cannot be interrupted otherwise, and the launcher or torchrun relaunches the job.
    """
    stop = threading.Event()
    beat()
    watcher = threading.Thread(
        target=_watch,
        args=(rank, timeout_s, key, threading.get_ident(), stop),
        name=f"spark-train-watchdog-rank{rank}",
        daemon=True,
    )
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(2 * HEARTBEAT_S)
        client = logchannel.active_client()
        if client is not None:
            client.send({"t": "alive", "done": True})


def _watch(rank: int, timeout_s: float, key: str, ident: int, stop: threading.Event) -> None:
    limit = stall_limit_s(timeout_s)
    while True:  # the first heartbeat at once: the driver watches this rank from now on
        client = logchannel.active_client()
        if client is not None:
            client.send({"t": "alive"})
        if stop.wait(min(HEARTBEAT_S, limit / 4)):
            return
        idle = time.monotonic() - _last_beat
        if idle > limit:
            _expire(rank, idle, limit, key, timeout_s, ident)


def _expire(rank: int, idle: float, limit: float, key: str, timeout_s: float, ident: int) -> None:
    frame = sys._current_frames().get(ident)
    stack = [] if frame is None else "".join(traceback.format_stack(frame)).splitlines()
    error = StallError(
        f"rank {rank} made no progress for {idle:.0f} s (the limit is {key}={timeout_s:g} s "
        f"plus {limit - timeout_s:g} s of grace) outside any collective operation: it is "
        "stuck, and the watchdog ended it. The stuck thread's stack comes with this report"
    )
    log.error("%s\n%s", error, "\n".join(stack))
    rankrun.report_failure(rank, error, stack)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STALL_EXIT_CODE)
