"""Loss and evaluation metrics shared by the training loop and ``spark-train evaluate``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["EvalSums", "loss_fn", "score_name"]


def score_name(task: str) -> str:
    """``accuracy`` for classification, ``rmse`` for regression."""
    return "accuracy" if task == "classification" else "rmse"


def loss_fn(out: torch.Tensor, y: torch.Tensor, task: str, *, reduction: str) -> torch.Tensor:
    """Cross-entropy (classification) or MSE (regression) in float32.

    An empty batch yields a zero that still touches every output, so that it joins DDP's
    all-reduce with zero gradients instead of NaN.
    """
    out = out.float()
    if y.shape[0] == 0:
        return out.sum() * 0.0
    if task == "classification":
        return F.cross_entropy(out, y.long(), reduction=reduction)
    return F.mse_loss(out.reshape(-1), y.float(), reduction=reduction)


class EvalSums:
    """Running sums (float64) of loss, correct predictions and rows, reducible across ranks."""

    def __init__(self, task: str, device: torch.device | str = "cpu") -> None:
        self.task = task
        self.values = torch.zeros(3, dtype=torch.float64, device=device)  # loss, hits, n

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Account one batch of model outputs ``out`` against labels ``y``."""
        if y.shape[0] == 0:
            return
        self.values[0] += loss_fn(out, y, self.task, reduction="sum").double()
        if self.task == "classification":
            self.values[1] += (out.argmax(dim=1) == y).sum().double()
        self.values[2] += y.shape[0]

    def result(self, prefix: str = "") -> dict[str, float | None]:
        """``{prefix}loss`` and ``{prefix}accuracy`` / ``{prefix}rmse`` (None without rows)."""
        loss, hits, n = (float(v) for v in self.values.cpu())
        name = score_name(self.task)
        if n == 0:
            return {f"{prefix}loss": None, f"{prefix}{name}": None}
        mean = loss / n
        score = hits / n if self.task == "classification" else math.sqrt(mean)
        return {f"{prefix}loss": mean, f"{prefix}{name}": score}
