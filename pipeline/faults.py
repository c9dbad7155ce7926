"""Test-only fault injection for the training loops.

Set ``SPARK_TRAIN_FAULT="rank=R,step=K,attempt=A,kind=raise|exit"`` in the environment of
the training processes and rank ``R`` fails right after optimizer step ``K`` completes
(before any checkpoint of step ``K`` is written) on launch attempt ``A`` (0 = first launch):
``raise`` raises :class:`InjectedFault` (a Python error with a traceback), ``exit`` calls
``os._exit(17)`` (a hard crash: no cleanup, no traceback). ``attempt`` defaults to 0 and
``kind`` to ``raise``. Reliability tests use it to prove that relaunch and resume work; it
has no effect unless the variable is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

__all__ = ["FAULT_ENV", "Fault", "InjectedFault", "parse_fault"]

FAULT_ENV = "SPARK_TRAIN_FAULT"
EXIT_CODE = 17


class InjectedFault(RuntimeError):
    """The failure requested by ``SPARK_TRAIN_FAULT``."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A parsed ``SPARK_TRAIN_FAULT`` request."""

    rank: int
    step: int
    attempt: int = 0
    kind: Literal["raise", "exit"] = "raise"

    def maybe_fire(self, *, rank: int, step: int, attempt: int) -> None:
        """Fail here if this is the requested rank, step and attempt."""
        if (rank, step, attempt) != (self.rank, self.step, self.attempt):
            return
        if self.kind == "exit":
            os._exit(EXIT_CODE)
        raise InjectedFault(
            f"{FAULT_ENV}: injected failure on rank {rank} at optimizer step {step}, "
            f"attempt {attempt}"
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
    unknown = sorted(set(fields) - {"rank", "step", "attempt", "kind"})
    if unknown or "rank" not in fields or "step" not in fields:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: needs rank= and step= (optional attempt=, kind=)"
            + (f"; unknown {unknown}" if unknown else "")
        )
    kind = fields.get("kind", "raise")
    if kind not in ("raise", "exit"):
        raise ValueError(f"{FAULT_ENV}: kind must be raise or exit, got {kind!r}")
    try:
        return Fault(
            rank=int(fields["rank"]),
            step=int(fields["step"]),
            attempt=int(fields.get("attempt", "0")),
            kind=kind,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise ValueError(f"{FAULT_ENV}={spec!r}: rank, step and attempt must be integers") from e
