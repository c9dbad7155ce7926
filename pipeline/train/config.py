"""The ``train`` config section: what to train, how, and where checkpoints and the bundle go.

Built from plain YAML data with :func:`pipeline.core.configbase.build`; every section validates
its own values in ``__post_init__`` and names the dotted key of a bad value
(``train.optimizer.lr``).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.core.compat import canonical_builder
from pipeline.core.configbase import ConfigError, build, check
from pipeline.core.outputs import check_output_uri
from pipeline.train.modetable import mode_names

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


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


def _replacement_problem(pattern: str, replacement: str) -> str | None:
    """Why ``replacement`` cannot replace ``pattern`` (a group it does not have), or None."""
    try:
        re.sub(pattern, replacement, "")  # the template is checked even without a match
    except (re.error, TypeError) as e:
        return str(e)
    return None


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Initial weights from a file or directory (``train.init``), instead of random ones."""

    uri: str | None = None
    """Where the initial weights are (any storage URI): a ``.safetensors`` file, a torch
    state dict (``.pt`` / ``.pth`` / ``.bin``, loaded with ``weights_only=True``), a model
    bundle of ours, or a Hugging Face model directory (``model.safetensors`` or
    ``pytorch_model.bin``, sharded ones through their index). Null: random initialisation.
    The driver checks it against the model before any rank starts; the bundle records it
    and its sha256 (``model.json`` ``init``)."""

    format: Literal["auto", "safetensors", "torch", "bundle", "huggingface"] = "auto"
    """How to read ``uri``: ``auto`` decides by its name (``.safetensors``; ``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``; a directory with ``model.json`` is a bundle, one with
    ``config.json`` a Hugging Face model)."""

    rename: Mapping[str, str] = field(default_factory=_frozen_mapping)
    """``{regex: replacement}`` applied to every key of the file, in the order written
    (``re.sub``; e.g. ``{"^backbone\\.": ""}``), before ``skip`` and before matching the
    model's keys."""

    skip: tuple[str, ...] = ()
    """Glob patterns (``fnmatch``) of keys, after ``rename``, not to load: e.g. ``fc.*`` for
    a head that gets another number of outputs."""

    strict: bool = False
    """``true``: every model key must be loaded and every key of the file used (after
    ``skip``); ``false``: keys that are missing or unexpected are counted in the summary
    line and the model keeps its initialisation for them. A shape mismatch that no ``skip``
    covers is an error either way."""

    def __post_init__(self) -> None:
        check(
            self.uri is None or bool(self.uri.strip()),
            "train.init.uri",
            "must be a URI or null",
        )
        for pattern, replacement in self.rename.items():
            problem = _regex_problem(pattern)
            check(
                problem is None,
                f"train.init.rename.{pattern}",
                f"is not a regular expression: {problem}",
            )
            problem = _replacement_problem(pattern, replacement)
            check(
                problem is None,
                f"train.init.rename.{pattern}",
                f"replacement {replacement!r} does not fit the pattern: {problem}",
            )
        for i, pattern in enumerate(self.skip):
            check(bool(pattern.strip()), f"train.init.skip[{i}]", "must not be empty")
        if self.uri is None:
            check(
                not (self.rename or self.skip or self.strict),
                "train.init.uri",
                "is null, but train.init has rename / skip / strict: set the URI",
            )


@dataclass(frozen=True, kw_only=True)
class FreezeConfig:
    """Parameters that do not train (``train.freeze``), e.g. a pretrained backbone."""

    patterns: tuple[str, ...] = ()
    """Glob patterns (``fnmatch``) of parameter names (as in the model's ``state_dict``,
    e.g. ``conv1.*``, ``layer*``, ``bert.embeddings.*``): matching parameters get
    ``requires_grad = False`` and are left out of the optimizer, so they end the run
    bitwise as they started. A pattern that matches no parameter is an error. Buffers
    (BatchNorm running statistics) are not parameters: they still update in training."""

    epochs: int | None = None
    """Keep them frozen for this many epochs, then train them too, in parameter groups of
    their own that follow the schedule (null: the whole run). ``train.mode: ddp`` only."""

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.patterns):
            check(bool(pattern.strip()), f"train.freeze.patterns[{i}]", "must not be empty")
        if self.epochs is not None:
            check(
                self.epochs >= 1, "train.freeze.epochs", f"must be >= 1 or null, got {self.epochs}"
            )
            check(
                bool(self.patterns),
                "train.freeze.epochs",
                "is set but train.freeze.patterns is empty",
            )


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
    Spark job per round, no barrier; see ``train.averaging``), or a registered one."""

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
        known = mode_names()
        check(
            self.mode in known,
            "train.mode",
            f"unknown mode {self.mode!r}; known: {', '.join(map(repr, known))}",
        )
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
