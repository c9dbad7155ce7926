"""Test-only fault injection for the training loops.

Set ``SPARK_TRAIN_FAULT="rank=R,step=K,attempt=A,kind=KIND[,seconds=S]"`` in the environment
of the training processes and rank ``R`` misbehaves on launch attempt ``A`` (0 = first
launch, ``*`` = every attempt; ``attempt`` defaults to 0, ``kind`` to ``raise``). Reliability
tests use it to prove that relaunch, resume and the timeouts work; it has no effect unless
the variable is set.

Kinds that fire right after optimizer step ``K`` completes (before any checkpoint of step
``K`` is written):

``raise``
    raise :class:`InjectedFault` (a Python error with a traceback);
``exit``
    ``os._exit(17)`` (a hard crash: no cleanup, no traceback);
``sigkill``
    SIGKILL this process (as the OOM killer does);
``sigstop``
    SIGSTOP this process (a frozen rank: it holds its sockets but never answers);
``sigterm``
    SIGTERM this process (a preemption notice: the ranks checkpoint at this step boundary
    and stop; :mod:`pipeline.runtime.preempt`);
``hang``
    block the training loop for ``seconds`` (default 3600), outside any collective;
``kill-executor``
    SIGKILL the Spark executor JVM this rank runs under (found through the parent chain;
    a standalone or local-cluster executor, never the driver), then block for ``seconds``
    until the executor's end takes this process along.

And one that fires inside :meth:`pipeline.train.checkpoint.CheckpointManager.save` of step ``K``
on rank ``R``, once ``state.pt`` is written and before ``meta.json`` is:

``checkpoint-exit``
    ``os._exit(17)``: a crash in the middle of writing a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = [
    "EXIT_CODE",
    "FAULT_ENV",
    "Fault",
    "FaultKind",
    "InjectedFault",
    "checkpoint_write_point",
    "executor_jvm_pid",
    "parse_fault",
]

log = logging.getLogger(__name__)

FAULT_ENV: Final = "SPARK_TRAIN_FAULT"
EXIT_CODE: Final = 17
FaultKind = Literal[
    "raise", "exit", "sigkill", "sigstop", "sigterm", "hang", "kill-executor", "checkpoint-exit"
]
_KINDS: Final = get_args(FaultKind)
_STEP_KINDS: Final = frozenset(_KINDS) - {"checkpoint-exit"}
_KEYS: Final = ("rank", "step", "attempt", "kind", "seconds")
_EXECUTOR_MAIN: Final = "CoarseGrainedExecutorBackend"


class InjectedFault(RuntimeError):
    """The failure requested by ``SPARK_TRAIN_FAULT``."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A parsed ``SPARK_TRAIN_FAULT`` request."""

    rank: int
    step: int
    attempt: int | None = 0
    """Launch attempt to fire on; None: every attempt."""
    kind: FaultKind = "raise"
    seconds: float = 3600.0
    """How long ``hang`` blocks."""

    def maybe_fire(self, *, rank: int, step: int, attempt: int) -> None:
        """Misbehave here if this is the requested rank, step and attempt (step kinds only)."""
        if self.kind not in _STEP_KINDS or not self._here(rank, step, attempt):
            return
        where = f"rank {rank} at optimizer step {step}, attempt {attempt}"
        log.warning("%s: injecting %s on %s (pid %d)", FAULT_ENV, self.kind, where, os.getpid())
        if self.kind == "exit":
            os._exit(EXIT_CODE)
        elif self.kind in ("sigkill", "sigstop", "sigterm"):
            sig = {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}.get(self.kind)
            os.kill(os.getpid(), sig or signal.SIGTERM)
        elif self.kind == "hang":
            threading.Event().wait(self.seconds)  # never set: only the timeout ends it
        elif self.kind == "kill-executor":
            os.kill(executor_jvm_pid(), signal.SIGKILL)
            # Wait to be taken along (Spark's Python daemon SIGHUPs its workers when the
            # JVM goes), instead of training on for a few steps as a lost executor's
            # task cannot.
            threading.Event().wait(self.seconds)
        else:
            raise InjectedFault(f"{FAULT_ENV}: injected failure on {where}")

    def _here(self, rank: int, step: int, attempt: int) -> bool:
        return (rank, step) == (self.rank, self.step) and self.attempt in (None, attempt)


def checkpoint_write_point(step: int) -> None:
    """Called by the checkpoint writer between its files; fires ``checkpoint-exit`` faults.

    The rank and attempt come from the torchrun environment (``RANK``, ``SPARK_TRAIN_ATTEMPT``
    or torchrun's restart count).
    """
    fault = parse_fault()
    if fault is None or fault.kind != "checkpoint-exit":
        return
    from pipeline.runtime.distenv import current

    env = current()
    if fault._here(env.rank, step, env.attempt):
        log.warning("%s: exiting in the middle of writing checkpoint step %d", FAULT_ENV, step)
        os._exit(EXIT_CODE)


def executor_jvm_pid(pid: int | None = None) -> int:
    """The pid of the Spark executor JVM that ``pid`` (default: this process) descends from.

    Walks the parent chain through ``/proc`` (Linux only) looking for a process whose command
    line names ``CoarseGrainedExecutorBackend``; raises :class:`InjectedFault` when there is
    none (a ``local[N]`` master runs tasks in the driver's JVM, which this must not kill).
    """
    proc = os.getpid() if pid is None else pid
    while proc > 1:
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{proc}/stat", "rb") as f:
                # The command name in parentheses may hold spaces: split after its ')'.
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError) as e:
            raise InjectedFault(f"{FAULT_ENV}: cannot read /proc/{proc}: {e}") from e
        if _EXECUTOR_MAIN.encode() in cmdline:
            return proc
        proc = parent
    raise InjectedFault(
        f"{FAULT_ENV}: kind=kill-executor found no {_EXECUTOR_MAIN} JVM among the ancestors "
        f"of process {os.getpid() if pid is None else pid}; it needs a cluster master "
        "(local-cluster, standalone, YARN, Kubernetes), not local[N]"
    )


def parse_fault(spec: str | None = None) -> Fault | None:
    """Parse ``spec`` (default: the ``SPARK_TRAIN_FAULT`` variable); None when unset."""
    if spec is None:
        spec = os.environ.get(FAULT_ENV, "")
    if not spec.strip():
        return None
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{FAULT_ENV}: expected key=value items, got {part!r} in {spec!r}")
        fields[key.strip()] = value.strip()
    unknown = sorted(set(fields) - set(_KEYS))
    if unknown or "rank" not in fields or "step" not in fields:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: needs rank= and step= (optional attempt=, kind=, seconds=)"
            + (f"; unknown {unknown}" if unknown else "")
        )
    kind = fields.get("kind", "raise")
    if kind not in _KINDS:
        raise ValueError(f"{FAULT_ENV}: kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    attempt = fields.get("attempt", "0")
    try:
        return Fault(
            rank=int(fields["rank"]),
            step=int(fields["step"]),
            attempt=None if attempt == "*" else int(attempt),
            kind=kind,  # type: ignore[arg-type]
            seconds=float(fields.get("seconds", "3600")),
        )
    except ValueError as e:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: rank and step must be integers, attempt an integer or *, "
            "seconds a number"
        ) from e
