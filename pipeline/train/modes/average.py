"""Map-reduce model averaging (``train.mode: average``): local SGD / FedAvg as Spark jobs.

This module is the Spark-free half — a worker's round and the reduce; the driver that runs
one Spark job per round is :mod:`pipeline.launch.rounds`.

No barrier and no process group: every round is one ordinary Spark job. For round ``r``
the driver broadcasts the global weights; each of ``train.num_workers`` tasks builds the
model, loads them, trains ``train.averaging.local_epochs`` epochs (or ``local_steps``
optimizer steps) on its own data and returns its weights with the number of samples it
trained on; ``RDD.treeReduce`` sums ``n_i · w_i`` in float64, and the driver divides by
``Σ n_i`` (``weighting: samples``) or sums ``w_i`` and divides by the number of workers
(``uniform``). The driver then evaluates the new global model on the val split, records
the round (losses, bytes moved, seconds) and checkpoints it.

Which data a worker reads (``train.averaging.partition``): ``rows`` gives worker ``i`` the
slice DDP rank ``i`` reads (:class:`~pipeline.data.reader.ShardReader` with ``rank=i``,
``world_size=num_workers``: equal rows and steps); ``shards`` gives it whole shard files
``i, i + W, …`` (sizes may differ; the sample-weighted average then weighs them).

Optimizer state (``optimizer_state``): ``reset`` builds a fresh optimizer every round;
``average`` sends the state tensors (Adam's moments and step, SGD's momentum) through the
same weighted average and broadcasts them with the weights; ``local`` keeps each worker's
own state between rounds in ``<checkpoint.dir>/workers/worker-NNNNN/`` (tasks are
stateless, so it lives on storage, keyed by worker index and round).

Reproducibility
---------------
A task's result depends only on the broadcast, the round, the worker index and the
config: it seeds its generators from ``(seed, round, worker)``, reads its data at a
position computed from the round, and its learning rate is a function of its step. A
failed task that is retried — by Spark where ``spark.task.maxFailures`` allows (``local[N]``
masters allow one attempt only), or by the driver, which reruns the round's job up to
``train.max_attempts`` times — returns the same bits.

The sum is reproducible too. IEEE addition is commutative but not associative, so a reduce
that adds three values in arrival order can differ in the last bit from run to run. The
job gets a power-of-two number of partitions (the ones past ``num_workers`` are empty) and
treeReduce a depth that makes every combine add exactly two values; at most four partial
sums reach the driver, which adds them in partition order. Together with the checkpoint
written after each round this makes a resumed run end with bitwise the same weights as an
uninterrupted one.

``bytes_sent`` is the broadcast's size times the number of workers (what the workers
receive) and ``bytes_received`` the total size of what they return (safetensors of their
float32 tensors): the traffic between the global model and the workers, per round.

``warmup_ddp_epochs > 0`` first trains that many epochs as an ordinary DDP job (the
barrier launcher, checkpoints under ``<checkpoint.dir>/ddp-warmup/ckpt/``), with the configured
warm-up ramp held at the peak learning rate; the averaging rounds then continue from its
weights (and optimizer state, unless ``reset``) and apply the configured decay over their
own steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import safetensors.torch
import torch
from torch import nn

from pipeline.core import storage
from pipeline.core.configbase import check
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet, SplitInfo
from pipeline.runtime import distenv
from pipeline.runtime.faults import Fault, parse_fault
from pipeline.runtime.rankrun import scoped_environ
from pipeline.train import engine
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import ModelInputs
from pipeline.train.metrics import loss_fn
from pipeline.train.optim import LRFactor
from pipeline.train.preflight import resolve_defaults
from pipeline.train.registry import Mode

__all__ = [
    "MODE",
    "MODEL_PREFIX",
    "OPTIMIZER_PREFIX",
    "WARMUP_DIR",
    "WORKERS_DIR",
    "AverageMode",
    "Contribution",
    "RoundSpec",
    "average",
    "combine",
    "contribution",
    "load_optimizer_tensors",
    "optimizer_tensors",
    "pack",
    "prefixed",
    "reduce_layout",
    "section",
    "shard_view",
    "train_round",
    "unpack",
]

log = logging.getLogger(__name__)

MODEL_PREFIX = "model/"
"""Key prefix of the model's tensors in a broadcast or a contribution."""
OPTIMIZER_PREFIX = "optim/"
"""Key prefix of optimizer state tensors: ``optim/<param index>/<name>``."""
WORKERS_DIR = "workers"
"""Under ``train.checkpoint.dir``: each worker's own optimizer state (``optimizer_state: local``)."""
WARMUP_DIR = "ddp-warmup"
"""Under ``train.checkpoint.dir``: the DDP warm-up's checkpoints (``ckpt/``) and bundle (``model/``)."""


# -- the reduce ---------------------------------------------------------------------------
@dataclass
class Contribution:
    """A worker's result of one round, or the sum of several: the value treeReduce combines.

    A worker's own keeps its tensors serialized as trained (``blob``, safetensors of float32
    weights) and ``weight`` is its factor in the average (its sample count, or 1); once two
    are combined, ``sums`` holds ``Σ weight_i · tensor_i`` in float64 and ``weight`` the
    sum of the factors.
    """

    weight: float
    samples: int
    loss_sum: float
    """Σ over the round's batches of mean loss × rows (float64)."""
    steps: int
    """Optimizer steps of the round (the most any worker made)."""
    nbytes: int
    """Serialized size of the workers' own results."""
    workers: int
    dtypes: dict[str, torch.dtype]
    blob: bytes | None = None
    sums: dict[str, torch.Tensor] | None = None

    def scaled(self) -> dict[str, torch.Tensor]:
        """``Σ weight_i · tensor_i`` in float64 (for a worker's own: its tensors × weight)."""
        if self.sums is not None:
            return self.sums
        assert self.blob is not None, "a contribution holds a blob or sums"
        # float32 × an integer below 2**29 is exact in float64.
        return {k: v.double() * self.weight for k, v in unpack(self.blob).items()}


def contribution(
    tensors: Mapping[str, torch.Tensor],
    *,
    samples: int,
    weighting: str,
    loss_sum: float = 0.0,
    steps: int = 0,
) -> Contribution:
    """A worker's result: ``tensors`` with factor ``samples`` (``weighting: samples``) or 1."""
    if weighting not in ("samples", "uniform"):
        raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
    blob = pack(tensors)
    return Contribution(
        weight=float(samples) if weighting == "samples" else 1.0,
        samples=samples,
        loss_sum=loss_sum,
        steps=steps,
        nbytes=len(blob),
        workers=1,
        dtypes={k: v.dtype for k, v in tensors.items()},
        blob=blob,
    )


def combine(a: Contribution, b: Contribution) -> Contribution:
    """``a + b``. Commutative bit for bit, as IEEE addition is; not associative."""
    x, y = a.scaled(), b.scaled()
    if x.keys() != y.keys():
        raise ValueError(
            f"workers returned different tensors: {sorted(x.keys() ^ y.keys())[:5]} are not in both"
        )
    return Contribution(
        weight=a.weight + b.weight,
        samples=a.samples + b.samples,
        loss_sum=a.loss_sum + b.loss_sum,
        steps=max(a.steps, b.steps),
        nbytes=a.nbytes + b.nbytes,
        workers=a.workers + b.workers,
        dtypes=a.dtypes,
        sums={k: x[k] + y[k] for k in x},
    )


def average(total: Contribution) -> dict[str, torch.Tensor]:
    """``Σ weight_i · tensor_i / Σ weight_i`` in float64, cast back to each tensor's dtype.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are rounded.
    """
    if total.weight <= 0:
        raise ValueError(
            f"the {total.workers} worker(s) trained on {total.samples} samples in this round: "
            "nothing to average"
        )
    out = {}
    for key, value in total.scaled().items():
        mean = value / total.weight
        dtype = total.dtypes[key]
        out[key] = (mean if dtype.is_floating_point else mean.round()).to(dtype)
    return out


def reduce_layout(workers: int) -> tuple[int, int]:
    """``(partitions, depth)`` for ``treeReduce`` so that every combine adds two values.

    Up to 4 partitions treeReduce adds no level: the driver adds them in partition order.
    Beyond, a power of two with depth ``log2 + 1`` (scale 2) pairs partitions ``i`` and
    ``i + n/2`` at each level until 4 remain.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers <= 4:
        return workers, 2
    levels = math.ceil(math.log2(workers))
    return 2**levels, levels + 1


def pack(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes (CPU copies, so that no two share storage)."""
    return safetensors.torch.save(
        {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    )


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack` (no pickle involved)."""
    return dict(safetensors.torch.load(blob))


def section(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (e.g. :data:`MODEL_PREFIX`), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every key under ``prefix``."""
    return {prefix + k: v for k, v in tensors.items()}


def optimizer_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An ``optimizer.state_dict()``'s per-parameter state as flat ``<index>/<name>`` tensors."""
    return {
        f"{index}/{name}": value.detach().to("cpu", copy=True)
        for index, entry in state["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: Mapping[str, Any]) -> None:
    """Load :func:`optimizer_tensors` output; param groups (LR etc.) stay the optimizer's own."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- one worker's round (task side; Spark-free) ----------------------------------------------
@dataclass(frozen=True)
class RoundSpec:
    """What every task of a round's job gets besides the broadcast (plain, picklable)."""

    config: dict[str, Any]
    """The ``train`` section as plain data."""
    round: int
    attempt: int
    """0-based rerun of this round's job by the driver."""
    epoch_offset: int = 0
    """Reader epochs the DDP warm-up used: averaging continues with the next ones."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables (``fit(env=…)``), set while the task trains."""


@dataclass(frozen=True)
class _Steps:
    """Where a worker's round sits in its data stream and learning-rate schedule."""

    first: int  # optimizer steps this worker made in earlier rounds
    count: int  # steps in this round
    total: int  # steps in all rounds: the schedule's length
    epoch: int  # reader epoch of the first step
    batch: int  # batches of that epoch read in earlier rounds


def _steps(cfg: TrainConfig, spec: RoundSpec, steps_per_epoch: int) -> _Steps:
    avg = cfg.averaging
    per_round = avg.local_steps or (avg.epochs_per_round or 1) * steps_per_epoch
    first = spec.round * per_round
    return _Steps(
        first=first,
        count=per_round,
        total=avg.rounds * per_round,
        epoch=spec.epoch_offset + first // steps_per_epoch,
        batch=first % steps_per_epoch,
    )


def train_round(
    spec: RoundSpec, worker: int, payload: bytes, *, attempt: int = 0, threads: int = 1
) -> Contribution:
    """Train worker ``worker``'s part of round ``spec.round`` from the broadcast ``payload``.

    ``attempt`` counts earlier tries of this task (for ``SPARK_TRAIN_FAULT``); ``threads``
    is torch's intra-op thread count (``spark.task.cpus``). The device is the task's GPU when
    Spark assigned one (``spec.env`` carries the launcher's device variables), else the CPU.
    Deterministic for given inputs.
    """
    shards = ShardSet.open(spec.config["dataset"])
    cfg = resolve_defaults(TrainConfig.from_mapping(spec.config), shards)
    with (
        scoped_environ(spec.env),
        engine.deterministic(threads),
        _train_reader(cfg, shards, worker) as reader,
    ):
        if reader.steps_per_epoch == 0:
            raise ValueError(
                f"worker {worker} has no training rows in {cfg.dataset} "
                f"(train.averaging.partition={cfg.averaging.partition!r}, "
                f"train.num_workers={cfg.max_workers})"
            )
        device, _ = distenv.device_and_backend()
        engine.seed_from(cfg.seed, spec.round, worker)
        model = engine.new_model(cfg, shards)
        received = unpack(payload)
        model.load_state_dict(section(received, MODEL_PREFIX))
        model.to(device)
        optimizer = engine.new_optimizer(model, cfg)
        state = _optimizer_state(cfg, spec, worker, received)
        if state:
            load_optimizer_tensors(optimizer, state)
        steps = _steps(cfg, spec, reader.steps_per_epoch)
        inputs = engine.model_inputs(cfg, shards)
        loop = _LocalLoop(
            cfg, model, optimizer, device, inputs, task=shards.task, warmup=spec.epoch_offset == 0
        )
        loop.run(reader, steps, fault=parse_fault(), worker=worker, attempt=attempt)
    return contribution(
        _results(cfg, spec, worker, model, optimizer),
        samples=loop.rows,
        weighting=cfg.averaging.weighting,
        loss_sum=loop.loss_sum,
        steps=steps.count,
    )


def _results(
    cfg: TrainConfig,
    spec: RoundSpec,
    worker: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, torch.Tensor]:
    """What the worker sends back; with ``optimizer_state: local`` it stores its state."""
    tensors = prefixed(model.state_dict(), MODEL_PREFIX)
    own = optimizer_tensors(optimizer.state_dict())
    if cfg.averaging.optimizer_state == "average":
        tensors.update(prefixed(own, OPTIMIZER_PREFIX))
    elif cfg.averaging.optimizer_state == "local":
        _worker_checkpoints(cfg, worker).save(spec.round + 1, {"optimizer": own})
    return tensors


def _optimizer_state(
    cfg: TrainConfig, spec: RoundSpec, worker: int, received: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The state this worker's optimizer starts the round with (empty: a fresh one)."""
    policy = cfg.averaging.optimizer_state
    if policy == "reset":
        return {}
    if policy == "local" and spec.round > 0:
        manager = _worker_checkpoints(cfg, worker)
        saved = manager.load(spec.round)  # raises, naming the directory, when it is missing
        assert saved is not None, "load(step) raises rather than returning None"
        return dict(saved["optimizer"])
    # average, or local in round 0: what the driver sent (the DDP warm-up's state, if any)
    return section(received, OPTIMIZER_PREFIX)


def _worker_checkpoints(cfg: TrainConfig, worker: int) -> CheckpointManager:
    # One more than the driver keeps, so every global checkpoint has its workers' states.
    uri = storage.join(cfg.checkpoint.dir, WORKERS_DIR, f"worker-{worker:05d}")
    return CheckpointManager(uri, keep=cfg.checkpoint.keep + 1)


def _train_reader(cfg: TrainConfig, shards: ShardSet, worker: int) -> ShardReader:
    """Worker ``worker``'s training data (see ``train.averaging.partition``)."""
    workers = cfg.max_workers
    if cfg.averaging.partition == "shards":
        shards, worker, workers = shard_view(shards, worker, workers), 0, 1
    return ShardReader(
        shards,
        "train",
        rank=worker,
        world_size=workers,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=True,
        drop_last=cfg.drop_last,
        verify=cfg.verify,
    )


def shard_view(shards: ShardSet, worker: int, workers: int) -> ShardSet:
    """``shards`` with its train split cut to shard files ``worker, worker + workers, …``."""
    mine = shards.split("train").shards[worker::workers]
    train = SplitInfo("train", sum(s.rows for s in mine), mine)
    view = dataclasses.replace(shards.info, splits={**shards.info.splits, "train": train})
    return ShardSet(shards.uri, view.to_json())


class _LocalLoop:
    """A worker's optimizer steps of one round."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        inputs: ModelInputs,
        *,
        task: str,
        warmup: bool,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.device = cfg, model, optimizer, device
        self.task = task
        self.inputs = inputs
        self.stepper = engine.Stepper(cfg, model, optimizer)
        # Each group's peak rate: train.optimizer.lr × its lr_multipliers factor.
        self.peaks = [float(group["lr"]) for group in optimizer.param_groups]
        self.autocast = engine.autocast(cfg, device)
        self.warmup_steps = cfg.lr_schedule.warmup_steps if warmup else 0
        self.loss_sum = 0.0
        self.rows = 0

    def run(
        self, reader: ShardReader, steps: _Steps, *, fault: Fault | None, worker: int, attempt: int
    ) -> None:
        """Train ``steps.count`` steps from the round's position in the worker's stream."""
        cfg = self.cfg
        factor = LRFactor(cfg.lr_schedule.name, self.warmup_steps, steps.total)
        reader.load_state_dict({"epoch": steps.epoch, "batches_in_epoch": steps.batch})
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        done = 0
        while done < steps.count:
            for batch in reader:
                scale = factor(steps.first + done)
                for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
                    group["lr"] = peak * scale
                x, y = engine.to_model(self.inputs, batch, self.device)
                loss_sum.add_(self._step(x, y), alpha=y.shape[0])
                self.rows += y.shape[0]
                done += 1
                if fault is not None:
                    fault.maybe_fire(rank=worker, step=steps.first + done, attempt=attempt)
                if done == steps.count:
                    break
        self.loss_sum = float(loss_sum)

    def _step(self, x: engine.ModelArgument, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = loss_fn(self.model(x), y, self.task, reduction="mean")
        loss.backward()
        self.stepper()
        return loss.detach()


class AverageMode(Mode):
    """Model averaging: one Spark job per round (:mod:`pipeline.launch.rounds`)."""

    name: ClassVar[str] = "average"
    launcher: ClassVar[str] = "rounds"

    def check_config(self, cfg: TrainConfig) -> None:
        """Accumulation has no meaning per round; DDP's comm hooks only in the warm-up."""
        check(
            cfg.grad_accum_steps == 1,
            "train.grad_accum_steps",
            f"must be 1 with train.mode 'average' (got {cfg.grad_accum_steps}): each worker "
            "steps on every batch of its own; raise train.batch_size instead",
        )
        check(
            cfg.comm_hook == "none" or cfg.averaging.warmup_ddp_epochs > 0,
            "train.comm_hook",
            f"{cfg.comm_hook!r} is a DDP gradient hook; train.mode 'average' exchanges "
            "weights once per round, so it applies only to a DDP warm-up "
            "(train.averaging.warmup_ddp_epochs > 0): set it to 'none'",
        )

    def check_data(self, cfg: TrainConfig, shards: ShardSet) -> None:
        """With ``partition: shards`` every worker must get at least one shard with rows."""
        if cfg.averaging.partition != "shards":
            return
        split, workers = shards.split("train"), cfg.max_workers
        rows = [sum(s.rows for s in split.shards[i::workers]) for i in range(workers)]
        empty = [i for i, n in enumerate(rows) if n == 0]
        if empty:
            raise ValueError(
                f"train.averaging.partition 'shards' leaves worker(s) {empty} without rows: "
                f"split 'train' of {cfg.dataset} has {len(split.shards)} shard(s) for "
                f"train.num_workers={workers} (rows per worker {rows}); use partition 'rows' "
                "or fewer workers"
            )


MODE = AverageMode()
