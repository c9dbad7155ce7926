"""Stopping a run at a step boundary: preemption notices, and asking the driver to grow.

Cluster managers announce a kill with SIGTERM (Kubernetes, then SIGKILL after the pod's
grace period, 30 s by default; YARN, after ``yarn.nodemanager.sleep-delay-before-sigkill.ms``,
250 ms by default). :func:`notice` turns SIGTERM in a rank's process into a flag that the
training loop reads at its next step boundary, where all ranks agree (one collective) to
checkpoint and exit cleanly; the launcher then relaunches from that checkpoint.

:func:`more_slots` is how rank 0 asks the driver, at a checkpoint boundary, whether the
cluster now has barrier slots for a larger world (elastic ``train.num_workers``).

Spark-free; the driver's side is :mod:`pipeline.launch.launcher`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from pipeline.runtime import logchannel

__all__ = ["GROW_REQUEST", "Notice", "more_slots", "notice"]

log = logging.getLogger(__name__)

GROW_REQUEST: Final = "grow?"
"""The channel message kind rank 0 sends; the driver answers ``{"more": bool}``."""
_ANSWER_S: Final = 30.0


class Notice:
    """Whether this process was told to stop (SIGTERM), and which signal."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def received(self) -> bool:
        """True once a stop signal arrived."""
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes: only set the flag (the loop logs).
        self.signal = signum


@contextmanager
def notice() -> Iterator[Notice]:
    """Catch SIGTERM while the block runs (the previous handler comes back after it).

    Only the main thread may set signal handlers; elsewhere (a rank run from a thread) the
    notice never arrives and SIGTERM keeps its previous effect, which is logged once.
    """
    got = Notice()
    if threading.current_thread() is not threading.main_thread():
        log.info("not the main thread: SIGTERM is not turned into a checkpoint here")
        yield got
        return
    previous = signal.signal(signal.SIGTERM, got._handle)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def more_slots() -> bool:
    """Ask the driver whether a larger world fits the cluster now (False without a driver)."""
    client = logchannel.active_client()
    if client is None:
        return False
    try:
        reply = client.request({"t": GROW_REQUEST}, timeout_s=_ANSWER_S)
    except (ConnectionError, TimeoutError, OSError) as err:
        log.warning("could not ask the driver for more barrier slots (%s); not growing", err)
        return False
    return bool(reply.get("more"))
