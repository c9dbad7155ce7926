"""What elastic training and preemption cost: a planned relaunch, and the per-step agreement.

1. **Relaunch**: the same small 2-rank DDP run (``local[2]``, warm Python workers, 2 epochs
   of 10 steps, a checkpoint every 4) uninterrupted and with a SIGTERM to rank 1 after step
   6 (the ranks checkpoint step 6, return, and the launcher relaunches them, which resume
   step 6), alternating, median of ``--reps``. The difference of the medians is what a planned
   stop and relaunch costs; the uninterrupted run is the baseline of the ratio.
2. **Agreement**: every optimizer step, the ranks OR two flags (a SIGTERM seen, a grow asked)
   with one CPU all-reduce (``Collectives.any_of``). Timed in a 2-rank gloo group against the
   step of the same run (its median step time) and a bare ``dist.barrier()``: the
   cheapest collective there is.

    python bench/elastic.py [--reps 3]

Rewrites the "## Elastic" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.chdir(REPO)

from bench._common import environment, spark_session, write_section  # noqa: E402

SECTION = "Elastic"
CALLS = 2000


def agreement() -> dict[str, float]:
    """In each rank: µs per any_of (2 flags) and per barrier, CALLS of each after a warm-up."""
    import torch.distributed as dist

    from pipeline.train.collectives import ProcessGroup

    dist.init_process_group("gloo", init_method="env://")
    comm = ProcessGroup()
    out = {}
    for name, call in (
        ("any_of", lambda: comm.any_of([False, False])),
        ("barrier", dist.barrier),
    ):
        for _ in range(100):
            call()
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        out[name] = (time.perf_counter() - start) / CALLS * 1e6
    dist.destroy_process_group()
    return out


def _train(spark: Any, root: Path, dataset: str, fault: str | None) -> tuple[float, Any]:
    from pipeline.launch.fit import fit
    from pipeline.runtime.faults import FAULT_ENV
    from pipeline.train.config import TrainConfig

    cfg = TrainConfig.from_mapping(
        {
            "dataset": dataset,
            "model": {"args": {"hidden": [32]}},
            "num_workers": 2,
            "epochs": 2,
            "batch_size": 32,
            "checkpoint": {"dir": str(root / "ckpt"), "every_steps": 4},
            "output": str(root / "model"),
            "max_attempts": 1,
        }
    )
    env = {FAULT_ENV: fault} if fault else None
    start = time.perf_counter()
    result = fit(cfg, spark, env=env, show_progress=False)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from pipeline.launch.launcher import run_distributed
    from tests.shards import make_shardset

    spark = spark_session("2g")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_shardset(
            root / "set", rows_per_shard={"train": [300, 200, 0, 125], "val": [100]}, seed=3
        )
        plain, stopped, steps = [], [], []
        for rep in range(args.reps + 1):  # the first pair warms the Python workers up
            for name, fault, out in (
                ("plain", None, plain),
                ("stopped", "rank=1,step=6,kind=sigterm", stopped),
            ):
                seconds, result = _train(spark, root / f"{name}{rep}", dataset, fault)
                assert (result.attempt == 1) == (fault is not None), result
                if rep:
                    out.append(seconds)
                    if fault is None:
                        steps.extend(e["seconds"] / 10 for e in result.epochs)
        costs = run_distributed(agreement, num_workers=2, spark=spark)
    spark.stop()

    base, with_stop = statistics.median(plain), statistics.median(stopped)
    step_us = statistics.median(steps) * 1e6
    any_of = max(c["any_of"] for c in costs)
    barrier = max(c["barrier"] for c in costs)
    body = f"""{environment()} Load average before the run: {load[0]:.2f}.

Relaunch: `local[2]`, 2 ranks, 2 epochs of 10 DDP steps (MLP [32], 625 rows), median of
{args.reps} alternating runs after a warm-up pair. Agreement: {CALLS} calls in a 2-rank gloo
group, the slower rank.

| what | baseline | with it | cost | ratio |
|---|---:|---:|---:|---:|
| a run with a SIGTERM after step 6 (checkpoint, stop, relaunch, resume) | {base:.2f} s uninterrupted | {with_stop:.2f} s | **{with_stop - base:.2f} s** per planned relaunch | {with_stop / base:.2f}× |
| the per-step stop agreement (`any_of`, 2 flags) | {barrier:.0f} µs `dist.barrier()` | {any_of:.0f} µs | {any_of / step_us * 100:.1f} % of this run's {step_us / 1e3:.1f} ms step | {any_of / barrier:.2f}× barrier |
"""
    print(body)
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
