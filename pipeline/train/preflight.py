"""Checks on the driver before a training job is launched: refuse bad inputs in seconds.

A damaged shard set would otherwise be found by a rank, after Spark scheduled the barrier
job, built the model and joined the process group — and then again by every relaunch
(``train.max_attempts``), since a corrupt file does not heal. :func:`check_training_inputs`
runs before any of that and raises an error that names the file, split or key:

* the outputs follow :mod:`pipeline.core.outputs` (no ``..``, no symlinks, empty-or-ours, no
  overlap between ``train.output``, ``train.checkpoint.dir`` and ``train.dataset``);
* the shard set is committed, of the configured task, with at least two classes for
  classification, and its manifest agrees with itself (split rows = sum of shard rows,
  shard paths relative and inside the set);
* every train and val shard exists with the manifest's size and sha256 (per ``train.verify``:
  sha256 for ``auto`` under 1 GiB / ``full``, size for ``size``, nothing for ``none``) and
  holds the manifest's row count (as its format counts them: a Parquet footer, a TFRecord
  scan; :mod:`pipeline.data.formats`);
* the train split has at least one row per rank (with ``train.drop_last``, a batch), and a
  model with BatchNorm layers no 1-row last batch.

The sha256 pass reads the train and val splits once on the driver (about 1 s per GiB); ranks
verify the shards they read again, which catches a file replaced after this check.

Spark-free.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Final

from pipeline.core.configbase import ConfigError
from pipeline.core.outputs import check_disjoint, check_output_dir
from pipeline.data.formats import format_of
from pipeline.data.shardset import ShardInfo, ShardSet, ShardSetError, SplitInfo
from pipeline.train.config import TrainConfig
from pipeline.train.registry import Mode, get_mode

__all__ = [
    "check_train_config",
    "check_training_data",
    "check_training_inputs",
    "resolve_checkpoint_model",
    "resolve_defaults",
    "resolve_task",
]

log = logging.getLogger(__name__)

_READ_SPLITS: Final = ("train", "val")


def check_training_inputs(cfg: TrainConfig, mode: Mode | None = None) -> ShardSet:
    """Refuse a run that cannot succeed; return the opened shard set.

    The one preflight of every entry point: :func:`pipeline.fit` runs it on the driver before
    launching, ``python -m pipeline.worker`` on rank 0 before joining the process group.
    ``mode`` defaults to the registered ``train.mode``. Raises ``ConfigError`` (the key to
    change), :class:`ShardSetError` (the file or split that is damaged) or ``ValueError``
    (data that cannot be trained on).
    """
    mode = check_train_config(cfg, mode)
    shards = ShardSet.open(cfg.dataset)
    check_training_data(cfg, shards, mode=mode)
    check_model(cfg, shards)
    for name in _READ_SPLITS:  # the cheap checks above first; these read every file
        split = shards.splits.get(name)
        if split is not None:
            _check_split(shards, split, cfg.verify)
    rows = shards.split("train").rows
    log.info("preflight: %s passed (%d train rows, verify=%s)", cfg.dataset, rows, cfg.verify)
    return shards


def check_train_config(cfg: TrainConfig, mode: Mode | None = None) -> Mode:
    """The checks that need no shard set; returns the mode.

    ``spark-train run`` makes them before its ETL, so that a mistake in the train section
    costs seconds, not an ETL. The mode's settings, the outputs (disjoint, empty or ours) and that ``train.model.builder``
    imports (``ConfigError`` naming the key).
    """
    from pipeline.train.models import BuilderError, resolve_builder

    mode = mode or get_mode(cfg.mode)
    mode.check_config(cfg)  # settings first: they need no I/O
    check_disjoint(
        {
            "train.output": cfg.output,
            "train.checkpoint.dir": cfg.checkpoint.dir,
            "train.dataset": cfg.dataset,
        }
    )
    check_output_dir("train.output", cfg.output, "bundle")
    check_output_dir("train.checkpoint.dir", cfg.checkpoint.dir, "checkpoints")
    try:
        resolve_builder(cfg.model.builder)
    except BuilderError as e:
        raise ConfigError(
            "train.model.builder", str(e).removeprefix("train.model.builder: ")
        ) from e
    if cfg.init.uri is not None:
        from pipeline.train.finetune import open_source

        open_source(cfg.init)  # the file is there, of a known format (tensors: check_model)
    return mode


def check_training_data(
    cfg: TrainConfig, shards: ShardSet, *, workers: int | None = None, mode: Mode | None = None
) -> None:
    """The cheap checks (manifest only) that every mode makes, also inside each rank or task.

    The mode's own config and data checks, the label task and classes, and at least one
    training row per worker (``workers``: the job's world size, default
    ``train.num_workers``).
    """
    mode = mode or get_mode(cfg.mode)
    mode.check_config(cfg)
    _check_label(cfg, shards)
    workers = cfg.max_workers if workers is None else workers
    train = shards.split("train")
    if train.rows < workers:
        what = "no rows" if train.rows == 0 else f"only {train.rows} row(s)"
        raise ConfigError(
            "train.num_workers",
            f"split 'train' of {cfg.dataset} has {what}: too few for train.num_workers="
            f"{workers} ranks (each rank needs at least one row); lower "
            "train.num_workers or check the ETL's quarantine",
        )
    if cfg.drop_last:
        for rows, batch in _rank_rows(cfg, shards, workers):
            if rows < batch:
                raise ConfigError(
                    "train.drop_last",
                    f"a rank reads {rows} training row(s) per epoch, fewer than its batch of "
                    f"{batch}: with drop_last it would train on nothing; lower "
                    "train.batch_size or set train.drop_last: false",
                )
    mode.check_data(cfg, shards)


def _rank_rows(
    cfg: TrainConfig, shards: ShardSet, workers: int | None = None
) -> list[tuple[int, int]]:
    """(training rows per epoch, rows per batch) of each rank at each world size it may run at.

    A rank reads ``rows // world_size`` rows (:mod:`pipeline.data.reader`); ``average`` with
    ``partition: shards`` reads its own shard files. ``workers`` fixes the world size.
    """
    train = shards.split("train")
    if cfg.mode == "average" and cfg.averaging.partition == "shards":
        n = cfg.max_workers
        return [(sum(s.rows for s in train.shards[i::n]), cfg.batch_size) for i in range(n)]
    sizes = cfg.world_sizes() if workers is None else (workers,)
    return [(train.rows // w, cfg.rank_batch(w)) for w in sizes]


def _check_batch_norm(cfg: TrainConfig, shards: ShardSet, model: Any) -> None:
    """Refuse a BatchNorm model whose last batch of an epoch would hold one row.

    BatchNorm cannot normalize a single row in training (torch raises "Expected more than 1
    value per channel" at the end of the first epoch); ``train.drop_last`` skips that batch.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    if cfg.drop_last or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return
    for rows, batch in _rank_rows(cfg, shards):
        if rows % batch == 1:
            raise ConfigError(
                "train.drop_last",
                f"{cfg.model.builder} has BatchNorm layers, and a rank's last batch of each "
                f"epoch would hold 1 row ({rows} rows per rank, train.batch_size {batch}), "
                "which BatchNorm cannot train on: set train.drop_last: true or change "
                "train.batch_size",
            )


def resolve_defaults(cfg: TrainConfig, shards: ShardSet) -> TrainConfig:
    """``cfg`` with what was left unset resolved: :func:`resolve_task` and the learning rate.

    An unset ``train.optimizer.lr`` becomes the builder's recommended rate
    (:func:`pipeline.train.models.recommended_lr`); a rate the user set is kept.
    """
    from pipeline.train.models import BuilderError, recommended_lr

    cfg = resolve_task(cfg, shards)
    if cfg.optimizer.lr is not None:
        return cfg
    try:
        lr = recommended_lr(cfg.model.builder, cfg.model.args)
    except BuilderError as e:
        raise ConfigError(
            "train.model.builder", str(e).removeprefix("train.model.builder: ")
        ) from e
    return cfg.replace(optimizer=dataclasses.replace(cfg.optimizer, lr=lr))


def resolve_task(cfg: TrainConfig, shards: ShardSet) -> TrainConfig:
    """``cfg`` with ``train.task`` set to the shard set's task when it is unset (None).

    An explicit ``train.task`` is kept; :func:`check_training_data` refuses a mismatch.
    """
    return cfg if cfg.task is not None else cfg.replace(task=shards.task)


def resolve_checkpoint_model(cfg: TrainConfig, shards: ShardSet) -> TrainConfig:
    """``cfg`` with the builder of the checkpoint it resumes, decided here on the driver.

    A checkpoint directory whose latest checkpoint has a newer ``format_version`` is
    refused here (:class:`~pipeline.train.checkpoint.CheckpointTooNew`).

    A ``train.resume`` of a checkpoint of 0.1.0's ``cnn`` builds ``cnn_v1``, the
    architecture it was trained as, with one warning
    (:func:`pipeline.train.engine.checkpoint_builder`); the ranks get the decided config.
    """
    from pipeline.train import engine
    from pipeline.train.checkpoint import CheckpointManager

    ckpt = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
    # Reads the checkpoints' meta.json whatever the builder: one written by a newer
    # spark-train is refused here in one line (exit 2), not in every rank of every attempt.
    ckpt.steps()  # meta.json files only: no checkpoint data is read
    return engine.with_builder(cfg, engine.checkpoint_builder(cfg, shards, ckpt))


def _check_label(cfg: TrainConfig, shards: ShardSet) -> None:
    if cfg.task is not None and shards.task != cfg.task:
        raise ConfigError(
            "train.task",
            f"is {cfg.task!r} but the shard set {cfg.dataset} was built for {shards.task!r} "
            "(leave train.task unset to take the shard set's)",
        )
    if shards.task == "classification" and len(shards.classes) < 2:
        raise ValueError(
            f"shard set {cfg.dataset} has {len(shards.classes)} class(es) {shards.classes!r} "
            "in manifest label.classes: classification needs at least 2 (declare etl.classes, "
            "or use task regression)"
        )


def _check_split(shards: ShardSet, split: SplitInfo, verify: str) -> None:
    shards.check_split_rows(split.name)
    for shard in split.shards:
        _check_path(shards, shard)
    if verify != "none":
        shards.verify_shards(split.shards, mode=verify)
    for shard in split.shards:
        _check_footer(shards, shard)


def _check_path(shards: ShardSet, shard: ShardInfo) -> None:
    parts = shard.path.replace("\\", "/").split("/")
    if shard.path.startswith("/") or "://" in shard.path or ".." in parts:
        raise ShardSetError(
            f"{shards.uri}/manifest.json lists shard {shard.path!r} outside the shard set; "
            "shard paths must be relative, without '..'"
        )


def _check_footer(shards: ShardSet, shard: ShardInfo) -> None:
    shown, fmt = shards.shard_uri(shard), format_of(shards)
    try:  # a Parquet footer; TFRecord has none: its records are counted (length CRCs checked)
        rows = fmt.count_rows(shards.fs, shards.shard_path(shard), where=shown)
    except FileNotFoundError as e:
        raise ShardSetError(f"shard {shown} is missing (listed in the manifest)") from e
    except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid is a ValueError
        raise ShardSetError(f"shard {shown} is not a readable {fmt.name} file: {e}") from e
    shards.check_shard_rows(shard, rows, fmt.index_source)


def check_model(cfg: TrainConfig, shards: ShardSet) -> None:
    """Build the model on the ``meta`` device and run one forward pass of a 2-row batch.

    A builder that does not import, rejects its arguments, or does not fit the input shape
    (``train.model.args.input_shape``, the shard set's columns) fails here on the driver in
    seconds, as a ``ConfigError`` naming the key, instead of in every rank of every attempt.
    The meta device allocates nothing, so this costs the same for any model size.
    """
    import torch

    from pipeline.data.batch import Batch
    from pipeline.train import engine, finetune
    from pipeline.train.models import BuilderError

    cfg = resolve_defaults(cfg, shards)
    try:
        inputs = engine.model_inputs(cfg, shards)
        with torch.device("meta"):
            model = engine.new_model(cfg, shards)  # train.freeze.patterns are checked here
    except ConfigError:
        raise
    except BuilderError as e:
        raise ConfigError(
            "train.model.builder", str(e).removeprefix("train.model.builder: ")
        ) from e
    except ValueError as e:  # input_shape that does not fit the columns
        raise ConfigError("train.model.args.input_shape", str(e)) from e
    stored = {
        c.name: torch.zeros((2, *c.column.spec.shape), dtype=getattr(torch, c.column.spec.dtype))
        for c in inputs.columns
    }
    x, _ = inputs.prepare(Batch(stored, torch.zeros(2)), torch.device("cpu"))

    def forward(on: str) -> Any:
        moved = {k: v.to(on) for k, v in x.items()} if isinstance(x, dict) else x.to(on)
        with torch.no_grad():
            return model(moved)

    try:
        try:
            out = forward("meta")
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            # A forward that reads values (Tensor.item(): Hugging Face's attention masks)
            # cannot run on meta: build the model on the CPU for this one batch.
            with torch.random.fork_rng(devices=[]):
                model = engine.new_model(cfg, shards)
            out = forward("cpu")
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = {c.name: list(c.shape) for c in inputs.columns}
        raise ConfigError(
            "train.model",
            f"{cfg.model.builder} with input_shape {list(inputs.input_shape)} (inputs {shapes}) "
            f"fails on a batch of the shard set's columns: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
        ) from e
    _check_batch_norm(cfg, shards, model)
    finetune.param_groups(model, cfg.optimizer)  # train.optimizer.lr_multipliers match
    if cfg.init.uri is not None:
        finetune.check_init(cfg.init, model)  # the keys and shapes fit; logs the summary
    _check_outputs(cfg, shards, out)


def _check_outputs(cfg: TrainConfig, shards: ShardSet, out: Any) -> None:
    """The model's output for a 2-row batch has the task's shape."""
    import torch

    outputs = 1 if cfg.task == "regression" else len(shards.classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, outputs):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            "train.model",
            f"{cfg.model.builder} returns {got} for a batch of 2 rows; the {cfg.task} task "
            f"needs [2, {outputs}]",
        )
