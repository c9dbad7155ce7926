"""Elastic launches: how many ranks a launch takes, and when a run may grow.

:func:`pipeline.launch.launcher.run_distributed` with an :class:`Elastic` launches each
attempt with the largest allowed world size that the cluster's barrier slots hold now
(:func:`launch_size`), waits a bounded time for the smallest, and answers rank 0's question
at a checkpoint boundary — is a larger world possible now? — with :func:`can_grow`. Ranks
that stop at a step boundary on purpose (a preemption notice, growing) return normally;
:attr:`Elastic.stopped` recognizes their results and the launcher relaunches without
counting a failed attempt.

Imports pyspark lazily (through :mod:`pipeline.launch.session`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pipeline.launch.errors import DistributedError, all_failed
from pipeline.launch.session import BarrierSlots, barrier_slots, check_slots

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["MAX_PLANNED", "Elastic", "Launch", "can_grow", "launch_size", "planned_stop"]

log = logging.getLogger(__name__)

_POLL_S: Final = 1.0
"""How often a launch waiting for slots looks again."""
MAX_PLANNED: Final = 1000
"""Relaunches after a planned stop (preemption notice, growing) one call allows."""


def _never(results: list[Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Elastic:
    """How :func:`~pipeline.launch.launcher.run_distributed` sizes and relaunches a job."""

    sizes: tuple[int, ...]
    """The world sizes a launch may take, largest first (one size: a fixed world)."""
    wait_s: float = 0.0
    """How long a launch waits for the smallest size's slots before it fails."""
    stopped: Callable[[list[Any]], str | None] = _never
    """Given every rank's result, why the ranks stopped on purpose (relaunch), or None."""

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"Elastic.sizes must be positive ints, got {self.sizes!r}")
        if list(self.sizes) != sorted(set(self.sizes), reverse=True):
            raise ValueError(f"Elastic.sizes must be distinct and largest first: {self.sizes!r}")
        if not self.wait_s >= 0:
            raise ValueError(f"Elastic.wait_s must be >= 0, got {self.wait_s!r}")

    @property
    def resizable(self) -> bool:
        """More than one world size."""
        return len(self.sizes) > 1

    def fit(self, slots: int) -> int | None:
        """The largest size that ``slots`` hold, or None."""
        return next((s for s in self.sizes if s <= slots), None)


@dataclass(frozen=True)
class Launch:
    """One launch of the job: its world size, its number, and why it happens."""

    size: int
    number: int
    reason: str
    elastic: Elastic


def launch_size(
    spark: SparkSession, elastic: Elastic, failures: Sequence[DistributedError] = ()
) -> int:
    """The world size of the next launch: the largest allowed one the cluster holds now.

    A fixed size is checked as always (:func:`pipeline.launch.session.check_slots`). A range
    waits up to :attr:`Elastic.wait_s` for the smallest size's slots (executors lost for
    good may be replaced), then raises :class:`DistributedError` with the slot arithmetic.
    Slots that cannot be known (a Connect session whose configuration does not say) give
    the largest size: Spark's own barrier check then applies.
    """
    if not elastic.resizable and not elastic.wait_s:
        check_slots(spark, elastic.sizes[0], failures)
        return elastic.sizes[0]
    deadline = time.monotonic() + elastic.wait_s
    found = barrier_slots(spark)
    waited = False
    while True:
        if found is None:
            return elastic.sizes[0]
        size = elastic.fit(found.slots)
        if size is not None:
            if waited:
                log.info("%s: launching %d ranks", found.explain(), size)
            return size
        if time.monotonic() >= deadline:
            raise _too_few(found, elastic, failures)
        if not waited:
            log.warning(
                "%s; the smallest allowed world is %d ranks: waiting up to %.0f s for more",
                found.explain(),
                elastic.sizes[-1],
                elastic.wait_s,
            )
            waited = True
        time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))  # Spark has no wait API
        found = barrier_slots(spark)


def can_grow(spark: SparkSession, elastic: Elastic, size: int) -> bool:
    """Whether the cluster now holds a larger allowed world than ``size``."""
    if not elastic.resizable or size >= elastic.sizes[0]:
        return False
    try:
        found = barrier_slots(spark)
    except Exception as err:  # py4j / Connect trouble must not end a run that trains fine
        log.warning("could not count barrier slots (%s); not growing", err)
        return False
    if found is None:
        return False
    larger = elastic.fit(found.slots)
    if larger is None or larger <= size:
        return False
    log.info("%s: the run grows from %d to %d ranks", found.explain(), size, larger)
    return True


def planned_stop(elastic: Elastic, results: list[Any], planned: int) -> tuple[int, str | None]:
    """``(planned stops so far, why the ranks stopped this time or None)``.

    Raises :class:`DistributedError` past :data:`MAX_PLANNED` (a target that stops on
    purpose without end).
    """
    stopped = elastic.stopped(results)
    if stopped is None:
        return planned, None
    if planned + 1 > MAX_PLANNED:
        raise DistributedError(
            f"the ranks stopped on purpose {planned + 1} times ({stopped}); giving up",
            rank=None,
            exc_type="TooManyStops",
            exc_message=stopped,
        )
    return planned + 1, stopped


def _too_few(
    found: BarrierSlots, elastic: Elastic, failures: Sequence[DistributedError]
) -> DistributedError:
    after = f" (after {len(failures)} failed attempt(s))" if failures else ""
    message = (
        f"train.num_workers needs at least {min(elastic.sizes)} ranks (the world sizes it "
        f"allows: {', '.join(map(str, elastic.sizes))}), but the cluster has "
        f"{found.explain()}{after}, and no more came within "
        f"train.num_workers.wait_s={elastic.wait_s:g} s"
    )
    err = DistributedError(message, rank=None, exc_type="NotEnoughSlots", exc_message=message)
    if failures:
        err.__cause__ = all_failed(failures)
    return err
