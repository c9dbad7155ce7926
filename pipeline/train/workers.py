"""The elastic form of ``train.num_workers``: ``{min, max, wait_s}``.

Re-exported by :mod:`pipeline.train.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.configbase import check

__all__ = ["WorkersConfig"]


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    """An elastic ``train.num_workers``: as many ranks as the cluster has slots, within a range.

    A launch or relaunch takes ``min(max, barrier slots now)`` ranks, rounded down to a
    world size that divides the global batch (``train.batch_size × max``); with fewer than
    ``min`` slots it waits up to ``wait_s`` for more, then fails naming the slots. When
    slots come back the run grows at its next checkpoint boundary. See README, "Elastic
    training and preemption".
    """

    min: int = 1
    """Fewest ranks worth running (the job waits, then fails, below this)."""

    max: int = 2
    """Most ranks; the global batch is ``train.batch_size × max`` at every world size."""

    wait_s: float = 300.0
    """How long a launch waits for ``min`` barrier slots before it fails."""

    def __post_init__(self) -> None:
        check(self.min >= 1, "train.num_workers.min", f"must be >= 1, got {self.min}")
        check(
            self.max >= self.min,
            "train.num_workers.max",
            f"must be >= train.num_workers.min ({self.min}), got {self.max}",
        )
        check(self.wait_s >= 0, "train.num_workers.wait_s", f"must be >= 0, got {self.wait_s}")
