"""The driver of model averaging (``train.mode: average``): one Spark job per round.

Each round the driver broadcasts the global weights (and optimizer state), runs one ordinary
Spark job whose tasks train with :func:`pipeline.train.modes.average.train_round` — on the
task's GPU when Spark assigned one — sums their results with ``treeReduce`` in a
reproducible order, averages, evaluates the val split and checkpoints the round. A failed
round's job is rerun up to ``train.max_attempts`` times; ``train.resume`` continues after
the last checkpointed round. The algorithm, the reduce and the reproducibility argument are
described in :mod:`pipeline.train.modes.average`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pipeline.core import storage
from pipeline.core.configbase import to_dict
from pipeline.core.connect import is_connect
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.launch.barrier import TrainResult, fit_barrier
from pipeline.launch.errors import DistributedError, all_failed, from_spark_error, rank_error
from pipeline.launch.session import active_session, require_driver
from pipeline.runtime import rankrun
from pipeline.runtime.timeouts import watchdog
from pipeline.train import bundle, engine
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.engine import ResumeError
from pipeline.train.metrics import evaluate
from pipeline.train.modes.average import (
    MODEL_PREFIX,
    OPTIMIZER_PREFIX,
    WARMUP_DIR,
    WORKERS_DIR,
    Contribution,
    RoundSpec,
    average,
    combine,
    optimizer_tensors,
    pack,
    prefixed,
    reduce_layout,
    section,
    train_round,
)
from pipeline.train.preflight import check_training_data, resolve_defaults

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark import Broadcast, SparkContext
    from pyspark.sql import SparkSession

__all__ = ["fit_average"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
"""The driver evaluates the global model on the host."""


# -- the Spark job of a round ------------------------------------------------------------------
def _round_task(
    spec: RoundSpec, payload: Broadcast[bytes] | _Inline, workers: int
) -> Callable[[int, Iterable[int]], Iterator[Contribution]]:
    def task(index: int, _: Iterable[int]) -> Iterator[Contribution]:
        if index >= workers:  # padding: see reduce_layout
            return
        from pyspark import TaskContext

        ctx = TaskContext.get()
        tries = ctx.attemptNumber() if ctx is not None else 0
        threads = ctx.cpus() if ctx is not None else 1
        gpus = ctx.resources()["gpu"].addresses if ctx and "gpu" in ctx.resources() else []
        task_spec = dataclasses.replace(
            spec, env={**spec.env, **rankrun.task_device_environment(gpus)}
        )
        try:
            # A task that reads no batch for stall_limit_s(train.timeout_s) ends its process
            # (the round's job fails and the driver reruns it): no round waits forever.
            with watchdog(index, float(spec.config.get("timeout_s", 600.0))):
                result = train_round(
                    task_spec, index, payload.value, attempt=spec.attempt + tries, threads=threads
                )
        except Exception as exc:
            # Spark's error carries the traceback but not the partition: name it here.
            kind = type(exc)
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"[{_NOTE} {index} raised {kind.__module__}:{kind.__qualname__}]")
            raise
        yield result

    return task


_NOTE = "spark-train averaging: worker"
_NOTE_RE = re.compile(rf"\[{_NOTE} (\d+) raised ([\w.]*):([\w.]+)\]")


def _task_error(err: BaseException, attempt: int) -> DistributedError:
    """A failed round job as :class:`~pipeline.launch.launcher.DistributedError` naming the worker."""
    base = from_spark_error(err, attempt)
    found = _NOTE_RE.search(str(err))
    if found is None:  # no Python exception: the worker process crashed
        return base
    worker, module, qualname = int(found.group(1)), found.group(2), found.group(3)
    return rank_error(worker, qualname, module, base.exc_message, base.tail, attempt)


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


@dataclasses.dataclass(frozen=True)
class _Inline:
    """The round's payload carried in the task's closure (Spark Connect has no broadcasts)."""

    value: bytes


_PLAN_LIMIT = "spark.connect.grpc.maxInboundMessageSize"
_PLAN_LIMIT_DEFAULT = 128 * 1024 * 1024


def _run_job_connect(
    spark: SparkSession, spec: RoundSpec, payload: bytes, workers: int
) -> Contribution:
    """One attempt at a round over Spark Connect: ``mapInArrow`` tasks, summed on the client.

    The payload travels in the task's closure (Spark broadcasts the stage's task binary to the
    executors); the workers' results come back as rows and are added in ``treeReduce``'s
    pairing (:func:`_tree_sum`), so a round is reproducible as on a classic session.
    """
    from pyspark import cloudpickle

    partitions, _ = reduce_layout(workers)
    task = _round_task(spec, _Inline(payload), workers)

    def arrow_task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        from pyspark import cloudpickle

        for batch in batches:
            for index in batch.column(0).to_pylist():
                for result in task(int(index), iter(())):
                    yield pa.RecordBatch.from_pydict(
                        {"index": [int(index)], "result": [cloudpickle.dumps(result)]},
                        schema=pa.schema([("index", pa.int64()), ("result", pa.binary())]),
                    )

    rows = (
        spark.range(0, partitions, 1, partitions)
        .mapInArrow(arrow_task, "index long, result binary")
        .collect()
    )
    found = {int(r[0]): cloudpickle.loads(bytes(r[1])) for r in rows}
    total = _tree_sum([found.get(i) for i in range(partitions)], combine)
    assert total is not None and total.workers == workers, f"{workers} workers expected"
    return total


def _tree_sum(values: list[T | None], add: Callable[[T, T], T]) -> T | None:
    """Sum as ``treeReduce`` does with :func:`reduce_layout`'s partitions.

    Pairs ``i`` with ``i + n/2`` until 4 remain, then adds in order (None: padding).
    """

    def both(a: T | None, b: T | None) -> T | None:
        return b if a is None else a if b is None else add(a, b)

    while len(values) > 4:
        half = len(values) // 2
        values = [both(values[i], values[i + half]) for i in range(half)]
    total: T | None = None
    for value in values:
        total = both(total, value)
    return total


def _check_plan_size(spark: SparkSession, payload: bytes) -> None:
    """Refuse a payload that cannot travel inside a Connect plan, before the round starts."""
    raw = str(spark.conf.get(_PLAN_LIMIT, str(_PLAN_LIMIT_DEFAULT)) or "")
    limit = int(raw) if raw.isdigit() else _PLAN_LIMIT_DEFAULT
    if len(payload) > limit * 0.9:
        raise ValueError(
            f"train.mode 'average' over Spark Connect sends the weights inside each round's "
            f"plan, and this model's {len(payload) / 2**20:.0f} MiB exceed {_PLAN_LIMIT} "
            f"({limit / 2**20:.0f} MiB): raise it on the Connect server, use train.mode ddp "
            "or fsdp, or a classic session"
        )


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
    failed ``train.max_attempts`` times, and :class:`pipeline.train.loop.ResumeError` when
    ``train.checkpoint.dir`` holds an unfinished run and ``train.resume`` is false.
    """
    require_driver("fit_average")
    if cfg.mode != "average":
        raise ValueError(f"fit_average trains train.mode 'average', got {cfg.mode!r}")
    driver = _Driver(cfg, active_session(spark), dict(env or {}), show_progress)
    try:
        return driver.run()
    finally:
        driver.close()


class _Driver:
    """The driver's state across rounds; methods are the phases of :func:`fit_average`."""

    def __init__(
        self,
        cfg: TrainConfig,
        spark: SparkSession,
        env: dict[str, str],
        show_progress: bool | None,
    ) -> None:
        self.shards = ShardSet.open(cfg.dataset)
        check_training_data(cfg, self.shards)
        cfg = resolve_defaults(cfg, self.shards)
        self.cfg, self.avg, self.spark = cfg, cfg.averaging, spark
        self.connect = is_connect(spark)
        self.env, self.show_progress = env, show_progress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same initial model as a DDP run's
            self.model, self.init_record = engine.initial_model(cfg, self.shards)
        self.inputs = engine.model_inputs(cfg, self.shards)
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
        warmup = storage.join(self.cfg.checkpoint.dir, WARMUP_DIR)
        return engine.resume_step(
            self.ckpt, self.cfg, relaunch=False, discard=lambda: _delete_dir(warmup)
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
            "train.num_workers": self.cfg.max_workers,
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
        result = fit_barrier(ddp, self.spark, env=self.env, show_progress=self.show_progress)
        state = CheckpointManager(root).load()
        if state is None:
            raise RuntimeError(f"the DDP warm-up left no checkpoint in {root}")
        self.weights = dict(state["model"])
        if self.avg.optimizer_state != "reset":
            self.optimizer = prefixed(optimizer_tensors(state["optimizer"]), OPTIMIZER_PREFIX)
        self.history = [dict(e, phase="ddp") for e in result.epochs]
        self.ddp_steps = result.steps
        self.epoch_offset = ddp.epochs

    # -- rounds ------------------------------------------------------------------------------
    def _round(self, r: int) -> dict[str, Any]:
        started = time.perf_counter()
        payload = pack({**prefixed(self.weights, MODEL_PREFIX), **self.optimizer})
        if self.connect:
            _check_plan_size(self.spark, payload)
            total, attempts = self._run_round(r, payload)
        else:
            handle = self.spark.sparkContext.broadcast(payload)
            try:
                total, attempts = self._run_round(r, handle)
            finally:
                handle.destroy()
        new = average(total)
        self.weights = section(new, MODEL_PREFIX)
        if self.avg.optimizer_state == "average":
            self.optimizer = prefixed(section(new, OPTIMIZER_PREFIX), OPTIMIZER_PREFIX)
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
            bytes_sent=len(payload) * self.cfg.max_workers,
            bytes_received=total.nbytes,
            attempts=attempts,
            seconds=seconds,
            eval_seconds=time.perf_counter() - started - seconds,
        )
        log.info("round %d/%d: %s", r + 1, self.avg.rounds, record)
        return record

    def _run_round(self, r: int, payload: Broadcast[bytes] | bytes) -> tuple[Contribution, int]:
        """Run the round's job, rerunning it up to ``train.max_attempts`` times."""
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
                if isinstance(payload, bytes):
                    total = _run_job_connect(self.spark, spec, payload, self.cfg.max_workers)
                else:
                    total = _run_job(self.spark.sparkContext, spec, payload, self.cfg.max_workers)
                return total, attempt + 1
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
        error = all_failed(failures)
        error.message = (
            f"model averaging round {r} failed in {len(failures)} attempt(s) "
            f"(train.max_attempts): {error.message}"
        )
        raise error

    def _evaluate(self) -> dict[str, float | None]:
        """Loss and accuracy / RMSE of the global model on the whole val split."""
        if self.val is not None:
            self.model.load_state_dict(self.weights)
        sums = evaluate(
            self.model,
            self.val,
            self.inputs,
            self.shards.task,
            device=_CPU,
            autocast=engine.autocast(self.cfg, _CPU),
        )
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
            "world_size": cfg.max_workers,
            "attempts": attempt + 1,
            "resumed_from": self.resumed_from,
            "synchronizations": self.ddp_steps + len(self.rounds),
            "bytes_sent": sum(int(r["bytes_sent"]) for r in self.rounds),
            "bytes_received": sum(int(r["bytes_received"]) for r in self.rounds),
            "averaging": to_dict(self.avg),
        }
        uri = bundle.write_trained(
            cfg, self.shards, self.model, metrics=metrics, init=self.init_record
        )
        return TrainResult(
            epochs=[*self.history, *self.rounds],
            bundle=uri,
            steps=steps,
            attempt=attempt,
            resumed_from=self.resumed_from,
            world_size=cfg.max_workers,
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
