"""Optimizer and learning-rate schedule from the ``train.optimizer`` / ``train.lr_schedule`` config."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.train.config import LRScheduleConfig, OptimizerConfig

__all__ = ["LRFactor", "build_optimizer", "build_scheduler"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name``, over parameters or parameter groups.

    ``cfg.lr`` must be resolved (see ``resolve_defaults``).
    """
    if cfg.lr is None:
        raise ValueError(
            "train.optimizer.lr is unresolved: the model's recommended rate is set first"
        )
    params = list(params)  # type: ignore[assignment]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum or 0.0, weight_decay=cfg.weight_decay
    )


class LRFactor:
    """Multiplier of the peak LR at optimizer step ``s`` (0-based).

    Linear warm-up ``(s + 1) / (warmup + 1)`` for ``s < warmup``, then ``cosine`` or
    ``linear`` decay towards 0 at ``total_steps``, or ``constant`` 1. A class rather than a
    closure so that ``LambdaLR.state_dict`` records it as plain numbers.
    """

    def __init__(self, name: str, warmup_steps: int, total_steps: int) -> None:
        self.name = name
        self.warmup_steps = warmup_steps
        self.total_steps = max(1, total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, total_steps: int
) -> LambdaLR:
    """A per-optimizer-step ``LambdaLR`` following :class:`LRFactor`."""
    return LambdaLR(optimizer, LRFactor(cfg.name, cfg.warmup_steps, total_steps))
