"""DDP gradient communication hooks for ``train.comm_hook``: torch's built-in hooks.

``fp16`` and ``powersgd`` are torch's ``fp16_compress_hook`` and ``powerSGD_hook``. ``bf16``
is torch's ``bf16_compress_hook`` on NCCL; DDP refuses that hook by name unless torch was
built with CUDA and NCCL, although gloo all-reduces ``bfloat16`` tensors fine, so on other
backends :func:`gloo_bf16_compress_hook` does the same computation under another name.
"""

# No ``from __future__ import annotations`` here: DDP compares the hook's annotations with
# the real ``dist.GradBucket`` and ``Future[Tensor]`` objects, not with strings.

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.config import TrainConfig

__all__ = ["gloo_bf16_compress_hook", "register_comm_hook"]


def gloo_bf16_compress_hook(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket as ``bfloat16`` divided by the world size; decompress in place."""
    group = process_group if process_group is not None else dist.group.WORLD
    assert group is not None, "the default process group is initialised"
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def register_comm_hook(model: DistributedDataParallel, cfg: TrainConfig, backend: str) -> None:
    """Register the hook named by ``cfg.comm_hook`` (nothing for ``none``)."""
    if cfg.comm_hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.comm_hook == "bf16":
        hook = default_hooks.bf16_compress_hook if backend == "nccl" else gloo_bf16_compress_hook
        model.register_comm_hook(None, hook)
    elif cfg.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd.matrix_rank,
            start_powerSGD_iter=cfg.powersgd.start_iter,
            random_seed=cfg.seed,
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
