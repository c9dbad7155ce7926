"""One batch of the training reader: :class:`Batch` (inputs by name and labels, as tensors).

Made by :mod:`pipeline.data.prefetch` for :class:`pipeline.data.reader.ShardReader`, and by
scoring (:mod:`pipeline.serve.predict`) from Arrow batches; consumed by the training engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.shardset import FEATURES_COLUMN as FEATURES

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` (name → ``[B, *shape]`` tensor) and ``labels`` ``[B]``, contiguous.

    Inputs keep the dtype and shape the manifest declares for their column: the tabular
    ``features`` vector float32 ``[B, D]``, arrays as declared, images uint8 ``[B, H, W, C]``
    (normalization and channels-first happen on the device: :mod:`pipeline.train.inputs`).
    Text columns are int32 ids ``[B, L]``: ``L`` is the column's ``max_length``, or with the
    reader's ``text_padding="batch"`` the last non-pad position of the batch's longest row.
    Labels are int64 class codes for classification and float32 targets for regression.
    ``Batch(tensor, labels)`` is a batch whose only input is ``features``.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.inputs, torch.Tensor):
            object.__setattr__(self, "inputs", {FEATURES: self.inputs})

    @property
    def features(self) -> torch.Tensor:
        """The tabular ``features`` input (KeyError naming the inputs when there is none)."""
        try:
            return self.inputs[FEATURES]
        except KeyError:
            raise KeyError(
                f"this batch has no {FEATURES!r} input (inputs: {', '.join(self.inputs)})"
            ) from None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device`` (dtypes and shapes unchanged)."""
        return Batch(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
            self.labels.to(device, non_blocking=non_blocking),
        )
