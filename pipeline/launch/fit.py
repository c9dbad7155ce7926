"""Driver side of training: :func:`fit` checks the inputs, then runs the mode's launcher.

:func:`fit` is what ``spark-train train``, ``jobs/train.py`` and ``pipeline.fit`` call. It
runs the one preflight (:func:`pipeline.train.preflight.check_training_inputs`), then the
launcher that ``train.mode``'s registry entry names: ``barrier`` modes (``ddp``, ``fsdp``)
as one Spark barrier job of ``train.num_workers`` ranks (:mod:`pipeline.launch.barrier`),
``rounds`` (``average``) as one ordinary Spark job per averaging round
(:mod:`pipeline.launch.rounds`). Without Spark the barrier loop runs under torchrun:
``python -m pipeline.worker``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import yaml

from pipeline.core import storage
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.data.shardset import ShardSet, ShardSetError
from pipeline.launch.barrier import TrainResult, fit_barrier
from pipeline.launch.pyenv import check_executor_python
from pipeline.launch.rounds import fit_average
from pipeline.launch.session import active_session
from pipeline.launch.tracking import tracked
from pipeline.train.bundle import CONFIG, SPEC, model_spec
from pipeline.train.config import TrainConfig
from pipeline.train.engine import CNN_V1
from pipeline.train.models import cnn, resolve_builder
from pipeline.train.preflight import (
    check_training_inputs,
    resolve_checkpoint_model,
    resolve_defaults,
)
from pipeline.train.registry import BarrierMode, Mode, get_mode

__all__ = ["TrainResult", "bundle_is_current", "fit"]


def fit(
    cfg: TrainConfig,
    spark: Any = None,
    *,
    env: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg`` on Spark (``spark`` or the active session) and return rank 0's result.

    ``env`` adds environment variables to every rank (e.g. ``NCCL_*`` settings);
    ``show_progress`` is passed to :func:`pipeline.launch.launcher.run_distributed`. Raises
    :class:`pipeline.launch.launcher.DistributedError` naming the failing rank, with its traceback,
    when every one of ``train.max_attempts`` launches failed. With ``train.tracking`` set,
    the finished (or failed) run is logged to MLflow / TensorBoard (:mod:`pipeline.launch.tracking`).
    """
    mode = get_mode(cfg.mode)  # an unknown train.mode: ConfigError, before anything starts
    with tracked(cfg) as runlog:
        shards = check_training_inputs(cfg, mode)  # refuse unusable inputs before launching
        cfg = resolve_checkpoint_model(resolve_defaults(cfg, shards), shards)
        spark = active_session(spark)
        check_executor_python(spark)
        result = _launch(mode, cfg, spark, env=env, show_progress=show_progress)
        runlog.done(result.epochs, {"steps": result.steps, "attempt": result.attempt})
    return result


def _launch(
    mode: Mode,
    cfg: TrainConfig,
    spark: Any,
    *,
    env: Mapping[str, str] | None,
    show_progress: bool | None,
) -> TrainResult:
    """Run ``cfg`` with the launcher its mode names (:attr:`Mode.launcher`)."""
    if mode.launcher == "rounds":
        return fit_average(cfg, spark, env=env, show_progress=show_progress)
    assert isinstance(mode, BarrierMode), f"mode {mode.name!r} launches as 'barrier'"
    return fit_barrier(cfg, spark, mode=mode, env=env, show_progress=show_progress)


# Keys that change how a run is operated, not what it produces.
_OPERATIONAL_KEYS = frozenset({"resume", "max_attempts", "timeout_s", "verify", "tracking"})


def bundle_is_current(cfg: TrainConfig) -> bool:
    """True when ``cfg.output`` holds a bundle trained with this config on this shard set.

    Compared: the shard set's fingerprint and generation recorded in ``model.json`` against
    the committed manifest, and the bundle's ``config.yaml`` against ``cfg`` (ignoring keys
    that do not affect the result: resume, max_attempts, timeout_s, verify, tracking).
    """
    fs, root = storage.resolve(cfg.output)
    spec_path, config_path = storage.join(root, SPEC), storage.join(root, CONFIG)
    if not (storage.exists(fs, spec_path) and storage.exists(fs, config_path)):
        return False
    try:
        shards = ShardSet.open(cfg.dataset)
    except ShardSetError:
        return False
    cfg = resolve_defaults(cfg, shards)
    spec = json.loads(storage.read_bytes(fs, spec_path))
    trained = (yaml.safe_load(storage.read_bytes(fs, config_path)) or {}).get("train", {})
    current = model_spec(
        cfg, shards, input_shape=tuple(spec["input_shape"]), num_outputs=int(spec["num_outputs"])
    )
    same_data = spec.get("shardset", {}) == current["shardset"]

    def result_keys(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in _OPERATIONAL_KEYS}

    if not same_data:
        return False
    try:  # the recorded section as this release reads it: defaults added, old spellings
        recorded = resolve_defaults(TrainConfig.from_mapping(trained), shards)
    except (ConfigError, TypeError, ValueError):
        return False
    return result_keys(to_dict(_as_configured(recorded, cfg))) == result_keys(to_dict(cfg))


def _as_configured(recorded: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """``recorded`` with the builder ``cfg`` names where the run built another for it.

    A run that resumed a checkpoint of 0.1.0's ``cnn`` built (and recorded) ``cnn_v1``
    (:func:`pipeline.train.engine.checkpoint_builder`) under a config naming ``cnn``.
    """
    if recorded.model.builder == CNN_V1 and resolve_builder(cfg.model.builder) is cnn:
        return recorded.replace(
            model=dataclasses.replace(recorded.model, builder=cfg.model.builder)
        )
    return recorded
