"""The training loop every barrier mode runs inside each rank (Spark launcher or torchrun).

:func:`train_worker` expects the torchrun environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``…), trains ``train.epochs`` epochs over the shard set, checkpoints, evaluates,
and has rank 0 write the model bundle. The mode (``train.mode``, a
:class:`~pipeline.train.modes.BarrierMode`) decides only how the module is placed and
wrapped, whether micro-batches defer gradient sync, how gradients are clipped and how the
full state is gathered; everything else — model building, seeding, device, autocast, the
optimizer step, the resume policy, input checks — is the shared engine
(:mod:`pipeline.train.engine`).

Resuming from a checkpoint is exact: on CPU with a fixed seed, a run interrupted after a
checkpoint and resumed ends with weights bitwise equal to an uninterrupted one, because the
checkpoint holds every rank's reader position and RNG streams as well as the model,
optimizer and schedule (PowerSGD's error-feedback state is the exception: it restarts from
zero after a resume).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch

from pipeline.core.configbase import ConfigError
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.runtime import distenv, preempt
from pipeline.runtime.faults import parse_fault
from pipeline.runtime.progress import report
from pipeline.runtime.timeouts import naming_timeout, watchdog
from pipeline.train import bundle, elastic, engine, finetune
from pipeline.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pipeline.train.collectives import Collectives, SingleProcess, init_process_group
from pipeline.train.config import TrainConfig
from pipeline.train.engine import ResumeError
from pipeline.train.metrics import evaluate, loss_fn
from pipeline.train.optim import build_scheduler
from pipeline.train.preflight import check_training_data, resolve_defaults
from pipeline.train.registry import BarrierMode, WrapContext, get_mode, register_mode

__all__ = ["train_worker"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 2.0


def train_worker(
    cfg: TrainConfig | Mapping[str, Any], mode: BarrierMode | None = None
) -> dict[str, Any]:
    """Train in this process as one rank of the job; returns this rank's summary.

    ``cfg`` is the ``train`` section (or its plain-data form, which pickles everywhere);
    ``mode`` defaults to the registered ``train.mode`` (the driver passes the object it
    resolved, so a mode registered only on the driver reaches the ranks too).
    The summary holds ``rank``, ``world_size``, ``attempt``, ``steps`` (optimizer steps),
    ``resumed_from`` (checkpoint step or None), ``epochs`` (per-epoch metrics, identical
    on every rank) and ``bundle`` (the bundle URI written by rank 0).
    """
    if mode is not None:
        # The driver's object wins: this process may hold an older copy (a reused worker)
        # or the built-in of the same name, which the driver resolved to this one.
        register_mode(mode, replace=True)
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_mapping(cfg)
    mode = mode or _barrier_mode(cfg)
    mode.check_config(cfg)
    if torch.cuda.is_available():
        # cuBLAS needs this for deterministic GEMMs; it must be set before CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device, backend = distenv.device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives use the current device
    rank = distenv.current().rank
    comm: Collectives = SingleProcess()
    if mode.process_group:
        with naming_timeout(rank, cfg.timeout_s):
            comm = init_process_group(backend, timedelta(seconds=cfg.timeout_s))
    trainer = None
    try:
        with (
            engine.deterministic(),
            naming_timeout(rank, cfg.timeout_s),
            watchdog(rank, cfg.timeout_s),
            preempt.notice() as notice,
        ):
            trainer = _Trainer(cfg, mode, comm, WrapContext(cfg, device, backend), notice)
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        # DDP sits in reference cycles that hold the process group. Free them while the
        # interpreter is fully alive: a gloo worker thread that drops the last reference to
        # a finished work during interpreter shutdown aborts the process.
        del trainer
        gc.collect()
        comm.close()


def _barrier_mode(cfg: TrainConfig) -> BarrierMode:
    mode = get_mode(cfg.mode)
    if not isinstance(mode, BarrierMode):
        raise ConfigError(
            "train.mode",
            f"{cfg.mode!r} runs as Spark jobs ({mode.launcher}: spark-train train, "
            "pipeline.fit), not as ranks of one process group: use 'ddp' or 'fsdp' under torchrun",
        )
    return mode


class _Stop(Exception):
    """The ranks agreed to stop at this step boundary (the checkpoint is written)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Trainer:
    """One rank's training state; methods are the phases of :func:`train_worker`."""

    def __init__(
        self,
        cfg: TrainConfig,
        mode: BarrierMode,
        comm: Collectives,
        ctx: WrapContext,
        notice: preempt.Notice,
    ) -> None:
        self.shards = ShardSet.open(cfg.dataset)
        check_training_data(cfg, self.shards, workers=comm.world_size)
        elastic.check_world_size(cfg, comm.world_size)
        cfg = resolve_defaults(cfg, self.shards)
        self.cfg, self.mode, self.comm, self.device = cfg, mode, comm, ctx.device
        self.rank, self.world_size = comm.rank, comm.world_size
        self.batch_size = cfg.rank_batch(self.world_size)  # the global batch is constant
        self.stopper = elastic.Stopper(comm, notice, can_grow=self.world_size < cfg.max_workers)
        self.attempt = distenv.current().attempt
        self.fault = parse_fault()
        engine.seed_everything(cfg.seed)  # identical model initialisation on every rank
        self.train_reader = self._reader("train", shuffle=True)
        val = self.shards.splits.get("val")
        self.val_reader = self._reader("val", shuffle=False) if val and val.rows else None
        self.input_shape, self.num_outputs = engine.model_shape(cfg, self.shards)
        self.inputs = engine.model_inputs(cfg, self.shards)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        # The model the checkpoint to resume was trained as (0.1.0's cnn): rank 0 decides.
        builder = comm.on_rank0(
            lambda: engine.checkpoint_builder(
                cfg, self.shards, self.ckpt, relaunch=self.attempt > 0
            ),
            "read the model of the checkpoint to resume",
            ResumeError,
        )
        self.cfg = cfg = engine.with_builder(cfg, builder)
        model, self.init_record = engine.initial_model(cfg, self.shards)
        self.module = mode.place(model, self.device)
        self.optimizer = engine.new_optimizer(self.module, cfg)
        self.stepper = engine.Stepper(
            cfg, self.module, self.optimizer, clip=mode.clip_grad_norm, scheduler=self._schedule()
        )
        # Progress through the run; replaced by a checkpoint's values on resume.
        self.epoch = 0
        self.micro = 0  # micro-batches of the current epoch already consumed
        # (batch size, rows per rank, steps) of the epoch or segment being trained
        self._segment = (self.train_reader.batch_size, 0, 0)
        self.history: list[dict[str, Any]] = []
        self.epoch_seconds = 0.0  # training time in the current epoch before a resume
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_rows = 0  # rows behind loss_sum (known on the host: no device sync)
        self._resume_rank_state: dict[str, Any] = {}  # this rank's entry of the checkpoint
        self._reader_state: dict[str, Any] | None = None  # a mid-epoch checkpoint's position
        self.resizes: list[dict[str, Any]] = []  # changes of world size, from the checkpoint
        self.ctx, self.unfrozen = ctx, False
        self.resumed_from = self._resume()
        self.model = mode.wrap(self.module, ctx)
        # Ranks draw different dropout masks; seeded after initialisation so that the model
        # is identical everywhere, and replaced by the checkpoint's streams on resume.
        if self.resumed_from is None:
            engine.seed_everything(cfg.seed + engine.RANK_SEED_STRIDE * (self.rank + 1))
        elif self._resume_rank_state["rng"] is None:  # resumed at another world size
            elastic.reseed(cfg.seed, self.resumed_from, self.rank)
        else:
            restore_rng_state(self._resume_rank_state["rng"])
        self.autocast = engine.autocast(cfg, self.device)

    def _schedule(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule over the run's steps (laid out at ``max`` workers)."""
        cfg = self.cfg
        micro_per_epoch = elastic.schedule_steps(
            cfg, self.shards.split("train").rows, self.train_reader.steps_per_epoch
        )
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
        return build_scheduler(self.optimizer, cfg.lr_schedule, cfg.epochs * steps_per_epoch)

    @property
    def step(self) -> int:
        """Optimizer steps since the start of the run."""
        return self.stepper.steps

    def _reader(self, split: str, *, shuffle: bool) -> ShardReader:
        return ShardReader(
            self.shards,
            split,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            seed=self.cfg.seed,
            shuffle=shuffle,
            drop_last=self.cfg.drop_last,
            verify=self.cfg.verify,
            pin_memory=self.device.type == "cuda",  # async host→device copies in to_model
        )

    # -- resume ----------------------------------------------------------------
    def _resume(self) -> int | None:
        """Agree on the checkpoint to resume from (rank 0 decides) and load it."""

        def choose() -> int | None:
            return engine.resume_step(self.ckpt, self.cfg, relaunch=self.attempt > 0)

        value = self.comm.on_rank0(choose, "choose a checkpoint", ResumeError)
        if value is None:
            return None
        self._load_checkpoint(int(value))
        return int(value)

    def _load_checkpoint(self, step: int) -> None:
        state = self.ckpt.load(step)
        if state is None:
            raise ResumeError(f"checkpoint step {step} vanished from {self.cfg.checkpoint.dir}")
        ranks = state["ranks"]
        if len(ranks) != self.world_size and not self.cfg.elastic:
            raise ResumeError(
                f"checkpoint step {step} in {self.cfg.checkpoint.dir} was written by "
                f"{len(ranks)} workers; this run has {self.world_size} (train.num_workers): "
                "exact resume needs the same number"
            )
        frozen_for = self.cfg.freeze.epochs
        if frozen_for is not None and (state["epoch"], state["micro"]) > (frozen_for, 0):
            self._unfreeze()  # the checkpoint's optimizer has the unfrozen groups
        self.mode.load_state(
            self.module,
            self.optimizer,
            state["model"],
            state["optimizer"],
            source=self.ckpt.path(step),
        )
        # The checkpoint restores the schedule's position; its shape (warm-up, total steps)
        # comes from this run's config, so a resume with more epochs stretches it.
        assert self.stepper.scheduler is not None, "the loop always schedules"
        self.stepper.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        self.epoch, self.micro, self.stepper.steps = state["epoch"], state["micro"], state["step"]
        self.history = list(state["history"])
        self.resizes = list(state.get("resizes", []))
        mine = elastic.rank_entry(ranks, self.rank, self.world_size)
        if len(ranks) != self.world_size:  # the reader starts a segment over the rest
            self.micro = 0
            self.resizes.append(
                elastic.resize_record(
                    step=step, epoch=self.epoch, old=len(ranks), new=self.world_size
                )
            )
            log.info(
                "rank %d: resized %d → %d ranks at step %d",
                self.rank,
                len(ranks),
                self.world_size,
                step,
            )
        self._resume_rank_state = mine
        self._reader_state = mine["reader"]
        self.loss_sum.fill_(mine["loss_sum"])
        self.loss_rows = int(mine["loss_rows"])
        self.epoch_seconds = float(mine["epoch_seconds"])
        log.info(
            "rank %d resumed from checkpoint step %d (epoch %d, micro-batch %d)",
            self.rank,
            step,
            self.epoch,
            self.micro,
        )

    # -- checkpoint ------------------------------------------------------------
    def _save_checkpoint(self, *, epoch_end: bool, epoch_start_time: float) -> None:
        """Gather every rank's reader position and RNG streams; rank 0 writes."""
        mine = {
            "reader": None if epoch_end else self.train_reader.state_dict(),
            "rng": capture_rng_state(),
            "loss_sum": 0.0 if epoch_end else float(self.loss_sum),
            "loss_rows": 0 if epoch_end else self.loss_rows,
            "epoch_seconds": 0.0 if epoch_end else time.perf_counter() - epoch_start_time,
        }
        # A sharded mode gathers the full state from every rank onto rank 0 (a collective).
        model_state, optim_state = self.mode.full_state(self.module, self.optimizer)
        gathered = self.comm.gather_object(mine)
        if self.rank != 0:
            return
        assert self.stepper.scheduler is not None, "the loop always schedules"
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.stepper.scheduler.state_dict(),
            "scaler": None,
            "epoch": self.epoch + 1 if epoch_end else self.epoch,
            "micro": 0 if epoch_end else self.micro,
            "step": self.step,
            "ranks": gathered,
            "history": self.history,
            "resizes": self.resizes,
            "finished": epoch_end and self.epoch + 1 == self.cfg.epochs,
        }
        self.ckpt.save(self.step, state)

    # -- training --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the remaining epochs, then write the bundle from rank 0.

        Ranks that agree to stop on purpose (:class:`pipeline.train.elastic.Stopper`) return
        early, with ``stopped`` (why) in the summary and their checkpoint written.
        """
        summary = {
            "rank": self.rank,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "resumed_from": self.resumed_from,
        }
        try:
            while self.epoch < self.cfg.epochs:
                frozen_for = self.cfg.freeze.epochs
                if frozen_for is not None and self.epoch >= frozen_for and not self.unfrozen:
                    self._unfreeze()
                    del self.model
                    gc.collect()  # DDP's reducer (and its hooks) goes before the new one exists
                    self.model = self.mode.wrap(self.module, self.ctx)
                self._run_epoch()
                self.epoch, self.micro, self.epoch_seconds = self.epoch + 1, 0, 0.0
                if self.epoch < self.cfg.epochs and (why := self.stopper.check(boundary=True)):
                    raise _Stop(why)
        except _Stop as stop:
            log.warning("rank %d stops at step %d: %s", self.rank, self.step, stop.why)
            return {**summary, "steps": self.step, "stopped": stop.why}
        uri = self._write_bundle()
        return {
            **summary,
            "steps": self.step,
            "epochs": self.history,
            "resizes": self.resizes,
            "bundle": uri,
        }

    def _unfreeze(self) -> None:
        """``train.freeze.epochs`` are over: the frozen parameters join the optimizer.

        They get parameter groups of their own (``lr_multipliers`` apply) that follow the
        same schedule from the current step on; the caller wraps the module again (DDP
        registers the parameters that require gradients when it is built).
        """
        names = finetune.unfreeze(self.module, self.cfg.freeze)
        groups = finetune.param_groups(self.module, self.cfg.optimizer, only=set(names))
        scheduler = self.stepper.scheduler
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR), "the loop's schedule"
        factor = scheduler.lr_lambdas[0]
        for group in groups:
            group["initial_lr"] = group["lr"]
            scheduler.base_lrs.append(group["lr"])
            scheduler.lr_lambdas.append(factor)
            group["lr"] = group["lr"] * factor(scheduler.last_epoch)
            self.optimizer.add_param_group(group)
        self.unfrozen = True
        log.info("epoch %d: %d frozen parameter(s) unfrozen", self.epoch, len(names))

    def close(self) -> None:
        """Stop the readers' prefetch threads."""
        self.train_reader.close()
        if self.val_reader is not None:
            self.val_reader.close()

    def _run_epoch(self) -> None:
        """Train the rest of the epoch, evaluate, report, and checkpoint its end."""
        start = time.perf_counter() - self.epoch_seconds
        reader = self.train_reader
        reader.set_epoch(self.epoch)
        if self._reader_state is not None:  # the first epoch after a mid-epoch resume
            reader.load_state_dict(self._reader_state, elastic=self.cfg.elastic)
            self._reader_state = None
        train_loss = self._train_epoch(start)
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {"epoch": self.epoch, "train_loss": train_loss}
        metrics.update(self._evaluate())
        metrics["seconds"] = seconds  # training only
        metrics["eval_seconds"] = time.perf_counter() - start - seconds
        self.history.append(metrics)
        self._report(metrics)
        self._save_checkpoint(epoch_end=True, epoch_start_time=start)

    def _micro_batches(self) -> Iterator[tuple[engine.ModelArgument, torch.Tensor, bool, float]]:
        """Yield ``(x, y, ends_group, weight)`` for the rest of the epoch.

        Micro-batches are grouped ``train.grad_accum_steps`` at a time (the last group of an
        epoch may be shorter); ``weight`` is the batch's share of its group's rows, so the
        accumulated gradient is the mean over the rows of the optimizer step, exactly as one
        batch of that many rows would give.
        """
        reader = self.train_reader
        # The reader moves on to the next epoch's shape before it yields an epoch's last batch,
        # and after a resize the rest of an epoch is a segment of another shape: take it now.
        self._segment = (reader.batch_size, reader.rows_per_rank, reader.steps_per_epoch)
        total, accum = reader.steps_per_epoch, self.cfg.grad_accum_steps
        for batch in reader:
            group_start = self.micro - self.micro % accum
            group_end = min(group_start + accum, total)
            rows = self._rows(group_start, group_end)
            self.micro += 1
            x, y = engine.to_model(self.inputs, batch, self.device)
            yield x, y, self.micro == group_end, y.shape[0] / rows if rows else 0.0

    def _rows(self, first: int, end: int) -> int:
        """Rows in micro-batches ``[first, end)`` of the epoch (or segment) being trained.

        Its shape as its micro-batches started; only the last micro-batch is short.
        """
        size, per_rank, _ = self._segment
        return min(end * size, per_rank) - min(first * size, per_rank)

    def _train_epoch(self, start: float) -> float:
        self.model.train()
        every, steps = self.cfg.checkpoint.every_steps, self.train_reader.steps_per_epoch
        last_report = time.perf_counter()
        for x, y, sync, weight in self._micro_batches():
            with contextlib.nullcontext() if sync else self.mode.no_sync(self.model):
                with self.autocast:
                    loss = loss_fn(self.model(x), y, self.shards.task, reduction="mean")
                (loss if weight == 1.0 else loss * weight).backward()
            self.loss_sum.add_(loss.detach(), alpha=y.shape[0])  # one op: this runs every step
            self.loss_rows += y.shape[0]
            if not sync:
                continue
            self.stepper()
            if self.fault is not None:
                self.fault.maybe_fire(rank=self.rank, step=self.step, attempt=self.attempt)
            if self.micro < steps:  # (the epoch's last step: its end checkpoints, then checks)
                due = bool(every) and self.step % every == 0
                why = self.stopper.check(boundary=due)
                if due or why:
                    self._save_checkpoint(epoch_end=False, epoch_start_time=start)
                if why:
                    raise _Stop(why)
            if self.rank == 0 and time.perf_counter() - last_report >= _PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                self._report_step(start)
        total, rows = self.comm.sum_floats(self.loss_sum, self.loss_rows, device=self.device)
        self.loss_sum.zero_()
        self.loss_rows = 0
        return total / rows if rows > 0 else float("nan")

    # -- evaluation ------------------------------------------------------------
    def _evaluate(self) -> dict[str, float | None]:
        """Validation loss and accuracy (classification) or RMSE (regression), all ranks."""
        sums = evaluate(
            self.module,
            self.val_reader,
            self.inputs,
            self.shards.task,
            device=self.device,
            autocast=self.autocast,
            reduce=self.comm.all_reduce,
        )
        return sums.result(prefix="val_")

    # -- reporting and output --------------------------------------------------
    def _report_step(self, start: float) -> None:
        """Rank 0's progress within the epoch (its own running loss, the job's rows/s)."""
        n = self.loss_rows
        report(
            epoch=self.epoch,
            step=self.micro,
            steps=self._segment[2],
            samples_per_s=self._rows(0, self.micro)
            * self.world_size
            / max(time.perf_counter() - start, 1e-9),
            loss=float(self.loss_sum) / n if n else float("nan"),
            world_size=self.world_size,
        )

    def _report(self, metrics: dict[str, Any]) -> None:
        """The finished epoch (loss over all ranks), from rank 0."""
        if self.rank != 0:
            return
        steps = self._segment[2]
        report(
            epoch=self.epoch,
            step=steps,
            steps=steps,
            samples_per_s=self._rows(0, steps) * self.world_size / max(metrics["seconds"], 1e-9),
            loss=metrics["train_loss"],
            world_size=self.world_size,
        )
        log.info("epoch %d: %s", self.epoch, metrics)

    def _write_bundle(self) -> str:
        """Rank 0 writes the bundle; every rank learns its URI."""
        # A sharded mode gathers the full weights (every rank joins); rank 0 gets a plain copy.
        model = self.mode.consolidated(
            self.module, lambda: engine.new_model(self.cfg, self.shards), self.rank
        )

        def write() -> str:
            assert model is not None, "rank 0 holds the model to write"
            return bundle.write_trained(
                self.cfg,
                self.shards,
                model,
                metrics={
                    "epochs": self.history,
                    "steps": self.step,
                    "world_size": self.world_size,
                    "attempts": self.attempt + 1,
                    "resumed_from": self.resumed_from,
                    "resizes": self.resizes,
                },
                init=self.init_record,
            )

        return str(self.comm.on_rank0(write, f"write the bundle {self.cfg.output}", RuntimeError))
