"""Run the training loop under plain torchrun, without Spark.

    torchrun --nproc_per_node=2 -m pipeline.worker --config c.yaml [--set train.key=value ...]

Rank 0 first runs the same preflight as ``spark-train train``
(:func:`pipeline.train.preflight.check_training_inputs`: outputs, shard set, labels, rows per
rank, the mode's own checks) and exits as the CLI does — 2 for a config error (the message
names the key), 1 for damaged or unusable data — before any rank joins the process group.
Then every rank runs :func:`pipeline.train.loop.train_worker` on the config's ``train``
section, exactly as the Spark launcher does; rank 0 writes the bundle and prints the run
summary as JSON.
``torchrun --max-restarts=N`` relaunches after a failure, and the relaunched ranks resume
from the latest checkpoint (torchrun's restart count plays the launcher's attempt number).
Ranks that stopped on purpose — SIGTERM, a preemption notice — checkpoint at the step
boundary and exit :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``): run again with
``--set train.resume=true`` (with an elastic ``train.num_workers``, on another number of
processes if need be), or let ``--max-restarts`` do it.
This module must not import pyspark: GPU machines have none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from pipeline.config import load_config
from pipeline.core.configbase import ConfigError
from pipeline.data.shardset import ShardSetError
from pipeline.train.loop import train_worker
from pipeline.train.preflight import check_training_inputs
from pipeline.train.registry import get_mode

__all__ = ["EXIT_STOPPED", "main"]

EXIT_STOPPED = 75
"""The ranks checkpointed and stopped on purpose (a preemption notice): resume to go on."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="YAML config with a 'train' section")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    return parser.parse_args(argv)


@record
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad config)."""
    args = _parse(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides).train
        get_mode(cfg.mode)  # every rank: an unknown train.mode exits 2 here, naming it
        if rank == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0"):
            check_training_inputs(cfg)  # a restart resumes inputs that already passed
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ShardSetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = train_worker(cfg)
    if summary.get("stopped"):
        print(
            f"rank {rank}: stopped at step {summary['steps']} ({summary['stopped']}), "
            "checkpointed: run again with --set train.resume=true to go on",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if summary["rank"] == 0:
        print(json.dumps(summary, default=str))
    return 0


def _exit(code: int) -> None:
    """Flush and leave without interpreter teardown.

    A gloo worker thread can still be dropping the last reference to a finished collective
    (whose tensors are Python objects) when the interpreter finalizes; it then needs the GIL,
    which a finalizing interpreter refuses, and the process aborts ("terminate called without
    an active exception", about 1 run in 10 with torch 2.13). Everything this process had to
    do is done and flushed here, so skipping teardown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit(main() or 0)
