"""The DDP training loop, run inside every rank (started by the Spark launcher or torchrun).

:func:`train_worker` expects the torchrun environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``…), trains ``train.epochs`` epochs over the shard set, checkpoints, evaluates,
and has rank 0 write the model bundle. Resuming from a checkpoint is exact: on CPU with a
fixed seed, a run interrupted after a checkpoint and resumed ends with weights bitwise equal
to an uninterrupted one, because the checkpoint holds every rank's reader position and RNG
streams as well as the model, optimizer and schedule (PowerSGD's error-feedback state is
the exception: it restarts from zero after a resume).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core import storage
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet
from pipeline.runtime import distenv
from pipeline.runtime.distenv import device_and_backend
from pipeline.runtime.faults import parse_fault
from pipeline.runtime.progress import report
from pipeline.runtime.timeouts import naming_timeout, watchdog
from pipeline.train import bundle
from pipeline.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pipeline.train.comm_hooks import register_comm_hook
from pipeline.train.config import TrainConfig
from pipeline.train.metrics import EvalSums, loss_fn
from pipeline.train.models import build_model
from pipeline.train.modes import fsdp
from pipeline.train.optim import build_optimizer, build_scheduler

__all__ = ["ResumeError", "builder_args", "model_shape", "train_worker"]

log = logging.getLogger(__name__)

# Rank r's dropout stream is seeded with seed + _RANK_SEED_STRIDE * (r + 1).
_RANK_SEED_STRIDE = 1_000_003
_PROGRESS_EVERY_S = 2.0


class ResumeError(RuntimeError):
    """``train.checkpoint.dir`` holds checkpoints that this run may not silently discard."""


def train_worker(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train in this process as one rank of the job; returns this rank's summary.

    ``cfg`` is the ``train`` section (or its plain-data form, which pickles everywhere).
    The summary holds ``rank``, ``world_size``, ``attempt``, ``steps`` (optimizer steps),
    ``resumed_from`` (checkpoint step or None), ``epochs`` (per-epoch metrics, identical
    on every rank) and ``bundle`` (the bundle URI written by rank 0).
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_mapping(cfg)
    if cfg.mode == "average":
        raise ConfigError(
            "train.mode",
            "'average' runs as Spark jobs, one per round (spark-train train, pipeline.fit), "
            "not as ranks of one process group: use 'ddp' or 'fsdp' under torchrun",
        )
    if torch.cuda.is_available():
        # cuBLAS needs this for deterministic GEMMs; it must be set before CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives use the current device
    with naming_timeout(distenv.current().rank, cfg.timeout_s):
        _init_process_group(backend, timedelta(seconds=cfg.timeout_s))
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    trainer = None
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        rank = distenv.current().rank
        with naming_timeout(rank, cfg.timeout_s), watchdog(rank, cfg.timeout_s):
            trainer = _Trainer(cfg, device, backend)
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        # DDP sits in reference cycles that hold the process group. Free them while the
        # interpreter is fully alive: a gloo worker thread that drops the last reference to
        # a finished work during interpreter shutdown aborts the process.
        del trainer
        gc.collect()
        dist.destroy_process_group()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """``init_process_group("env://")``, with a fresh store namespace on torchrun restarts.

    torchrun (``--max-restarts``) keeps its agent store across restarts, and gloo's
    rendezvous would read the dead attempt's addresses from it ("Connection refused").
    Prefixing the keys with the restart count gives every attempt its own namespace.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart in ("", "0"):
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"spark-train/restart-{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def builder_args(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``train.model.builder`` (``train.model.args`` less input_shape)."""
    args = dict(to_dict(cfg.model.args))
    args.pop("input_shape", None)
    return args


def model_shape(cfg: TrainConfig, shards: ShardSet) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_outputs)`` of the model ``cfg`` trains on ``shards``."""
    dim = shards.feature_dim
    shape = tuple(int(s) for s in cfg.model.args.get("input_shape") or (dim,))
    if math.prod(shape) != dim:
        raise ValueError(
            f"train.model.args.input_shape {list(shape)} has {math.prod(shape)} elements "
            f"but the shard set's feature vectors have {dim}"
        )
    if cfg.task == "regression":
        return shape, 1
    classes = shards.classes
    if len(classes) < 2:
        raise ValueError(
            f"shard set {cfg.dataset}: a classification task needs >= 2 classes in "
            f"manifest label.classes, found {classes!r}"
        )
    return shape, len(classes)


def _seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Trainer:
    """One rank's training state; methods are the phases of :func:`train_worker`."""

    def __init__(self, cfg: TrainConfig, device: torch.device, backend: str) -> None:
        self.cfg = cfg
        self.device = device
        self.backend = backend
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.attempt = distenv.current().attempt
        self.fault = parse_fault()
        self.shards = ShardSet.open(cfg.dataset)
        if self.shards.task != cfg.task:
            raise ValueError(
                f"train.task is {cfg.task!r} but the shard set {cfg.dataset} was built for "
                f"{self.shards.task!r}"
            )
        _seed_everything(cfg.seed)  # identical model initialisation on every rank
        self.train_reader, self.val_reader = self._readers()
        self.input_shape, self.num_outputs = self._model_shape()
        self.sharded = cfg.mode == "fsdp"  # FSDP2: pipeline/train/modes/fsdp.py has the hooks
        module = self._new_model()
        self.module = fsdp.shard_model(module, device) if self.sharded else module.to(device)
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optimizer)
        steps_per_epoch = math.ceil(self.train_reader.steps_per_epoch / cfg.grad_accum_steps)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.lr_schedule, cfg.epochs * steps_per_epoch
        )
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        # Progress through the run; replaced by a checkpoint's values on resume.
        self.epoch = 0
        self.micro = 0  # micro-batches of the current epoch already consumed
        self.step = 0  # optimizer steps since the start of the run
        self.history: list[dict[str, Any]] = []
        self.epoch_seconds = 0.0  # training time in the current epoch before a resume
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_rows = 0  # rows behind loss_sum (known on the host: no device sync)
        self._resume_rank_state: dict[str, Any] = {}  # this rank's entry of the checkpoint
        self.resumed_from = self._resume()
        self.model = self._wrap_ddp()
        self.autocast: contextlib.AbstractContextManager[Any] = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )

    # -- setup ---------------------------------------------------------------
    def _readers(self) -> tuple[ShardReader, ShardReader | None]:
        train = self._reader("train", shuffle=True)
        if train.steps_per_epoch == 0:
            raise ValueError(
                f"split 'train' of {self.cfg.dataset} has {train.num_rows} rows: too few for "
                f"train.num_workers={self.world_size} ranks (each needs at least one row)"
            )
        val = self.shards.splits.get("val")
        return train, self._reader("val", shuffle=False) if val and val.rows else None

    def _reader(self, split: str, *, shuffle: bool) -> ShardReader:
        return ShardReader(
            self.cfg.dataset,
            split,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            shuffle=shuffle,
            drop_last=False,
            verify=self.cfg.verify,
        )

    def _new_model(self) -> nn.Module:
        return build_model(
            self.cfg.model.builder,
            input_shape=self.input_shape,
            num_outputs=self.num_outputs,
            args=self._builder_args(),
        )

    def _builder_args(self) -> dict[str, Any]:
        return builder_args(self.cfg)

    def _model_shape(self) -> tuple[tuple[int, ...], int]:
        return model_shape(self.cfg, self.shards)

    def _wrap_ddp(self) -> DistributedDataParallel | fsdp.ShardedModel:
        model: DistributedDataParallel | fsdp.ShardedModel
        if self.sharded:
            model = fsdp.ShardedModel(self.module)
        else:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.module, device_ids=ids)
            register_comm_hook(model, self.cfg, self.backend)
        # Ranks draw different dropout masks; seeded after initialisation so that the model
        # is identical everywhere, and replaced by the checkpoint's streams on resume.
        if self.resumed_from is None:
            _seed_everything(self.cfg.seed + _RANK_SEED_STRIDE * (self.rank + 1))
        else:
            restore_rng_state(self._resume_rank_state["rng"])
        return model

    # -- resume ----------------------------------------------------------------
    def _resume(self) -> int | None:
        """Agree on the checkpoint to resume from (rank 0 decides) and load it."""
        value = self._on_rank0(self._resume_step, "choose a checkpoint", ResumeError)
        if value is None:
            return None
        self._load_checkpoint(int(value))
        return int(value)

    def _resume_step(self) -> int | None:
        latest = self.ckpt.latest_step()
        if latest is None:
            if self.cfg.resume:
                log.warning(
                    "train.resume is true but %s holds no checkpoint; starting fresh",
                    self.cfg.checkpoint.dir,
                )
            return None
        if self.attempt > 0 or self.cfg.resume:
            return latest
        state = self.ckpt.load(latest)
        if state is not None and state.get("finished"):
            log.warning(
                "deleting the checkpoints of a finished earlier run from %s",
                self.cfg.checkpoint.dir,
            )
            for step in self.ckpt.steps():
                fs, path = storage.resolve(self.ckpt.path(step))
                fs.delete_dir(path)
            return None
        raise ResumeError(
            f"train.checkpoint.dir {self.cfg.checkpoint.dir} holds checkpoints of an unfinished "
            f"run (latest step {latest}): set train.resume=true to continue it, or point "
            "train.checkpoint.dir at an empty directory to start over"
        )

    def _load_checkpoint(self, step: int) -> None:
        state = self.ckpt.load(step)
        if state is None:
            raise ResumeError(f"checkpoint step {step} vanished from {self.cfg.checkpoint.dir}")
        ranks = state["ranks"]
        if len(ranks) != self.world_size:
            raise ResumeError(
                f"checkpoint step {step} in {self.cfg.checkpoint.dir} was written by "
                f"{len(ranks)} workers; this run has {self.world_size} (train.num_workers): "
                "exact resume needs the same number"
            )
        if self.sharded:
            source = self.ckpt.path(step)
            fsdp.load_full_state(
                self.module, self.optimizer, state["model"], state["optimizer"], source=source
            )
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        # The checkpoint restores the schedule's position; its shape (warm-up, total steps)
        # comes from this run's config, so a resume with more epochs stretches it.
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        self.epoch, self.micro, self.step = state["epoch"], state["micro"], state["step"]
        self.history = list(state["history"])
        mine = ranks[self.rank]
        self._resume_rank_state = mine
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
        # FSDP gathers the full state from every rank onto rank 0 (a collective).
        full = fsdp.full_state(self.module, self.optimizer) if self.sharded else None
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return
        if full is None:
            full = self.module.state_dict(), self.optimizer.state_dict()
        model_state, optim_state = full
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,
            "epoch": self.epoch + 1 if epoch_end else self.epoch,
            "micro": 0 if epoch_end else self.micro,
            "step": self.step,
            "ranks": gathered,
            "history": self.history,
            "finished": epoch_end and self.epoch + 1 == self.cfg.epochs,
        }
        self.ckpt.save(self.step, state)

    # -- training --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the remaining epochs, then write the bundle from rank 0."""
        while self.epoch < self.cfg.epochs:
            self._run_epoch()
            self.epoch, self.micro, self.epoch_seconds = self.epoch + 1, 0, 0.0
        uri = self._write_bundle()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "steps": self.step,
            "resumed_from": self.resumed_from,
            "epochs": self.history,
            "bundle": uri,
        }

    def close(self) -> None:
        """Stop the readers' prefetch threads."""
        self.train_reader.close()
        if self.val_reader is not None:
            self.val_reader.close()

    def _run_epoch(self) -> None:
        """Train the rest of the epoch, evaluate, report, and checkpoint its end."""
        start = time.perf_counter() - self.epoch_seconds
        self.train_reader.set_epoch(self.epoch)
        if self.micro:
            self.train_reader.load_state_dict(self._resume_rank_state["reader"])
        train_loss = self._train_epoch(start)
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {"epoch": self.epoch, "train_loss": train_loss}
        metrics.update(self._evaluate())
        metrics["seconds"] = seconds  # training only
        metrics["eval_seconds"] = time.perf_counter() - start - seconds
        self.history.append(metrics)
        self._report(metrics)
        self._save_checkpoint(epoch_end=True, epoch_start_time=start)

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool, float]]:
        """Yield ``(x, y, ends_group, weight)`` for the rest of the epoch.

        Micro-batches are grouped ``train.grad_accum_steps`` at a time (the last group of an
        epoch may be shorter); ``weight`` is the batch's share of its group's rows, so the
        accumulated gradient is the mean over the rows of the optimizer step, exactly as one
        batch of that many rows would give.
        """
        total, accum = self.train_reader.steps_per_epoch, self.cfg.grad_accum_steps
        for batch in self.train_reader:
            group_start = self.micro - self.micro % accum
            group_end = min(group_start + accum, total)
            rows = self._rows(group_start, group_end)
            self.micro += 1
            x, y = self._on_device(batch.features, batch.labels)
            yield x, y, self.micro == group_end, y.shape[0] / rows if rows else 0.0

    def _on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":  # Tensor.to costs ~50 us even when it is a no-op
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _rows(self, first: int, end: int) -> int:
        """Rows in micro-batches ``[first, end)`` of an epoch (only the last one is short)."""
        size, per_rank = self.cfg.batch_size, self.train_reader.rows_per_rank
        return min(end * size, per_rank) - min(first * size, per_rank)

    def _train_epoch(self, start: float) -> float:
        self.model.train()
        every = self.cfg.checkpoint.every_steps
        last_report = time.perf_counter()
        for x, y, sync, weight in self._micro_batches():
            sync_ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with sync_ctx:
                with self.autocast:
                    loss = self._loss(self.model(x), y, reduction="mean")
                (loss if weight == 1.0 else loss * weight).backward()
            self.loss_sum.add_(loss.detach(), alpha=y.shape[0])  # one op: this runs every step
            self.loss_rows += y.shape[0]
            if not sync:
                continue
            self._optimizer_step()
            if self.fault is not None:
                self.fault.maybe_fire(rank=self.rank, step=self.step, attempt=self.attempt)
            if every and self.step % every == 0 and self.micro < self.train_reader.steps_per_epoch:
                self._save_checkpoint(epoch_end=False, epoch_start_time=start)
            if self.rank == 0 and time.perf_counter() - last_report >= _PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                self._report_step(start)
        totals = self._all_reduce(self.loss_sum, self.loss_rows)
        self.loss_sum.zero_()
        self.loss_rows = 0
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip is not None:
            clip = fsdp.clip_grad_norm_ if self.sharded else nn.utils.clip_grad_norm_
            clip(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _loss(self, out: torch.Tensor, y: torch.Tensor, *, reduction: str) -> torch.Tensor:
        return loss_fn(out, y, self.cfg.task, reduction=reduction)

    def _all_reduce(self, *values: torch.Tensor | float) -> list[float]:
        """Sum scalars over all ranks (in float64)."""
        t = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float | None]:
        """Validation loss and accuracy (classification) or RMSE (regression), all ranks."""
        if self.val_reader is None:
            return EvalSums(self.cfg.task).result(prefix="val_")
        self.module.eval()
        sums = EvalSums(self.cfg.task, self.device)
        self.val_reader.set_epoch(0)
        for batch in self.val_reader:
            x, y = self._on_device(batch.features, batch.labels)
            if y.shape[0] == 0:
                continue
            with self.autocast:
                sums.add(self.module(x), y)
        self.module.train()
        dist.all_reduce(sums.values)
        return sums.result(prefix="val_")

    # -- reporting and output --------------------------------------------------
    def _report_step(self, start: float) -> None:
        """Rank 0's progress within the epoch (its own running loss, the job's rows/s)."""
        n = self.loss_rows
        report(
            epoch=self.epoch,
            step=self.micro,
            steps=self.train_reader.steps_per_epoch,
            samples_per_s=self._rows(0, self.micro)
            * self.world_size
            / max(time.perf_counter() - start, 1e-9),
            loss=float(self.loss_sum) / n if n else float("nan"),
        )

    def _report(self, metrics: dict[str, Any]) -> None:
        """The finished epoch (loss over all ranks), from rank 0."""
        if self.rank != 0:
            return
        steps = self.train_reader.steps_per_epoch
        report(
            epoch=self.epoch,
            step=steps,
            steps=steps,
            samples_per_s=self._rows(0, steps) * self.world_size / max(metrics["seconds"], 1e-9),
            loss=metrics["train_loss"],
        )
        log.info("epoch %d: %s", self.epoch, metrics)

    def _write_bundle(self) -> str:
        """Rank 0 writes the bundle; every rank learns its URI."""
        # Under FSDP every rank joins the gather of the full weights; rank 0 gets a plain copy.
        model = (
            fsdp.consolidated_model(self.module, self._new_model) if self.sharded else self.module
        )
        write = functools.partial(self._bundle, model)
        return str(self._on_rank0(write, f"write the bundle {self.cfg.output}"))

    def _on_rank0(
        self, fn: Callable[[], Any], what: str, error: type[Exception] = RuntimeError
    ) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result, or its failure.

        Other ranks would otherwise wait in their next collective until ``train.timeout_s``;
        here they raise ``error`` with rank 0's message at once.
        """
        box: list[Any] = [None]
        failure: Exception | None = None
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                box[0], failure = ("error", f"{type(e).__name__}: {e}"), e
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if failure is not None:
            raise failure
        if status == "error":
            raise error(f"rank 0 failed to {what}: {value}")
        return value

    def _bundle(self, model: nn.Module | None) -> str:
        assert model is not None, "rank 0 holds the model to write"
        spec = bundle.model_spec(
            self.cfg, self.shards, input_shape=self.input_shape, num_outputs=self.num_outputs
        )
        metrics = {
            "epochs": self.history,
            "steps": self.step,
            "world_size": self.world_size,
            "attempts": self.attempt + 1,
            "resumed_from": self.resumed_from,
        }
        return bundle.write_bundle(
            self.cfg.output,
            model=model,
            spec=spec,
            metrics=metrics,
            config={"train": to_dict(self.cfg)},
            features_uri=bundle.features_source(self.shards),
        )
