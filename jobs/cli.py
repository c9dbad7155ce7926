"""``spark-train``: one console script whose subcommands are the spark-submit jobs.

``spark-submit jobs/etl.py --config c.yaml`` runs exactly ``spark-train etl --config c.yaml``
(the job files call :func:`submit`: :func:`main` with the subcommand prepended). Exit codes:
0 success, 2 bad usage or config (the message names the key or argument), 1 runtime failure.
``--debug`` shows tracebacks instead of one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobs.clierrors import (
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    UsageError,
    log_effective_config,
    newer_format,
    report_error,
)
from jobs.runsummary import read_summary
from jobs.stages import run_etl_stage, run_train_stage, spark_session
from jobs.workflow import FORCEABLE, parse_force, run_workflow
from pipeline.config import Config, ConfigError, load_config
from pipeline.core import storage
from preprocessing.config import INPUT_FORMATS

__all__ = ["DEMO_CONFIG", "build_parser", "main", "submit"]

log = logging.getLogger("spark_train")

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections spark, etl, train)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set etl.num_shards=16 (repeatable)",
    )
    p.add_argument(
        "--remote",
        metavar="URL",
        help="Spark Connect server (sc://HOST:PORT, or local[N]); same as --set spark.remote=URL",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        nargs="?",
        const=frozenset(FORCEABLE),
        default=frozenset(),
        type=parse_force,
        metavar="STAGES",
        help=f"rebuild these stages even if up to date: comma-separated {', '.join(FORCEABLE)}; "
        "alone or 'all': every stage",
    )
    p.add_argument(
        "--summary", help="run summary JSON (default: run-summary.json beside the bundle)"
    )
    p.add_argument(
        "--resume", action="store_true", help="training continues from the latest checkpoint"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``spark-train`` argument parser (every subcommand and flag)."""
    parser = OneLineParser(prog="spark-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("make-data", help="write a synthetic raw table (demo/benchmark data)")
    _common(p)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--dirty-fraction", type=float, default=0.01)
    p.add_argument(
        "--text",
        action="store_true",
        help="add a free-text column 'review' whose words carry the label signal",
    )
    p = sub.add_parser("etl", help="validate, split, featurize and shard the raw table")
    _common(p)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p = sub.add_parser("train", help="train on the shard set (barrier-mode DDP on Spark)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p = sub.add_parser("evaluate", help="evaluate a bundle on a split of a shard set")
    _common(p)
    p.add_argument("--model", help="bundle (default: train.output)")
    p.add_argument("--dataset", help="shard set (default: the one the bundle was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p = sub.add_parser("score", help="score a table with a bundle; writes Parquet")
    _common(p)
    p.add_argument("--model", help="bundle (default: train.output)")
    p.add_argument("--input", required=True, help="table to score (read like etl.input)")
    p.add_argument("--output", required=True, help="Parquet directory (replaced atomically)")
    p.add_argument(
        "--format", choices=INPUT_FORMATS, help="input format (default: the bundle's etl.input)"
    )
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    for name, text in (
        ("run", "etl → train → evaluate, skipping up-to-date stages"),
        ("demo", "make-data (if absent) + run on local[*]"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        _run_flags(p)
        if name == "demo":
            p.add_argument("--rows", type=int, default=200_000, help="rows of sample data")
    p = sub.add_parser(
        "inspect", help="summarize a shard set, checkpoint dir, bundle or run summary (.json)"
    )
    _common(p)
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# Each command imports what it runs inside its function, so that pyspark, torch and the ETL
# load only for the command that needs them (and not for --help or a usage error).


def _cmd_make_data(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from preprocessing.make_data import make_data

    if args.rows < 1:
        raise UsageError(f"--rows must be >= 1, got {args.rows}")
    spark = spark_session(cfg, under_submit=under_submit)
    n = make_data(
        spark,
        args.rows,
        args.output,
        seed=args.seed,
        fmt=args.format,
        dirty_fraction=args.dirty_fraction,
        text=args.text,
    )
    print(f"wrote {n} rows ({args.format}, seed {args.seed}) to {args.output}")
    return EXIT_OK


def _cmd_etl(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    spark = spark_session(cfg, under_submit=under_submit)
    run_etl_stage(spark, cfg.etl, force=args.force)
    return EXIT_OK


def _cmd_train(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from pipeline.train.registry import get_mode

    train = cfg.train
    get_mode(train.mode)  # an unknown train.mode exits 2 before the Spark session starts
    if args.resume:
        train = dataclasses.replace(train, resume=True)
    spark = spark_session(cfg, under_submit=under_submit)
    run_train_stage(spark, train)
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from pipeline.serve.evaluate import evaluate_bundle
    from pipeline.train.bundle import require_bundle

    model = args.model or (cfg.train.output if cfg.train_data is not None else None)
    if model is None:
        raise UsageError("evaluate needs --model BUNDLE (or a config with train.output)")
    require_bundle(model, "--model")
    print(json.dumps(evaluate_bundle(model, args.dataset, args.split), indent=2))
    return EXIT_OK


def _cmd_score(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from pipeline.launch.pyenv import check_executor_python
    from pipeline.serve.score import score_table
    from pipeline.train.bundle import check_bundle_model, require_bundle

    model = args.model or (cfg.train.output if cfg.train_data is not None else None)
    if model is None:
        raise UsageError("score needs --model BUNDLE (or a config with train.output)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    require_bundle(model, "--model")
    check_bundle_model(model)  # before Spark starts: a builder that cannot be built exits 2
    spark = spark_session(cfg, under_submit=under_submit)
    check_executor_python(spark)  # one line instead of a task failure per partition
    result = score_table(
        spark, model, args.input, args.output, fmt=args.format, batch_size=args.batch_size
    )
    print(result.summary())
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    return run_workflow(args, cfg, under_submit)


def _cmd_demo(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from preprocessing.make_data import make_data

    raw = cfg.etl.input.path

    def sample_data(spark: Any) -> None:  # after the run's config checks: a mistake writes none
        fs, path = storage.resolve(raw)
        if "etl" in args.force or not storage.exists(fs, path):
            make_data(spark, args.rows, raw, seed=0)
            print(f"wrote {args.rows} rows of sample data to {raw}")

    return run_workflow(args, cfg, under_submit, prepare=sample_data)


def _cmd_inspect(args: argparse.Namespace, cfg: Config, under_submit: bool) -> int:
    from pipeline.serve.inspect import describe, render

    if args.path.endswith(".json"):  # a run summary (run / demo --summary)
        d = {"kind": "run-summary", "uri": args.path, **read_summary(args.path)}
    else:
        d = describe(args.path)
    print(json.dumps(d, indent=2, default=str) if args.json else render(d))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Config, bool], int]] = {
    "make-data": _cmd_make_data,
    "etl": _cmd_etl,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "score": _cmd_score,
    "run": _cmd_run,
    "demo": _cmd_demo,
    "inspect": _cmd_inspect,
}


def _import_from_working_dir() -> None:
    """User modules in the working directory import in every command, as under ``python -m``.

    ``train.model.builder: "mymodels:net"`` with ``mymodels.py`` beside the config: the
    driver builds and checks the model, ``evaluate`` loads the bundle, and local Python
    workers (started with ``-m``, in this directory) import it alike. A console script's
    ``sys.path[0]`` is its ``bin/`` directory, and spark-submit's is the job file's, so without
    this only the executors would see the module. On a cluster the module must reach the
    executors too: ``--py-files`` / ``spark.submit.pyFiles`` (README, "Your own model").
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None, *, under_submit: bool | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    _import_from_working_dir()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if under_submit is None:
        under_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    if args.command == "demo" and args.config is None:
        args.config = str(DEMO_CONFIG)
    if args.remote is not None:
        args.overrides.append(f"spark.remote={json.dumps(args.remote)}")
    try:
        cfg = load_config(args.config, args.overrides)
        log_effective_config(log, cfg)
        return COMMANDS[args.command](args, cfg, under_submit)
    except (ConfigError, UsageError) as e:
        if args.debug:
            raise
        return report_error(args.command, e, usage=True)
    except Exception as e:
        if args.debug:
            raise
        newer = newer_format(e)  # an artifact of a newer release: exit 2, upgrading fixes it
        if newer is not None:
            return report_error(args.command, newer, usage=True)
        return report_error(args.command, e, usage=False)


def submit(command: str) -> None:
    """Run ``spark-train COMMAND <argv>`` under spark-submit and exit with its code.

    The body of the ``jobs/*.py`` spark-submit entry files.
    """
    sys.exit(main([command, *sys.argv[1:]], under_submit=True))


if __name__ == "__main__":
    sys.exit(main())
