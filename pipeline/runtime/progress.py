"""Training progress: reported by rank 0's loop, shown live on the driver.

:func:`report` is what a training loop calls every step or so. Under the launcher it sends
the figures to the driver, which shows a tqdm bar (stderr is a terminal) or a plain log line
at most every few seconds. In a script rank's child process it prints a marked line that the
rank forwards. Elsewhere (plain torchrun, unit tests) it logs locally, rate limited, so
calling it every step stays cheap. Only rank 0's reports are used.

Spark-free.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from pipeline.runtime import distenv, logchannel

__all__ = ["MARKER", "ProgressDisplay", "report"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0
"""Least interval between two plain progress log lines (driver and local fallback)."""

MARKER = "\x1espark-train-progress "
"""Prefix of a progress line printed by a script rank's child for its parent to forward."""

_local_last = -math.inf


def report(
    *,
    epoch: int,
    step: int,
    steps: int,
    samples_per_s: float,
    loss: float,
    world_size: int | None = None,
) -> None:
    """Report rank 0's progress: ``step`` of ``steps`` in ``epoch``, throughput and loss.

    ``world_size``, when given, is shown too (it changes in an elastic run).

    Calls from other ranks are ignored. Never raises on a lost driver connection.
    """
    global _local_last
    if distenv.current().rank != 0:
        return
    msg = {
        "t": "progress",
        "epoch": epoch,
        "step": step,
        "steps": steps,
        "samples_per_s": float(samples_per_s),
        "loss": float(loss),
    }
    if world_size is not None:
        msg["ranks"] = int(world_size)
    client = logchannel.active_client()
    if client is not None:
        client.send(msg)
        return
    if distenv.under_launcher():  # a script rank's child: the rank reads its stdout
        print(MARKER + json.dumps(msg), flush=True)
        return
    now = time.monotonic()
    if now - _local_last >= LOG_EVERY_S or step >= steps:
        _local_last = now
        log.info("%s", format_progress(msg))


def format_progress(msg: Mapping[str, Any]) -> str:
    """One line: ``epoch 2 step 40/100 loss 0.4312 1234.5 samples/s`` (``on 3 ranks``)."""
    ranks = f" on {msg['ranks']} ranks" if "ranks" in msg else ""
    return (
        f"epoch {msg['epoch']} step {msg['step']}/{msg['steps']} "
        f"loss {msg['loss']:.4g} {msg['samples_per_s']:.1f} samples/s{ranks}"
    )


class ProgressDisplay:
    """Driver side: shows the latest report as a tqdm bar or a rate-limited log line.

    ``enabled=None`` shows a bar when stderr is a terminal and tqdm is installed, else log
    lines; ``False`` shows nothing. Thread-safe; :meth:`close` is idempotent.
    """

    def __init__(self, enabled: bool | None = None, log_every_s: float = LOG_EVERY_S) -> None:
        self._enabled = enabled is not False
        self._use_bar = self._enabled and sys.stderr.isatty() and _has_tqdm()
        self._log_every_s = log_every_s
        self._last_log = -math.inf
        self._bar: Any = None
        self._bar_epoch: int | None = None
        self._lock = threading.Lock()
        self.last: Mapping[str, Any] | None = None

    def update(self, msg: Mapping[str, Any]) -> None:
        """Show one progress report (a message from :func:`report`)."""
        with self._lock:
            self.last = msg
            if not self._enabled:
                return
            if self._use_bar:
                self._update_bar(msg)
                return
            now = time.monotonic()
            if now - self._last_log >= self._log_every_s or msg["step"] >= msg["steps"]:
                self._last_log = now
                log.info("progress: %s", format_progress(msg))

    def _update_bar(self, msg: Mapping[str, Any]) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar_epoch != msg["epoch"]:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=msg["steps"], desc=f"epoch {msg['epoch']}", unit="step")
            self._bar_epoch = msg["epoch"]
        self._bar.n = msg["step"]
        extra = {"ranks": msg["ranks"]} if "ranks" in msg else {}
        self._bar.set_postfix(
            loss=f"{msg['loss']:.4g}", samples_s=f"{msg['samples_per_s']:.1f}", **extra
        )

    def close(self) -> None:
        """Close the bar, if one is shown."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
