"""Driver program for the local-cluster launcher test; prints one JSON line with its findings.

Runs in its own process (one Python process holds one SparkContext): a 2-rank gloo
all_reduce through ``run_distributed`` on two real executor JVMs, the barrier-slot count,
and the fail-fast error for 3 ranks on 2 slots.
"""

from __future__ import annotations

import json
import os
import sys
import time

from pyspark.sql import SparkSession

from pipeline.launch.launcher import barrier_slots, run_distributed


def allreduce() -> dict[str, object]:
    import torch
    import torch.distributed as dist

    from pipeline.runtime.distenv import current, device_and_backend

    device, backend = device_and_backend()
    dist.init_process_group(backend, init_method="env://")
    value = torch.tensor([float(dist.get_rank() + 1)], device=device)
    dist.all_reduce(value)
    dist.destroy_process_group()
    env = current()
    return {
        "rank": env.rank,
        "sum": value.item(),
        "pid": os.getpid(),
        "backend": backend,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "master": f"{env.master_addr}:{env.master_port}",
    }


def main() -> None:
    spark = (
        SparkSession.builder.master("local-cluster[2,1,1024]")
        .appName("launcher-local-cluster")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.executorEnv.PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        start = time.monotonic()
        results = run_distributed(allreduce, num_workers=2, spark=spark, timeout_s=120)
        run_s = time.monotonic() - start
        slots = barrier_slots(spark)
        start = time.monotonic()
        try:
            run_distributed(allreduce, num_workers=3, spark=spark)
            too_many = "no error"
        except ValueError as err:
            too_many = str(err)
        fail_s = time.monotonic() - start
    finally:
        spark.stop()
    json.dump(
        {
            "results": results,
            "run_s": run_s,
            "slots": slots.slots,
            "executors": slots.executors,
            "explain": slots.explain(),
            "too_many": too_many,
            "fail_s": fail_s,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
