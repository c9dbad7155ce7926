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
import dataclasses
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from pipeline.core.compat import DEPRECATION_LOGGER, written_by
from pipeline.core.configbase import to_dict
from pipeline.data.batch import Batch
from pipeline.data.shardset import ShardSet
from pipeline.train import finetune
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import ModelInputs
from pipeline.train.models import build_model, cnn, resolve_builder
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
    "checkpoint_builder",
    "deterministic",
    "initial_model",
    "model_inputs",
    "model_shape",
    "new_model",
    "new_optimizer",
    "resume_step",
    "seed_everything",
    "seed_from",
    "to_model",
    "with_builder",
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
    """A freshly initialised model (seed first for identical weights on every rank).

    Parameters matching ``train.freeze.patterns`` come with ``requires_grad`` off; the
    weights are the builder's (:func:`initial_model` loads ``train.init``'s).
    """
    input_shape, num_outputs = model_shape(cfg, shards)
    inputs = model_inputs(cfg, shards)
    model = build_model(
        cfg.model.builder,
        input_shape=input_shape,
        num_outputs=num_outputs,
        args=builder_args(cfg),
        inputs=inputs.spec(),
        vocab=inputs.vocab(),
    )
    finetune.apply_freeze(model, cfg.freeze)
    return model


def initial_model(cfg: TrainConfig, shards: ShardSet) -> tuple[nn.Module, dict[str, Any] | None]:
    """:func:`new_model` with ``train.init``'s weights loaded; and the bundle's ``init`` record.

    The record (uri, format, sha256 of the bytes loaded) is None without ``train.init``.
    """
    model = new_model(cfg, shards)
    if cfg.init.uri is None:
        return model, None
    return model, finetune.load_initial(cfg.init, model)


def new_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``module``'s trainable parameters (after placing it).

    Frozen parameters (``requires_grad`` off) are left out; the others are grouped by their
    ``train.optimizer.lr_multipliers`` factor.
    """
    return build_optimizer(finetune.param_groups(module, cfg.optimizer), cfg.optimizer)


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


CNN_V1: Final = "pipeline.train.models:cnn_v1"
"""The builder of 0.1.0's ``cnn`` architecture (:func:`pipeline.train.models.cnn_v1`)."""


def checkpoint_builder(
    cfg: TrainConfig, shards: ShardSet, ckpt: CheckpointManager, *, relaunch: bool = False
) -> str:
    """The builder to build the model with so that the checkpoint this run resumes fits it.

    ``train.model.builder``, except for a checkpoint of 0.1.0's ``cnn`` architecture under
    a builder that is the built-in ``cnn``: weights (names and shapes of the ``model``
    state) that fit :func:`~pipeline.train.models.cnn_v1` and not today's ``cnn`` — as a
    bundle of that release is loaded. Then it is :data:`CNN_V1`, with one warning naming
    the builder to configure. Decided by the weights alone, whoever wrote them: a run that
    resumed a 0.1.0 checkpoint writes its later checkpoints (as spark-train 0.2+) with the
    same weights, and the next resume with the same config must map them again. Decide this on the driver or rank 0 only (it reads the checkpoint), before
    any rank builds its model, and give every rank the answer.
    """
    builder = cfg.model.builder
    if not (cfg.resume or relaunch) or resolve_builder(builder) is not cnn:
        return builder
    step = ckpt.latest_step()
    if step is None:
        return builder
    writer = written_by(ckpt.meta(step).get("spark_train"))
    state = ckpt.load(step)
    weights = state.get("model") if state is not None else None
    if not isinstance(weights, dict) or _fits(builder, cfg, shards, weights):
        return builder
    if not _fits(CNN_V1, cfg, shards, weights):
        return builder  # neither: loading it fails and says why
    logging.getLogger(DEPRECATION_LOGGER).warning(
        "train.model.builder %r: checkpoint %s was written by spark-train %s for the 0.1.0 "
        "cnn architecture; resuming it with %r (set train.model.builder to %r to silence this)",
        builder,
        ckpt.path(step),
        writer or "0.1.0",
        CNN_V1,
        CNN_V1,
    )
    return CNN_V1


def with_builder(cfg: TrainConfig, builder: str) -> TrainConfig:
    """``cfg`` with ``train.model.builder`` set to ``builder`` (itself when it is already)."""
    if builder == cfg.model.builder:
        return cfg
    return cfg.replace(model=dataclasses.replace(cfg.model, builder=builder))


def _fits(builder: str, cfg: TrainConfig, shards: ShardSet, weights: dict[str, Any]) -> bool:
    """Whether ``weights`` has exactly the names and shapes of ``builder``'s model."""
    with torch.device("meta"):
        own = new_model(with_builder(cfg, builder), shards).state_dict()
    return own.keys() == weights.keys() and all(
        isinstance(weights[k], torch.Tensor) and weights[k].shape == own[k].shape for k in own
    )
