"""Shared pieces of the fault and hang tests: one fault-free baseline run, process trees.

The training config, weight loading and bitwise comparison are the integration tests' own
(:mod:`tests.integration.test_training`), so that "bitwise equal" means the same thing here.
Process helpers read Linux ``/proc`` and only ever touch descendants of this test process or
of a process it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch.fit import TrainResult, fit
from pipeline.train.config import TrainConfig
from tests.integration.test_training import (
    TRAIN_SHARDS,
    _assert_same_weights,
    _cfg,
    _untimed,
    _weights,
)
from tests.shards import make_shardset

__all__ = [
    "EPOCHS",
    "assert_same_run",
    "baseline",
    "descendants",
    "fault_cfg",
    "kill_stopped_descendants",
    "poll_until",
    "stopped_descendants",
]

EPOCHS = 2
"""Two epochs of 10 optimizer steps, a checkpoint every 4 steps and at each epoch end."""

_BASELINE: dict[str, tuple[TrainConfig, TrainResult]] = {}


def fault_cfg(tmp: Path, dataset: str, **over: Any) -> TrainConfig:
    """The integration tests' small config, for :data:`EPOCHS` epochs."""
    return _cfg(tmp, dataset, **{"epochs": EPOCHS, **over})


def baseline(spark: Any, factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult]:
    """One fault-free run on the session's local[2], computed once per test session."""
    if "run" not in _BASELINE:
        root = factory.mktemp("reliability-shards") / "set"
        uri = make_shardset(root, rows_per_shard={"train": TRAIN_SHARDS, "val": [100, 57]}, seed=3)
        cfg = fault_cfg(factory.mktemp("reliability-baseline"), uri)
        _BASELINE["run"] = (cfg, fit(cfg, spark, show_progress=False))
    return _BASELINE["run"]


def assert_same_run(
    cfg: TrainConfig,
    base: tuple[TrainConfig, TrainResult],
    epochs: list[dict[str, Any]] | None = None,
) -> None:
    """``cfg``'s bundle holds weights bitwise equal to ``base``'s, and ``epochs`` its metrics."""
    _assert_same_weights(_weights(cfg), _weights(base[0]))
    if epochs is not None:
        assert _untimed(epochs) == _untimed(base[1].epochs)


# -- processes ---------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, session id)`` of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[3])  # state, ppid, pgrp, session


def descendants(root: int) -> dict[int, str]:
    """Every live (not zombie) descendant of ``root`` with its state letter (``T``: stopped)."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            states[int(name)] = stat[0]
            children.setdefault(stat[1], []).append(int(name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = states[pid]
        todo += children.get(pid, [])
    return {pid: state for pid, state in found.items() if state != "Z"}


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a process started with ``start_new_session``)."""
    pids = (int(n) for n in os.listdir("/proc") if n.isdigit())
    return [p for p in pids if (s := _stat(p)) is not None and s[2] == sid and s[0] != "Z"]


def stopped_descendants() -> list[int]:
    """Descendants of this test process that are stopped (SIGSTOP)."""
    return [pid for pid, state in descendants(os.getpid()).items() if state == "T"]


def kill_stopped_descendants() -> list[int]:
    """SIGKILL every stopped descendant (a frozen rank Spark failed to kill); returns them."""
    stopped = stopped_descendants()
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stopped


def poll_until(ready: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Wait until ``ready()`` (checked every 0.2 s, for an event nothing notifies) or fail.

    Returns the seconds it took.
    """
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start
