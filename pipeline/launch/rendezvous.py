"""The driver's side of a launch's rendezvous: every rank's part, answered to all at once.

Each rank sends its host, GPUs and (rank 0) port through the log channel; the driver answers
every rank with all parts when the last one arrived — one network round trip instead of
Spark's ``BarrierTaskContext.allGather``, which polls its coordinator every second.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.runtime import logchannel

__all__ = ["RENDEZVOUS_WAIT_S", "Rendezvous"]

log = logging.getLogger("pipeline.launch.launcher")  # the launcher's messages

RENDEZVOUS_WAIT_S = 30.0
"""How long the driver waits for every rank to join its rendezvous before all fall back to
``BarrierTaskContext.allGather``."""


class Rendezvous:
    """Driver side of the rendezvous: gathers every rank's part and answers all ranks at once.

    When not every rank joined within ``RENDEZVOUS_WAIT_S`` (one could not reach the
    driver), every rank is answered None and uses ``BarrierTaskContext.allGather`` — the
    ones that never connected use it anyway, so all ranks take the same path.
    """

    def __init__(self, ranks: int) -> None:
        self._ranks = ranks
        self._parts: dict[int, str] = {}
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._done = False
        self._result: list[str] | None = None
        self._encoded: bytes | None = None

    def join(self, rank: int, part: str) -> list[str] | None:
        """Add ``rank``'s part and wait for the answer: all parts in rank order, or None."""
        with self._cond:
            if self._done:
                return self._result
            if self._deadline is None:
                self._deadline = time.monotonic() + RENDEZVOUS_WAIT_S
            self._parts[rank] = part
            if len(self._parts) == self._ranks:
                self._result = [self._parts[r] for r in range(self._ranks)]
            elif not self._cond.wait_for(
                lambda: self._done, timeout=max(self._deadline - time.monotonic(), 0.0)
            ):
                log.warning(
                    "only ranks %s reached the driver within %.0f s; every rank "
                    "rendezvouses through BarrierTaskContext.allGather instead",
                    sorted(self._parts),
                    RENDEZVOUS_WAIT_S,
                )
            self._done = True
            self._cond.notify_all()
            return self._result

    def answer(self, rank: int, part: str) -> bytes:
        """:meth:`join`, as the channel's encoded answer, encoded once for every rank.

        An answer encoded per rank is N parts encoded N times: the one O(N²) cost of a launch.
        """
        parts = self.join(rank, part)
        with self._cond:
            if self._encoded is None:
                self._encoded = logchannel.encode({"t": "rendezvous", "parts": parts})
            return self._encoded
