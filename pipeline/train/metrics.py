"""Loss and evaluation metrics, and the one evaluation pass over a split.

:func:`evaluate` is what the training loop (each rank on its share of the val split, summed
over the ranks), the model-averaging driver (the global model on the host) and
``spark-train evaluate`` (a bundle on any split) all run; :class:`EvalSums` holds its sums.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train import engine

if TYPE_CHECKING:
    from pipeline.data.reader import ShardReader
    from pipeline.train.inputs import ModelInputs

__all__ = ["EvalSums", "evaluate", "loss_fn", "score_name"]


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


def evaluate(
    model: nn.Module,
    reader: ShardReader | None,
    inputs: ModelInputs,
    task: str,
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
    inference: bool = False,
) -> EvalSums:
    """The sums of ``model`` over the whole of ``reader``'s split (from its start).

    Every batch goes through :func:`pipeline.train.engine.to_model` (``inputs``' columns and
    normalization) onto ``device`` and through ``model`` in eval mode, under ``autocast``
    (e.g. :func:`pipeline.train.engine.autocast`) when given, without gradients
    (``inference``: in :func:`torch.inference_mode`, for a model that never trains again);
    empty batches are skipped. The model is left in the train/eval mode it came in.
    ``reduce`` sums the ``values`` over the ranks in place (one rank's share of a split each);
    without ``reader`` (no such split) the sums are empty and nothing is reduced.
    """
    sums = EvalSums(task, device)
    if reader is None:
        return sums
    device = torch.device(device)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            reader.set_epoch(0)
            for batch in reader:
                if batch.labels.shape[0] == 0:
                    continue
                x, y = engine.to_model(inputs, batch, device)
                with autocast or contextlib.nullcontext():
                    sums.add(model(x), y)
    finally:
        model.train(training)
    if reduce is not None:
        reduce(sums.values)
    return sums
