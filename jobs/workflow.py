"""``spark-train run``: etl → train → evaluate, each stage skipped when up to date.

Idempotent per stage, so a scheduler can rerun it at any time:

- **etl** is skipped when the committed shard set has the fingerprint of the input files
  (path, size, mtime) and of the ``etl`` config, and every shard it lists has its size;
- **train** is skipped when the bundle at ``train.output`` was trained on this shard-set
  generation with the same ``train`` config (operational keys such as ``max_attempts``
  aside, see :func:`pipeline.launch.fit.bundle_is_current`);
- **evaluate** always runs (it is cheap and needs no Spark).

``--force etl,train`` (or bare ``--force``: every stage) rebuilds regardless. A rebuilt shard
set is a new generation, so forcing ``etl`` also retrains. ``--resume`` lets training continue
from the latest checkpoint in ``train.checkpoint.dir`` (a scheduler's retry of the same run).
Every run writes a :class:`jobs.runsummary.RunSummary` (``--summary PATH``, default
``run-summary.json`` beside the bundle), also when a stage fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from jobs.clierrors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, UsageError
from jobs.runsummary import RunSummary, default_summary_path
from jobs.stages import run_etl_stage, run_train_stage, spark_session
from pipeline.config import Config, ConfigError
from pipeline.data.manifest import Manifest

__all__ = [
    "FORCEABLE",
    "STAGES",
    "etl_counts",
    "exit_status",
    "parse_force",
    "run_workflow",
]

STAGES = ("etl", "train", "evaluate")
FORCEABLE = ("etl", "train")
"""Stages ``--force`` can name; ``all`` names every one of them."""
EXIT_INTERRUPTED = 130

log = logging.getLogger(__name__)


def parse_force(value: str) -> frozenset[str]:
    """``--force`` argument: comma-separated stage names from :data:`FORCEABLE`, or ``all``."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    if names == {"all"}:
        return frozenset(FORCEABLE)
    unknown = sorted(names - set(FORCEABLE))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {unknown or [value]}; choose from {', '.join(FORCEABLE)} or all"
        )
    return frozenset(names)


def exit_status(exc: BaseException) -> int:
    """The exit code ``spark-train`` ends with after ``exc`` (the README's CLI section)."""
    if isinstance(exc, (ConfigError, UsageError)):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_RUNTIME


def run_workflow(
    args: argparse.Namespace,
    cfg: Config,
    under_submit: bool,
    *,
    prepare: Callable[[Any], None] | None = None,
) -> int:
    """Run the stages, print what each did, and write the run summary (also on failure).

    ``prepare(spark)`` runs after the config's checks and the session start, before the ETL
    (``demo`` writes its sample data there).
    """
    summary = RunSummary(
        "run",
        STAGES,
        path=args.summary,
        config=args.config,
        overrides=args.overrides,
        forced=sorted(args.force),
    )
    try:
        if summary.path is None:
            summary.path = default_summary_path(cfg.train.output)
        _run_stages(summary, args, cfg, under_submit, prepare)
    except BaseException as exc:
        summary.finish(exit_status(exc), exc)
        if summary.path is not None:
            try:
                print(f"run summary: {summary.write()}")
            except Exception as err:  # keep the run's own error, which is the one to report
                log.error("could not write the run summary to %s: %s", summary.path, err)
        raise
    summary.finish(EXIT_OK)
    print(f"run summary: {summary.write()}")
    return EXIT_OK


def _run_stages(
    summary: RunSummary,
    args: argparse.Namespace,
    cfg: Config,
    under_submit: bool,
    prepare: Callable[[Any], None] | None,
) -> None:
    etl, train = cfg.etl, cfg.train
    if args.resume:
        train = dataclasses.replace(train, resume=True)
    _check_run_config(cfg)
    summary.doc["outputs"] = {"shard_set": etl.output, "bundle": train.output}
    spark = spark_session(cfg, under_submit=under_submit)
    summary.doc["spark"] = {  # the runtime conf answers on classic and Connect sessions
        "version": spark.version,
        "master": spark.conf.get("spark.master", None),
        "app_id": spark.conf.get("spark.app.id", None),
        "remote": cfg.spark.remote,
    }
    if prepare is not None:
        prepare(spark)
    _etl_stage(summary, spark, etl, force="etl" in args.force)
    _train_stage(summary, spark, train, force="train" in args.force)
    _evaluate_stage(summary, train.output, etl.output)
    print(f"model bundle: {train.output}")


def _check_run_config(cfg: Config) -> None:
    """The checks of a run's config that need no Spark and no shard set.

    Made first, before Spark starts and the ETL writes: ``ConfigError`` naming the key.
    """
    from pipeline.train.preflight import check_train_config  # lazy: loads torch

    train, etl = cfg.train, cfg.etl
    if train.dataset != etl.output:
        raise ConfigError("train.dataset", f"is {train.dataset!r} but etl.output is {etl.output!r}")
    check_train_config(train)
    etl_task, train_task = etl.resolved_task, train.task
    if train_task is not None and train_task != etl_task:
        raise ConfigError(
            "train.task",
            f"is {train_task!r} but the ETL builds a {etl_task!r} shard set (etl.task / the "
            "label's type); leave train.task unset to take the shard set's",
        )


def _etl_stage(summary: RunSummary, spark: Any, etl: Any, *, force: bool) -> None:
    with summary.stage("etl") as stage:
        result = run_etl_stage(spark, etl, force=force)
        if result.status == "up_to_date":
            stage.skip("shard set up to date (same input files and etl config)")
        stage.counts = etl_counts(result.manifest)


def etl_counts(manifest: dict[str, Any]) -> dict[str, Any]:
    """Row and shard counts of a shard-set manifest, for the run summary."""
    info = Manifest.from_json(manifest)
    rec, quarantine = info.reconciliation, info.quarantine
    rows = sum(s.rows for s in info.splits.values())
    return {
        "rows_in": rec.rows_in if rec else rows,
        "rows_ok": rec.rows_ok if rec else rows,
        "rows_quarantined": rec.rows_quarantined if rec else 0,
        "quarantined_by_reason": dict(quarantine.by_reason) if quarantine else {},
        "rows_by_split": {name: s.rows for name, s in info.splits.items()},
        "shards": sum(len(s.shards) for s in info.splits.values()),
        "generation": info.generation,
    }


def _train_stage(summary: RunSummary, spark: Any, train: Any, *, force: bool) -> None:
    from pipeline.launch.fit import bundle_is_current  # lazy: loads torch

    with summary.stage("train") as stage:
        if not force and bundle_is_current(train):
            print(
                f"bundle {train.output}: up to date (same shard set and train config), not retrained"
            )
            stage.skip("bundle up to date (same shard-set generation and train config)")
            return
        result = run_train_stage(spark, train)
        stage.counts = {
            "epochs": len(result.epochs),
            "steps": result.steps,
            "world_size": result.world_size,
            "attempt": result.attempt,
            "resumed_from": result.resumed_from,
            "resizes": result.resizes,
        }
        stage.metrics = {k: v for k, v in result.final.items() if v is not None}


def _evaluate_stage(summary: RunSummary, bundle: str, dataset: str) -> None:
    from pipeline.serve.evaluate import evaluate_bundle  # lazy: loads torch

    with summary.stage("evaluate") as stage:
        metrics = evaluate_bundle(bundle, dataset, "test")
        shown = {k: v for k, v in metrics.items() if k not in ("bundle", "dataset")}
        print("test metrics: " + json.dumps(shown))
        stage.metrics = shown
        summary.doc["metrics"] = shown
