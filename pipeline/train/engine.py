"""The one training engine: what every mode shares, whoever launches it.

The barrier loop (:mod:`pipeline.train.loop`, modes ``ddp`` / ``fsdp`` and any registered
:class:`~pipeline.train.modes.BarrierMode`) and model averaging's per-task training
(:mod:`pipeline.train.modes.average`) both build their model, seed their generators, pick
their device, run an optimizer step, autocast, decide whether to resume and check their
inputs through the functions here, so a fix or a new setting lands in every mode at once.
Batches reach the device through :func:`to_model` alone (copy, then normalize: the model
inputs of :mod:`pipeline.train.inputs`), in training, validation, model averaging's driver
and ``spark-train evaluate``.

Spark-free: it runs inside executors and under plain ``torchrun``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.configbase import to_dict
from pipeline.data.prefetch import Batch
from pipeline.data.shardset import ShardSet
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import ModelInputs
from pipeline.train.models import build_model
from pipeline.train.optim import build_optimizer

ModelArgument = torch.Tensor | dict[str, torch.Tensor]
"""What a model is called with: one tensor, or one per input column (by name)."""

__all__ = [
    "RANK_SEED_STRIDE",
    "ModelArgument",
    "ResumeError",
    "Stepper",
    "autocast",
    "builder_args",
    "deterministic",
    "model_inputs",
    "model_shape",
    "new_model",
    "new_optimizer",
    "resume_step",
    "seed_everything",
    "seed_from",
    "to_model",
]

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003
"""Rank r's dropout stream is seeded with ``seed + RANK_SEED_STRIDE * (r + 1)``."""


class ResumeError(RuntimeError):
    """``train.checkpoint.dir`` holds checkpoints that this run may not silently discard."""


# -- seeding and determinism ---------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_from(*key: int) -> None:
    """Seed every generator from a tuple (e.g. seed, round, worker) through ``SeedSequence``."""
    seed_everything(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@contextlib.contextmanager
def deterministic(threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (and ``threads`` torch threads), restored afterwards.

    Restoring matters in reused Spark Python workers, which run other tasks afterwards.
    """
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])


# -- the model -----------------------------------------------------------------------------
def builder_args(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``train.model.builder`` (``train.model.args`` less input_shape)."""
    args = dict(to_dict(cfg.model.args))
    args.pop("input_shape", None)
    return args


def model_inputs(cfg: TrainConfig, shards: ShardSet) -> ModelInputs:
    """The input columns of the model ``cfg`` trains on ``shards`` (:mod:`pipeline.train.inputs`).

    ``train.model.args.input_shape`` overrides the shape of a single input column.
    """
    override = cfg.model.args.get("input_shape")
    return ModelInputs.from_shards(shards, override or None)


def model_shape(cfg: TrainConfig, shards: ShardSet) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_outputs)`` of the model ``cfg`` trains on ``shards``."""
    shape = model_inputs(cfg, shards).input_shape
    if shards.task == "regression":  # train.task, when set, equals it (preflight)
        return shape, 1
    classes = shards.classes
    if len(classes) < 2:
        raise ValueError(
            f"shard set {cfg.dataset}: a classification task needs >= 2 classes in "
            f"manifest label.classes, found {classes!r}"
        )
    return shape, len(classes)


def new_model(cfg: TrainConfig, shards: ShardSet) -> nn.Module:
    """A freshly initialised model (seed first for identical weights on every rank)."""
    input_shape, num_outputs = model_shape(cfg, shards)
    inputs = model_inputs(cfg, shards)
    return build_model(
        cfg.model.builder,
        input_shape=input_shape,
        num_outputs=num_outputs,
        args=builder_args(cfg),
        inputs=inputs.spec(),
        vocab=inputs.vocab(),
    )


def new_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``module``'s parameters (after placing / sharding it)."""
    return build_optimizer(module.parameters(), cfg.optimizer)


# -- device and precision ------------------------------------------------------------------
def to_model(
    inputs: ModelInputs, batch: Batch, device: torch.device
) -> tuple[ModelArgument, torch.Tensor]:
    """``(x, y)``: the batch copied to ``device``, then normalized; call ``model(x)``.

    ``x`` is one tensor for a single input column, else a dict by column name (see
    :meth:`pipeline.train.inputs.ModelInputs.prepare`). uint8 columns cross to the device
    as uint8 and become float32 there. The copies are ``non_blocking``: on CUDA the training
    loop's reader puts batches in pinned memory (``ShardReader(pin_memory=True)``), so the
    host→device copy runs asynchronously and overlaps the work already queued on the device.
    """
    return inputs.prepare(batch, device)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast of the forward pass on ``device`` (``train.precision``), or nothing."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the optimizer step --------------------------------------------------------------------
class Stepper:
    """One optimizer step: clip (``train.grad_clip``), step, schedule, zero the gradients."""

    def __init__(
        self,
        cfg: TrainConfig,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip: Callable[[nn.Module, float], None] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.grad_clip = cfg.grad_clip
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.clip = clip or (lambda m, norm: nn.utils.clip_grad_norm_(m.parameters(), norm))
        self.steps = 0
        """Optimizer steps taken through this stepper (set on resume)."""

    def __call__(self) -> None:
        """Apply the accumulated gradients."""
        if self.grad_clip is not None:
            self.clip(self.module, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


# -- resume policy -------------------------------------------------------------------------
def resume_step(
    ckpt: CheckpointManager,
    cfg: TrainConfig,
    *,
    relaunch: bool,
    discard: Callable[[], None] | None = None,
) -> int | None:
    """The checkpoint step to continue from, or None to start fresh.

    A relaunch after a failure (``relaunch``) and ``train.resume`` continue from the latest
    checkpoint. Otherwise the checkpoints of a *finished* earlier run are deleted (with
    ``discard``'s extra clean-up) and the run starts fresh, while an *unfinished* run's are
    kept and refused with :class:`ResumeError`: discarding them silently would lose work.
    """
    directory = cfg.checkpoint.dir
    latest = ckpt.latest_step()
    if latest is None:
        if cfg.resume:
            log.warning(
                "train.resume is true but %s holds no checkpoint; starting fresh", directory
            )
        return None
    if relaunch or cfg.resume:
        return latest
    state = ckpt.load(latest)
    if state is not None and state.get("finished"):
        log.warning("deleting the checkpoints of a finished earlier run from %s", directory)
        ckpt.delete_all()
        if discard is not None:
            discard()
        return None
    raise ResumeError(
        f"train.checkpoint.dir {directory} holds checkpoints of an unfinished run (latest "
        f"step {latest}): set train.resume=true to continue it, or point "
        "train.checkpoint.dir at an empty directory to start over"
    )
