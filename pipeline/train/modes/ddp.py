"""``train.mode: ddp``: DistributedDataParallel, every rank holding the whole model.

The loop (:mod:`pipeline.train.loop`) wraps the placed module in ``DistributedDataParallel``
(``device_ids`` = this rank's GPU under CUDA), registers ``train.comm_hook`` (fp16 / bf16
compression or PowerSGD, :mod:`pipeline.train.comm_hooks`), and defers the gradient
all-reduce to the last micro-batch of each optimizer step with DDP's ``no_sync``. The
defaults of :class:`~pipeline.train.modes.BarrierMode` cover the rest: plain global-norm
clipping, and the module's own ``state_dict`` in checkpoints and the bundle.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.comm_hooks import register_comm_hook
from pipeline.train.registry import BarrierMode, WrapContext

__all__ = ["MODE", "DdpMode"]


class DdpMode(BarrierMode):
    """Replicated model, gradients averaged by all-reduce after every optimizer step."""

    name: ClassVar[str] = "ddp"

    def wrap(self, module: nn.Module, ctx: WrapContext) -> nn.Module:
        """``DistributedDataParallel`` (broadcasts rank 0's weights) plus the comm hook."""
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=ids)
        register_comm_hook(model, ctx.cfg, ctx.backend)
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """DDP's own ``no_sync``: accumulate locally, all-reduce on the step's last batch."""
        assert isinstance(model, DistributedDataParallel), "wrap() made the DDP model"
        return model.no_sync()


MODE = DdpMode()
