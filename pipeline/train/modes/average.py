"""Map-reduce model averaging (``train.mode: average``): local SGD / FedAvg as Spark jobs.

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

import contextlib
import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from pipeline.core import storage
from pipeline.core.configbase import to_dict
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.launch.fit import TrainResult, _train
from pipeline.runtime.faults import Fault, parse_fault
from pipeline.runtime.rankrun import scoped_environ
from pipeline.runtime.timeouts import watchdog
from pipeline.train import bundle
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.engine import ResumeError, builder_args, model_shape
from pipeline.train.metrics import EvalSums, loss_fn
from pipeline.train.models import build_model
from pipeline.train.optim import LRFactor, build_optimizer

if TYPE_CHECKING:
    from pyspark import Broadcast, SparkContext

    from pipeline.launch.launcher import DistributedError

__all__ = [
    "MODEL_PREFIX",
    "OPTIMIZER_PREFIX",
    "Contribution",
    "RoundSpec",
    "average",
    "combine",
    "contribution",
    "fit_average",
    "load_optimizer_tensors",
    "optimizer_tensors",
    "pack",
    "reduce_layout",
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


def _section(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
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
    env: dict[str, str] = dataclasses.field(default_factory=dict)
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
    is torch's intra-op thread count (``spark.task.cpus``). Deterministic for given inputs.
    """
    cfg = TrainConfig.from_mapping(spec.config)
    shards = ShardSet.open(cfg.dataset)
    with (
        scoped_environ(spec.env),
        _deterministic(threads),
        _train_reader(cfg, shards, worker) as reader,
    ):
        if reader.steps_per_epoch == 0:
            raise ValueError(
                f"worker {worker} has no training rows in {cfg.dataset} "
                f"(train.averaging.partition={cfg.averaging.partition!r}, "
                f"train.num_workers={cfg.num_workers})"
            )
        _seed(cfg.seed, spec.round, worker)
        model = _new_model(cfg, shards)
        received = unpack(payload)
        model.load_state_dict(_section(received, MODEL_PREFIX))
        optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        state = _optimizer_state(cfg, spec, worker, received)
        if state:
            load_optimizer_tensors(optimizer, state)
        steps = _steps(cfg, spec, reader.steps_per_epoch)
        loop = _LocalLoop(cfg, model, optimizer, warmup=spec.epoch_offset == 0)
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
    tensors = _prefixed(model.state_dict(), MODEL_PREFIX)
    own = optimizer_tensors(optimizer.state_dict())
    if cfg.averaging.optimizer_state == "average":
        tensors.update(_prefixed(own, OPTIMIZER_PREFIX))
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
    return _section(received, OPTIMIZER_PREFIX)


def _worker_checkpoints(cfg: TrainConfig, worker: int) -> CheckpointManager:
    # One more than the driver keeps, so every global checkpoint has its workers' states.
    uri = storage.join(cfg.checkpoint.dir, WORKERS_DIR, f"worker-{worker:05d}")
    return CheckpointManager(uri, keep=cfg.checkpoint.keep + 1)


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels and ``threads`` torch threads, restored afterwards (reused workers)."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])


def _seed(*key: int) -> None:
    """Seed Python's, NumPy's and torch's generators from ``key`` (seed, round, worker)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _new_model(cfg: TrainConfig, shards: ShardSet) -> nn.Module:
    input_shape, num_outputs = model_shape(cfg, shards)
    return build_model(
        cfg.model.builder,
        input_shape=input_shape,
        num_outputs=num_outputs,
        args=builder_args(cfg),
    )


def _train_reader(cfg: TrainConfig, shards: ShardSet, worker: int) -> ShardReader:
    """Worker ``worker``'s training data (see ``train.averaging.partition``)."""
    workers = cfg.num_workers
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
        drop_last=False,
        verify=cfg.verify,
    )


def shard_view(shards: ShardSet, worker: int, workers: int) -> ShardSet:
    """``shards`` with its train split cut to shard files ``worker, worker + workers, …``."""
    splits = shards.manifest["splits"]
    mine = list(splits["train"]["shards"])[worker::workers]
    train = {"rows": sum(int(s["rows"]) for s in mine), "shards": mine}
    return ShardSet(shards.uri, {**shards.manifest, "splits": {**splits, "train": train}})


class _LocalLoop:
    """A worker's optimizer steps of one round."""

    def __init__(
        self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, *, warmup: bool
    ) -> None:
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
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
        loss_sum = torch.zeros((), dtype=torch.float64)
        self.model.train()
        done = 0
        while done < steps.count:
            for batch in reader:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.optimizer.lr * factor(steps.first + done)
                loss = self._step(batch.features, batch.labels)
                loss_sum.add_(loss, alpha=batch.labels.shape[0])
                self.rows += batch.labels.shape[0]
                done += 1
                if fault is not None:
                    fault.maybe_fire(rank=worker, step=steps.first + done, attempt=attempt)
                if done == steps.count:
                    break
        self.loss_sum = float(loss_sum)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(self.cfg):
            loss = loss_fn(self.model(x), y, self.cfg.task, reduction="mean")
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the Spark job of a round ------------------------------------------------------------------
def _round_task(
    spec: RoundSpec, payload: Broadcast[bytes], workers: int
) -> Callable[[int, Iterable[int]], Iterator[Contribution]]:
    def task(index: int, _: Iterable[int]) -> Iterator[Contribution]:
        if index >= workers:  # padding: see reduce_layout
            return
        from pyspark import TaskContext

        ctx = TaskContext.get()
        tries = ctx.attemptNumber() if ctx is not None else 0
        threads = ctx.cpus() if ctx is not None else 1
        try:
            # A task that reads no batch for stall_limit_s(train.timeout_s) ends its process
            # (the round's job fails and the driver reruns it): no round waits forever.
            with watchdog(index, float(spec.config.get("timeout_s", 600.0))):
                result = train_round(
                    spec, index, payload.value, attempt=spec.attempt + tries, threads=threads
                )
        except Exception as exc:
            # Spark's error carries the traceback but not the partition: name it here.
            kind = type(exc)
            exc.add_note(f"[{_NOTE} {index} raised {kind.__module__}:{kind.__qualname__}]")
            raise
        yield result

    return task


_NOTE = "spark-train averaging: worker"
_NOTE_RE = re.compile(rf"\[{_NOTE} (\d+) raised ([\w.]*):([\w.]+)\]")


def _task_error(err: BaseException, attempt: int) -> DistributedError:
    """A failed round job as :class:`~pipeline.launch.launcher.DistributedError` naming the worker."""
    from pipeline.launch.launcher import _error, _from_spark_error

    base = _from_spark_error(err, attempt)
    found = _NOTE_RE.search(str(err))
    if found is None:  # no Python exception: the worker process crashed
        return base
    worker, module, qualname = int(found.group(1)), found.group(2), found.group(3)
    return _error(worker, qualname, module, base.exc_message, base.tail, attempt)


def _run_job(
    sc: SparkContext, spec: RoundSpec, payload: Broadcast[bytes], workers: int
) -> Contribution:
    """One attempt at a round: the training tasks and the tree reduce of their results."""
    partitions, depth = reduce_layout(workers)
    rdd = sc.parallelize(range(partitions), partitions).mapPartitionsWithIndex(
        _round_task(spec, payload, workers)
    )
    sc.setJobDescription(f"spark-train average: round {spec.round} (attempt {spec.attempt})")
    try:
        total = rdd.treeReduce(combine, depth=depth)
    finally:
        sc.setJobDescription(None)  # type: ignore[arg-type]
    assert total.workers == workers, f"{total.workers} of {workers} workers reduced"
    return total


# -- the driver ---------------------------------------------------------------------------------
def fit_average(
    cfg: TrainConfig,
    spark: Any = None,
    *,
    env: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg`` (``train.mode: average``) on Spark; see the module docstring.

    ``spark`` is the session (default: the active one); ``env`` adds environment variables to
    every task; ``show_progress`` applies to the DDP warm-up (rounds are logged). Raises
    :class:`pipeline.launch.launcher.DistributedError` naming the failing worker when a round's job
    failed ``train.max_attempts`` times, and :class:`pipeline.train.engine.ResumeError` when
    ``train.checkpoint.dir`` holds an unfinished run and ``train.resume`` is false.
    """
    from pipeline.launch.launcher import _require_driver, _spark_context

    _require_driver("fit_average")
    if cfg.mode != "average":
        raise ValueError(f"fit_average trains train.mode 'average', got {cfg.mode!r}")
    driver = _Driver(cfg, spark, _spark_context(spark), dict(env or {}), show_progress)
    try:
        return driver.run()
    finally:
        driver.close()


def _check_data(cfg: TrainConfig, shards: ShardSet) -> None:
    """Every worker must get training rows (a clear error before any job starts)."""
    if shards.task != cfg.task:
        raise ValueError(
            f"train.task is {cfg.task!r} but the shard set {cfg.dataset} was built for "
            f"{shards.task!r}"
        )
    split, workers = shards.split("train"), cfg.num_workers
    if cfg.averaging.partition == "rows":
        if split.rows // workers == 0:
            raise ValueError(
                f"split 'train' of {cfg.dataset} has {split.rows} rows: too few for "
                f"train.num_workers={workers} workers (each needs at least one row)"
            )
        return
    rows = [sum(s.rows for s in split.shards[i::workers]) for i in range(workers)]
    empty = [i for i, n in enumerate(rows) if n == 0]
    if empty:
        raise ValueError(
            f"train.averaging.partition 'shards' leaves worker(s) {empty} without rows: split "
            f"'train' of {cfg.dataset} has {len(split.shards)} shard(s) for train.num_workers="
            f"{workers} (rows per worker {rows}); use partition 'rows' or fewer workers"
        )


class _Driver:
    """The driver's state across rounds; methods are the phases of :func:`fit_average`."""

    def __init__(
        self,
        cfg: TrainConfig,
        spark: Any,
        sc: SparkContext,
        env: dict[str, str],
        show_progress: bool | None,
    ) -> None:
        self.cfg, self.avg, self.spark, self.sc = cfg, cfg.averaging, spark, sc
        self.env, self.show_progress = env, show_progress
        self.shards = ShardSet.open(cfg.dataset)
        _check_data(cfg, self.shards)
        self.input_shape, self.num_outputs = model_shape(cfg, self.shards)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same initial model as a DDP run's
            self.model = _new_model(cfg, self.shards)
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.optimizer: dict[str, torch.Tensor] = {}  # global optimizer state to broadcast
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        self.history: list[dict[str, Any]] = []  # the DDP warm-up's epochs
        self.rounds: list[dict[str, Any]] = []
        self.ddp_steps = 0
        self.epoch_offset = 0
        self.resumed_from: int | None = None
        self.val = self._val_reader()
        _log_unused(cfg)

    def _val_reader(self) -> ShardReader | None:
        val = self.shards.splits.get("val")
        if val is None or not val.rows:
            return None
        return ShardReader(
            self.shards, "val", rank=0, world_size=1, batch_size=4096, shuffle=False,
            verify=self.cfg.verify,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the val reader's prefetch thread."""
        if self.val is not None:
            self.val.close()

    def run(self) -> TrainResult:
        """Resume or start, train the remaining rounds, write the bundle."""
        self._start()
        for r in range(len(self.rounds), self.avg.rounds):
            self.rounds.append(self._round(r))
            self._checkpoint()
        return self._finish()

    # -- start / resume ----------------------------------------------------------------------
    def _start(self) -> None:
        step = self._resume_step()
        if step is not None:
            self._load(step)
            self.resumed_from = step
            return
        # A fresh start: per-worker states of an earlier, uncheckpointed run are stale.
        _delete_dir(storage.join(self.cfg.checkpoint.dir, WORKERS_DIR))
        if self.avg.warmup_ddp_epochs:
            self._warm_up()

    def _resume_step(self) -> int | None:
        """The checkpoint (completed rounds) to continue from, following ``train.resume``."""
        latest = self.ckpt.latest_step()
        directory = self.cfg.checkpoint.dir
        if latest is None:
            if self.cfg.resume:
                log.warning(
                    "train.resume is true but %s holds no checkpoint; starting fresh", directory
                )
            return None
        if self.cfg.resume:
            return latest
        state = self.ckpt.load(latest)
        if state is not None and state.get("finished"):
            log.warning("deleting the checkpoints of a finished earlier run from %s", directory)
            for step in self.ckpt.steps():
                _delete_dir(self.ckpt.path(step))
            _delete_dir(storage.join(directory, WARMUP_DIR))
            return None
        raise ResumeError(
            f"train.checkpoint.dir {directory} holds checkpoints of an unfinished run (latest "
            f"step {latest}): set train.resume=true to continue it, or point "
            "train.checkpoint.dir at an empty directory to start over"
        )

    def _load(self, step: int) -> None:
        state = self.ckpt.load(step)
        directory = self.cfg.checkpoint.dir
        if state is None or state.get("mode") != "average":
            raise ResumeError(
                f"checkpoint step {step} in {directory} was not written by train.mode 'average'; "
                "point train.checkpoint.dir at an empty directory to start over"
            )
        for key, value in self._settings().items():
            if state["settings"].get(key) != value:
                raise ResumeError(
                    f"checkpoint step {step} in {directory} was written with {key}="
                    f"{state['settings'].get(key)!r}; this run has {value!r}: resuming needs "
                    "the same value"
                )
        self.weights = dict(state["model"])
        self.optimizer = dict(state["optimizer"])
        self.rounds = list(state["rounds"])
        self.history = list(state["history"])
        self.ddp_steps = int(state["ddp_steps"])
        self.epoch_offset = int(state["epoch_offset"])
        log.info("resuming model averaging from %s after round %d", self.ckpt.path(step), step)

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint for its rounds to make sense."""
        return {
            "train.num_workers": self.cfg.num_workers,
            "train.averaging.partition": self.avg.partition,
            "train.averaging.optimizer_state": self.avg.optimizer_state,
        }

    def _warm_up(self) -> None:
        """``warmup_ddp_epochs`` of DDP; averaging continues from its final checkpoint."""
        cfg, warm = self.cfg, storage.join(self.cfg.checkpoint.dir, WARMUP_DIR)
        root = storage.join(warm, "ckpt")
        ddp = cfg.replace(
            mode="ddp",
            epochs=self.avg.warmup_ddp_epochs,
            checkpoint=dataclasses.replace(cfg.checkpoint, dir=root),
            output=storage.join(warm, "model"),
            lr_schedule=dataclasses.replace(cfg.lr_schedule, name="constant"),
        )
        log.info("DDP warm-up: %d epoch(s) before averaging", ddp.epochs)
        result = _train(ddp, self.spark, env=self.env, show_progress=self.show_progress)
        state = CheckpointManager(root).load()
        if state is None:
            raise RuntimeError(f"the DDP warm-up left no checkpoint in {root}")
        self.weights = dict(state["model"])
        if self.avg.optimizer_state != "reset":
            self.optimizer = _prefixed(optimizer_tensors(state["optimizer"]), OPTIMIZER_PREFIX)
        self.history = [dict(e, phase="ddp") for e in result.epochs]
        self.ddp_steps = result.steps
        self.epoch_offset = ddp.epochs

    # -- rounds ------------------------------------------------------------------------------
    def _round(self, r: int) -> dict[str, Any]:
        started = time.perf_counter()
        payload = pack({**_prefixed(self.weights, MODEL_PREFIX), **self.optimizer})
        handle = self.sc.broadcast(payload)
        try:
            total, attempts = self._run_round(r, handle)
        finally:
            handle.destroy()
        new = average(total)
        self.weights = _section(new, MODEL_PREFIX)
        if self.avg.optimizer_state == "average":
            self.optimizer = _prefixed(_section(new, OPTIMIZER_PREFIX), OPTIMIZER_PREFIX)
        else:
            self.optimizer = {}  # local: the workers keep their own from now on
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "epoch": len(self.history) + r,
            "phase": "average",
            "round": r,
            "train_loss": total.loss_sum / total.samples if total.samples else None,
        }
        record.update(self._evaluate())
        record.update(
            samples=total.samples,
            local_steps=total.steps,
            bytes_sent=len(payload) * self.cfg.num_workers,
            bytes_received=total.nbytes,
            attempts=attempts,
            seconds=seconds,
            eval_seconds=time.perf_counter() - started - seconds,
        )
        log.info("round %d/%d: %s", r + 1, self.avg.rounds, record)
        return record

    def _run_round(self, r: int, payload: Broadcast[bytes]) -> tuple[Contribution, int]:
        """Run the round's job, rerunning it up to ``train.max_attempts`` times."""
        from pipeline.launch.launcher import _all_failed

        failures: list[DistributedError] = []
        for attempt in range(self.cfg.max_attempts):
            spec = RoundSpec(
                config=to_dict(self.cfg),
                round=r,
                attempt=attempt,
                epoch_offset=self.epoch_offset,
                env=self.env,
            )
            try:
                return _run_job(self.sc, spec, payload, self.cfg.num_workers), attempt + 1
            except Exception as err:
                failure = _task_error(err, attempt)
                failures.append(failure)
                log.warning(
                    "round %d, attempt %d of %d failed: %s",
                    r,
                    attempt + 1,
                    self.cfg.max_attempts,
                    failure.message.split("\n", 1)[0],
                )
        error = _all_failed(failures)
        error.message = (
            f"model averaging round {r} failed in {len(failures)} attempt(s) "
            f"(train.max_attempts): {error.message}"
        )
        raise error

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float | None]:
        """Loss and accuracy / RMSE of the global model on the whole val split."""
        sums = EvalSums(self.cfg.task)
        if self.val is None:
            return sums.result(prefix="val_")
        self.model.load_state_dict(self.weights)
        self.model.eval()
        self.val.set_epoch(0)
        for batch in self.val:
            if batch.labels.shape[0]:
                with _autocast(self.cfg):
                    sums.add(self.model(batch.features), batch.labels)
        return sums.result(prefix="val_")

    def _checkpoint(self) -> None:
        done = len(self.rounds)
        self.ckpt.save(
            done,
            {
                "mode": "average",
                "model": self.weights,
                "optimizer": self.optimizer,
                "rounds": self.rounds,
                "history": self.history,
                "ddp_steps": self.ddp_steps,
                "epoch_offset": self.epoch_offset,
                "settings": self._settings(),
                "finished": done == self.avg.rounds,
            },
        )

    # -- output ------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        cfg = self.cfg
        self.model.load_state_dict(self.weights)
        steps = self.ddp_steps + sum(int(r["local_steps"]) for r in self.rounds)
        attempt = max((int(r["attempts"]) for r in self.rounds), default=1) - 1
        metrics = {
            "mode": "average",
            "epochs": [*self.history, *self.rounds],
            "rounds": self.rounds,
            "steps": steps,
            "world_size": cfg.num_workers,
            "attempts": attempt + 1,
            "resumed_from": self.resumed_from,
            "synchronizations": self.ddp_steps + len(self.rounds),
            "bytes_sent": sum(int(r["bytes_sent"]) for r in self.rounds),
            "bytes_received": sum(int(r["bytes_received"]) for r in self.rounds),
            "averaging": to_dict(self.avg),
        }
        spec = bundle.model_spec(
            cfg, self.shards, input_shape=self.input_shape, num_outputs=self.num_outputs
        )
        uri = bundle.write_bundle(
            cfg.output,
            model=self.model,
            spec=spec,
            metrics=metrics,
            config={"train": to_dict(cfg)},
            features_uri=bundle.features_source(self.shards),
        )
        return TrainResult(
            epochs=[*self.history, *self.rounds],
            bundle=uri,
            steps=steps,
            attempt=attempt,
            resumed_from=self.resumed_from,
            world_size=cfg.num_workers,
            rounds=list(self.rounds),
        )


def _delete_dir(uri: str) -> None:
    fs, path = storage.resolve(uri)
    if storage.exists(fs, path):
        fs.delete_dir(path)


def _log_unused(cfg: TrainConfig) -> None:
    """Say which settings this mode does not use (they are valid for the other modes)."""
    avg = cfg.averaging
    length = (
        f"{avg.rounds} round(s) × {avg.local_steps} local step(s)"
        if avg.local_steps
        else f"{avg.rounds} round(s) × {avg.epochs_per_round} local epoch(s)"
    )
    log.info(
        "train.mode 'average': training length is %s after %d DDP warm-up epoch(s); "
        "train.epochs (%d) is not used, and a checkpoint is written after every round "
        "(train.checkpoint.every_steps is not used)",
        length,
        avg.warmup_ddp_epochs,
        cfg.epochs,
    )
