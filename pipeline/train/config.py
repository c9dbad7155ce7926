"""The ``train`` config section: what to train, how, and where checkpoints and the bundle go.

Built from plain YAML data with :func:`pipeline.core.configbase.build`; every section validates
its own values in ``__post_init__`` and names the dotted key of a bad value
(``train.optimizer.lr``). The fine-tuning sections live in :mod:`pipeline.train.tuneconfig` and
the elastic ``num_workers`` in :mod:`pipeline.train.workers`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.core.compat import canonical_builder
from pipeline.core.configbase import ConfigError, build, check
from pipeline.core.outputs import check_output_uri
from pipeline.train.tuneconfig import FreezeConfig, InitConfig
from pipeline.train.workers import WorkersConfig

__all__ = [
    "AveragingConfig",
    "CheckpointConfig",
    "FreezeConfig",
    "InitConfig",
    "LRScheduleConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PowerSGDConfig",
    "TrackingConfig",
    "TrainConfig",
    "WorkersConfig",
]


def _frozen_mapping(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which network to build (``train.model``)."""

    builder: str = "pipeline.train.models:mlp"
    """``module:function`` returning an ``nn.Module``; called with ``input_shape``,
    ``num_outputs`` (both taken from the shard set) and ``args``. Or a model of the
    ecosystem: ``torchvision:<constructor>``, ``timm:<model name>`` (extra ``vision``) or
    ``hf:<AutoModelFor… class>`` with ``args.model_dir`` / ``args.config`` (extra ``hf``);
    see README "Fine-tuning"."""

    args: Mapping[str, Any] = field(default_factory=_frozen_mapping)
    """Keyword arguments for the builder (e.g. ``{hidden: [256, 256], dropout: 0.1}``).
    ``input_shape`` here overrides the shard set's feature shape (a CNN's ``[C, H, W]``)."""

    def __post_init__(self) -> None:
        module, sep, attr = self.builder.partition(":")
        check(
            bool(sep and module and attr),
            "train.model.builder",
            f"must look like 'package.module:function', got {self.builder!r}",
        )
        # An earlier release's spelling (pipeline.models:mlp) runs as today's, deprecated.
        object.__setattr__(self, "builder", canonical_builder(self.builder))
        check(
            "num_outputs" not in self.args,
            "train.model.args.num_outputs",
            "is derived from the shard set (classes or 1 for regression); remove it",
        )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer (``train.optimizer``)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer: ``adamw``, ``adam`` or ``sgd``."""

    lr: float | None = None
    """Peak learning rate (reached after warm-up). Unset (null): the model's recommended
    rate: 0.01 for ``pipeline.train.models:text`` with ``encoder: bag`` (its default),
    0.001 for the other built-in models and for builders that recommend none (a builder
    recommends one with a ``recommended_lr`` attribute: a number, or a function of
    ``train.model.args``). The rate used is written to the bundle's ``config.yaml``."""

    weight_decay: float = 0.0
    """Weight decay (decoupled for ``adamw``, L2 for ``adam`` and ``sgd``)."""

    momentum: float | None = None
    """SGD momentum (``sgd`` only; default 0)."""

    lr_multipliers: Mapping[str, float] = field(default_factory=_frozen_mapping)
    """Per-parameter learning rates (discriminative fine-tuning): ``{pattern: factor}``, a
    parameter whose name matches a glob pattern (``fnmatch``: ``layer4.*``, ``*.bias``)
    trains at ``lr`` × factor (the first matching pattern, in the order written, wins; others
    at ``lr``); the schedule scales every group alike. A pattern that matches no parameter is
    an error."""

    def __post_init__(self) -> None:
        if self.lr is not None:
            check(self.lr > 0, "train.optimizer.lr", f"must be > 0, got {self.lr}")
        for pattern, factor in self.lr_multipliers.items():
            check(
                bool(pattern.strip()),
                "train.optimizer.lr_multipliers",
                "has an empty pattern",
            )
            check(
                factor > 0,
                f"train.optimizer.lr_multipliers.{pattern}",
                f"must be > 0, got {factor} (freeze parameters with train.freeze.patterns)",
            )
        check(
            self.weight_decay >= 0,
            "train.optimizer.weight_decay",
            f"must be >= 0, got {self.weight_decay}",
        )
        if self.momentum is not None:
            check(
                self.name == "sgd",
                "train.optimizer.momentum",
                f"applies to sgd only (optimizer is {self.name!r})",
            )
            check(
                0 <= self.momentum < 1,
                "train.optimizer.momentum",
                f"must be in [0, 1), got {self.momentum}",
            )


@dataclass(frozen=True, kw_only=True)
class LRScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step (``train.lr_schedule``)."""

    name: Literal["cosine", "constant", "linear"] = "cosine"
    """Shape after warm-up: ``cosine`` or ``linear`` decay to 0 at the last step, or
    ``constant``."""

    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``train.optimizer.lr``."""

    def __post_init__(self) -> None:
        check(
            self.warmup_steps >= 0,
            "train.lr_schedule.warmup_steps",
            f"must be >= 0, got {self.warmup_steps}",
        )


@dataclass(frozen=True, kw_only=True)
class PowerSGDConfig:
    """PowerSGD gradient compression (``train.powersgd``).

    Used only when ``train.comm_hook`` is ``powersgd``.
    """

    matrix_rank: int = 1
    """Rank of the low-rank gradient approximation (higher: more accurate, more traffic)."""

    start_iter: int = 1000
    """Optimizer steps of plain all-reduce before compression starts (PowerSGD's warm-up)."""

    def __post_init__(self) -> None:
        check(
            self.matrix_rank >= 1,
            "train.powersgd.matrix_rank",
            f"must be >= 1, got {self.matrix_rank}",
        )
        # torch requires > 1 because error feedback and warm start are on.
        check(
            self.start_iter >= 2,
            "train.powersgd.start_iter",
            f"must be >= 2, got {self.start_iter}",
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often checkpoints are written (``train.checkpoint``)."""

    dir: str = "out/ckpt"
    """Checkpoint directory (local path or pyarrow.fs URI shared by all workers)."""

    every_steps: int = 500
    """Write a checkpoint every this many optimizer steps (0: only at the end of each
    epoch, which always writes one)."""

    keep: int = 3
    """How many most recent checkpoints to keep."""

    def __post_init__(self) -> None:
        check(bool(self.dir), "train.checkpoint.dir", "must not be empty")
        check_output_uri("train.checkpoint.dir", self.dir)
        check(
            self.every_steps >= 0,
            "train.checkpoint.every_steps",
            f"must be >= 0, got {self.every_steps}",
        )
        check(self.keep >= 1, "train.checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Experiment tracking (``train.tracking``); both integrations are off by default."""

    mlflow_uri: str | None = None
    """MLflow tracking URI (``http://host:5000``, ``file:///path/mlruns``, ...). When set,
    the run's parameters, per-epoch metrics and the bundle are logged to MLflow; needs the
    ``tracking`` extra (``pip install 'spark-train[tracking]'``)."""

    experiment: str = "spark-train"
    """MLflow experiment name (created when missing)."""

    run_name: str | None = None
    """MLflow run name (null: MLflow picks one)."""

    tensorboard_dir: str | None = None
    """Write TensorBoard event files with the per-epoch metrics to this local directory."""

    def __post_init__(self) -> None:
        check(
            self.mlflow_uri is None or bool(self.mlflow_uri.strip()),
            "train.tracking.mlflow_uri",
            "must be a URI or null",
        )
        check(bool(self.experiment), "train.tracking.experiment", "must not be empty")
        check(
            self.tensorboard_dir is None or bool(self.tensorboard_dir.strip()),
            "train.tracking.tensorboard_dir",
            "must be a directory or null",
        )


@dataclass(frozen=True, kw_only=True)
class AveragingConfig:
    """Map-reduce model averaging (``train.averaging``), used when ``train.mode`` is ``average``.

    Each round is one Spark job: every worker trains the broadcast global model on its own
    data, and a tree reduce averages the results (local SGD / FedAvg). Training length is
    ``warmup_ddp_epochs`` DDP epochs plus ``rounds`` × (``local_epochs`` or ``local_steps``);
    ``train.epochs`` is not used in this mode.
    """

    rounds: int = 10
    """Averaging rounds (synchronizations of the workers' weights)."""

    local_epochs: int | None = None
    """Passes over its own data each worker makes per round (null: 1, unless
    ``local_steps`` is set)."""

    local_steps: int | None = None
    """Optimizer steps each worker makes per round, instead of whole epochs (the data stream
    continues across rounds and epochs). Mutually exclusive with ``local_epochs``."""

    optimizer_state: Literal["reset", "average", "local"] = "reset"
    """Optimizer state across rounds: ``reset`` (a fresh optimizer every round), ``average``
    (averaged and broadcast like the weights), or ``local`` (each worker keeps its own,
    stored under ``train.checkpoint.dir``/workers/ between rounds)."""

    weighting: Literal["samples", "uniform"] = "samples"
    """Weight of each worker in the average: the samples it trained on in the round, or 1."""

    partition: Literal["rows", "shards"] = "rows"
    """Which data a worker trains on: ``rows``, the same equal slice of the split that DDP
    rank i reads (equal sample counts); or ``shards``, whole shard files i, i + W, i + 2W, …
    (sizes may differ, which is where ``weighting: samples`` matters)."""

    warmup_ddp_epochs: int = 0
    """Epochs of ordinary DDP training before averaging starts (post-local SGD); the
    averaging rounds continue from its weights and optimizer state."""

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "train.averaging.rounds", f"must be >= 1, got {self.rounds}")
        for key in ("local_epochs", "local_steps"):
            value = getattr(self, key)
            check(
                value is None or value >= 1,
                f"train.averaging.{key}",
                f"must be >= 1 or null, got {value}",
            )
        check(
            self.local_epochs is None or self.local_steps is None,
            "train.averaging.local_steps",
            f"is mutually exclusive with train.averaging.local_epochs (got local_epochs="
            f"{self.local_epochs}, local_steps={self.local_steps}); set only one",
        )
        check(
            self.warmup_ddp_epochs >= 0,
            "train.averaging.warmup_ddp_epochs",
            f"must be >= 0, got {self.warmup_ddp_epochs}",
        )

    @property
    def epochs_per_round(self) -> int | None:
        """Local epochs per round, or None when rounds are counted in ``local_steps``."""
        if self.local_steps is not None:
            return None
        return self.local_epochs or 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The ``train`` section: data, model, optimisation, fault tolerance and output."""

    dataset: str = "out/shards"
    """URI of the shard set written by the ETL."""

    task: Literal["classification", "regression"] | None = None
    """``classification`` (cross-entropy, accuracy) or ``regression`` (MSE, RMSE). Unset
    (null): the shard set's label task, from its manifest; set, it must match it."""

    mode: str = "ddp"
    """Training mode, a name in the mode registry (:mod:`pipeline.train.modes`): ``ddp``
    (DistributedDataParallel), ``fsdp`` (FSDP2 ``fully_shard``: parameters, gradients and
    optimizer state sharded over the ranks) or ``average`` (map-reduce model averaging, one
    Spark job per round, no barrier; see ``train.averaging``), or a registered one. Checked
    where the mode is resolved, on the driver before any rank starts (``fit``, the CLI, the
    estimator): a rank rebuilding this config needs no registration of its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""

    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights (fine-tuning a pretrained model)."""

    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Frozen parameters."""

    num_workers: int | WorkersConfig = 2
    """Number of training processes (ranks); or a range ``{min, max, wait_s}``: elastic
    training, with as many ranks as the cluster has barrier slots (``ddp`` and ``fsdp``;
    ``average`` runs ``max`` tasks per round, in waves when the cluster has fewer slots).
    README, "Elastic training and preemption"."""

    epochs: int = 5
    """Passes over the training split."""

    batch_size: int = 512
    """Rows per micro-batch per worker (with a ``num_workers`` range: per worker at ``max``
    workers; the global batch stays ``batch_size × max`` at every world size)."""

    drop_last: bool = False
    """Drop each rank's partial last batch of an epoch (as ``DataLoader(drop_last=True)``).
    The preflight refuses a model with BatchNorm layers whose last batch would hold 1 row,
    naming this key."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""

    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """The learning-rate schedule."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (``ddp`` all-reduces gradients on the last one only;
    ``fsdp`` reduce-scatters each one into the sharded gradients)."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """``fp32``, or ``bf16`` autocast of the forward pass (weights stay fp32)."""

    grad_clip: float | None = None
    """Clip the global gradient norm to this value (null: no clipping)."""

    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"
    """DDP gradient communication hook: plain all-reduce, fp16/bf16 compression or PowerSGD
    (``mode: ddp`` only; ``fsdp`` refuses any other than ``none``)."""

    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)
    """PowerSGD settings (used only with ``comm_hook: powersgd``)."""

    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    """Model averaging settings (used only with ``mode: average``)."""

    seed: int = 0
    """Seed of model initialisation, data order and dropout."""

    timeout_s: float = 600.0
    """Timeout of collective operations (a hung peer fails the job after this long); a rank
    stuck outside them, or frozen, ends the attempt after this plus max(10 s, 25 %)."""

    max_attempts: int = 3
    """Launches of the whole job in total; after a failure the job is relaunched and
    resumes from the latest checkpoint. Relaunches after a planned stop (a preemption
    notice, growing an elastic run) do not count."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    output: str = "out/model"
    """URI of the model bundle written at the end (replaced atomically)."""

    resume: bool = False
    """Continue from the latest checkpoint in ``train.checkpoint.dir`` left by an earlier,
    interrupted run (relaunches after a failure always resume)."""

    verify: Literal["auto", "full", "size", "none"] = "auto"
    """Shard verification before reading: sha256 (``full``; ``auto`` below 1 GiB), size
    only, or none."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow and TensorBoard logging of the finished run."""

    def __post_init__(self) -> None:
        check(bool(self.dataset), "train.dataset", "must not be empty")
        check(bool(self.output), "train.output", "must not be empty")
        check_output_uri("train.output", self.output)
        for key in ("epochs", "batch_size", "grad_accum_steps", "max_attempts"):
            value = getattr(self, key)
            check(value >= 1, f"train.{key}", f"must be >= 1, got {value}")
        if not self.elastic:
            check(
                self.num_workers >= 1,  # type: ignore[operator]
                "train.num_workers",
                f"must be >= 1, got {self.num_workers}",
            )
        check(self.timeout_s > 0, "train.timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.grad_clip is not None:
            check(
                self.grad_clip > 0, "train.grad_clip", f"must be > 0 or null, got {self.grad_clip}"
            )
        if self.freeze.epochs is not None:
            check(
                self.mode == "ddp",
                "train.freeze.epochs",
                f"unfreezing during the run needs train.mode 'ddp' (got {self.mode!r}); freeze "
                "for the whole run (null), or train the unfrozen model in a second run",
            )
            check(
                self.freeze.epochs < self.epochs,
                "train.freeze.epochs",
                f"is {self.freeze.epochs} but the run has train.epochs={self.epochs}: nothing "
                "would be unfrozen (null freezes for the whole run)",
            )
        # The chosen mode's own checks (fsdp and comm_hook, average and accumulation, ...)
        # run in the training preflight: a mode module imports torch, a config does not.

    @property
    def elastic(self) -> bool:
        """True when ``num_workers`` is a range (:class:`WorkersConfig`)."""
        return isinstance(self.num_workers, WorkersConfig)

    @property
    def max_workers(self) -> int:
        """``num_workers``, or the range's ``max``."""
        n = self.num_workers
        return n.max if isinstance(n, WorkersConfig) else n

    @property
    def min_workers(self) -> int:
        """``num_workers``, or the range's ``min``."""
        n = self.num_workers
        return n.min if isinstance(n, WorkersConfig) else n

    @property
    def global_batch(self) -> int:
        """Rows per micro-batch over all ranks at ``max_workers``."""
        return self.batch_size * self.max_workers

    def world_sizes(self) -> tuple[int, ...]:
        """The world sizes a launch may take, largest first.

        An int ``num_workers``: that one. A range: each size from ``max`` down to ``min``
        that divides the global batch, so that every rank takes the same share of it.
        """
        if not self.elastic:
            return (self.max_workers,)
        top, low = self.max_workers, self.min_workers
        return tuple(w for w in range(top, low - 1, -1) if self.global_batch % w == 0)

    def rank_batch(self, world_size: int) -> int:
        """Rows per micro-batch per rank at ``world_size`` (``batch_size`` unless elastic)."""
        if not self.elastic:
            return self.batch_size
        return self.global_batch // world_size

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, prefix: str = "train") -> TrainConfig:
        """Build and validate the section from YAML data; errors name ``prefix.key``."""
        return build(cls, data, prefix)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some top-level fields changed (validated again)."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as e:
            raise ConfigError("train", str(e)) from e
