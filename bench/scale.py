"""Scale: the driver's cost per rank at 2…32 ranks (ours vs TorchDistributor), and 100,000 shards.

    python bench/scale.py [--ranks 2,4,8,16,32] [--reps 2] [--shards 100000] [--no-write]

Launch part: one classic ``local[N]`` session per rank count and launcher (``spark.task.cpus=1``,
Python worker reuse on, the session stopped in between so only one launcher's processes
hold memory). Each rank runs :func:`allreduce`: ``init_process_group("gloo")`` and one
``all_reduce`` of a scalar (no model: the launcher's cost is what is measured). Per launcher
and N: one warm-up run (its driver-side Python allocations traced with ``tracemalloc``), then
``--reps`` timed runs. Figures, medians of the timed runs:

* launch s: the call's wall time; init s: the slowest rank's ``init_process_group``;
* rendezvous s (ours): from the first rank's arrival at the driver's rendezvous to the last
  answer (this is the wait for the slowest task to start);
* driver CPU ms / rank: the driver Python process's CPU time over the call, per rank
  (``time.process_time``); JVM CPU ms / rank: the driver JVM's (``/proc/<pid>/stat``; in
  local mode it is the executor too: it schedules the tasks and feeds the Python workers);
* driver KiB / rank: peak traced Python allocations during the warm-up call, per rank;
  fds / threads: the most file descriptors and threads the driver process had open
  (sampled every 20 ms) minus those before the call.

Then the log channel under a flood (ours only): every rank logs as fast as it can for
``--flood-s`` seconds; the driver counts what reached its log. TorchDistributor has no log
channel of its kind (torchrun's output is streamed to the driver's stdout): n/a.

A TorchDistributor run needs three processes per rank (the barrier task's Python worker,
``torchrun`` and its child, counted at 0.3 GiB each: at 32 ranks the two-process estimate,
21 GiB, fit the 23 GiB available and the kernel then killed the driver JVM): a rank count
whose estimate exceeds the memory available is skipped and says so.

Data part: a synthetic shard set of ``--shards`` train shards, each a hard link to one tiny
Parquet file (10 rows), so every file exists with the manifest's size and row count and the
whole set costs a few MB of disk. Timed: writing and opening the manifest
(:meth:`ShardSet.open`), ``check_split_rows``, a :class:`ShardReader`'s construction and one
epoch's plan for the last of 512 ranks (it walks the whole shard order), and the driver's
preflight of the split with ``verify=size`` (:func:`pipeline.train.preflight._check_split`:
paths, sizes, Parquet footers), with traced peak memory, at a tenth of the shards too to
show the growth is linear.

Prints the tables and rewrites the ``## Scale`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.chdir(REPO)  # Python workers start here and import `pipeline` as the tests do

from bench._common import environment, write_section  # noqa: E402

SECTION = "Scale"
RD, TD = "run_distributed", "TorchDistributor"
TORCH_PROCESS_GIB = 0.3
"""Private memory of one Python process that imported torch (measured: RssAnon ~287 MiB)."""


# -- what the ranks run ----------------------------------------------------------------------


def allreduce() -> tuple[float, float]:
    """``init_process_group`` and one gloo all_reduce; returns (sum, seconds to init)."""
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    dist.init_process_group("gloo", init_method="env://")
    init_s = time.perf_counter() - start
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()
    return value.item(), init_s


def flood(seconds: float) -> tuple[int, float, float]:
    """Log as fast as possible for ``seconds``: (messages, seconds, longest single call)."""
    logger = logging.getLogger("bench.flood")
    sent, worst, start = 0, 0.0, time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        logger.info("flood %d: %s", sent, "x" * 60)
        worst = max(worst, time.perf_counter() - now)
        sent += 1
    return sent, time.perf_counter() - start, worst


# -- driver-side probes ------------------------------------------------------------------------


class _Counter(logging.Handler):
    """Counts (and formats, as a real handler would) the ranks' records the driver logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count, self.first, self.last = 0, 0.0, 0.0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "flood " in text:
            now = time.perf_counter()
            self.first = self.first or now
            self.last, self.count = now, self.count + 1


class _Sampler:
    """The driver process's most open fds and threads while a call runs (every 20 ms)."""

    def __init__(self) -> None:
        self.base_fds, self.base_threads = _fds(), threading.active_count()
        self.fds, self.threads = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.fds = max(self.fds, _fds() - self.base_fds)
            self.threads = max(self.threads, threading.active_count() - self.base_threads - 1)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _jvm_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _rendezvous_times() -> Iterator[list[float]]:
    """Record (first arrival, last answer) of the launcher's driver-side rendezvous."""
    from pipeline.launch.rendezvous import Rendezvous

    times: list[float] = []
    original = Rendezvous.join

    def join(self: Any, rank: int, part: str) -> Any:
        times.append(time.perf_counter())
        out = original(self, rank, part)
        times.append(time.perf_counter())
        return out

    Rendezvous.join = join  # type: ignore[method-assign]
    try:
        yield times
    finally:
        Rendezvous.join = original  # type: ignore[method-assign]


def _session(n: int) -> Any:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{n}]")
        .appName(f"bench-scale-{n}")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.python.worker.reuse", "true")
        .config("spark.task.cpus", "1")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _measure(call: Callable[[], list[tuple[float, float]]], jvm: int, n: int) -> dict[str, float]:
    with _rendezvous_times() as rdv, _Sampler() as sampler:
        cpu0, jvm0, start = time.process_time(), _jvm_cpu_s(jvm), time.perf_counter()
        out = call()
        wall = time.perf_counter() - start
        cpu, jvm_cpu = time.process_time() - cpu0, _jvm_cpu_s(jvm) - jvm0
    expected = n * (n + 1) / 2
    assert all(value == expected for value, _ in out), out
    return {
        "launch": wall,
        "init": max(init for _, init in out),
        "rendezvous": (max(rdv) - min(rdv)) if rdv else float("nan"),
        "cpu_ms": 1000 * cpu / n,
        "jvm_ms": 1000 * jvm_cpu / n,
        "fds": sampler.fds,
        "threads": sampler.threads,
    }


def _launcher_runs(name: str, n: int, reps: int) -> dict[str, Any]:
    """Warm-up (traced) and ``reps`` timed runs of one launcher at ``n`` ranks."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from pipeline.launch.launcher import run_distributed

    spark = _session(n)
    jvm = int(spark.sparkContext._jvm.ProcessHandle.current().pid())
    try:
        if name == RD:

            def call() -> list[tuple[float, float]]:
                return run_distributed(allreduce, num_workers=n, spark=spark)

        else:
            distributor = TorchDistributor(num_processes=n, local_mode=False, use_gpu=False)

            def call() -> list[tuple[float, float]]:
                return [distributor.run(allreduce)]  # rank 0's value only

        tracemalloc.start()
        warm = _measure(call, jvm, n)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{name} n={n} warm-up: {warm['launch']:.2f} s", flush=True)
        runs = []
        for rep in range(reps):
            runs.append(_measure(call, jvm, n))
            print(f"{name} n={n} rep {rep}: {runs[-1]['launch']:.2f} s", flush=True)
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row["fds"] = max(max(r["fds"] for r in runs), warm["fds"])
        row["threads"] = max(max(r["threads"] for r in runs), warm["threads"])
        row["kib"] = peak / 1024 / n
        row["warm_launch"] = warm["launch"]
        if name == RD:
            row.update(_flood(spark, n))
        return row
    finally:
        spark.stop()


def _flood(spark: Any, n: int, seconds: float = 2.0) -> dict[str, float]:
    from pipeline.launch.launcher import run_distributed

    counter = _Counter()
    logging.getLogger("pipeline.launch.launcher").addHandler(counter)
    try:
        start = time.perf_counter()
        out = run_distributed(flood, seconds, num_workers=n, spark=spark)
        wall = time.perf_counter() - start
    finally:
        logging.getLogger("pipeline.launch.launcher").removeHandler(counter)
    sent = sum(s for s, _, _ in out)
    span = max(counter.last - counter.first, 1e-9)
    return {
        "flood_sent": sent,
        "flood_got": counter.count,
        "flood_rate": counter.count / span,
        "flood_rank_rate": sent / max(t for _, t, _ in out),
        "flood_worst_ms": 1000 * max(w for _, _, w in out),
        "flood_wall": wall,
    }


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def launch_table(ranks: list[int], reps: int) -> dict[int, dict[str, Any]]:
    launcher_log = logging.getLogger("pipeline.launch.launcher")
    launcher_log.setLevel(logging.INFO)  # the ranks' records are formatted, as in a real run
    launcher_log.propagate = False
    launcher_log.addHandler(logging.NullHandler())
    results: dict[int, dict[str, Any]] = {}
    for n in ranks:
        results[n] = {}
        for name, processes in ((RD, n), (TD, 3 * n)):  # TD: task worker, torchrun, child
            need, have = processes * TORCH_PROCESS_GIB + 1.5, _available_gib()
            if need > have:
                results[n][name] = {"skipped": f"needs ~{need:.0f} GiB, {have:.0f} GiB available"}
                print(f"{name} n={n}: skipped ({results[n][name]['skipped']})", flush=True)
                continue
            results[n][name] = _launcher_runs(name, n, reps)
    return results


# -- data side ----------------------------------------------------------------------------------

_LINKS = 50_000
"""Hard links per copy of the tiny shard file (ext4 allows 65,000 per file)."""


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak traced MiB, result) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return elapsed, peak, out


def data_figures(shards: int, work: Path) -> dict[str, tuple[float, float]]:
    """Seconds and peak MiB of each driver-side step on a ``shards``-shard set under ``work``."""
    from pipeline.data.reader import ShardReader
    from pipeline.data.shardset import ShardSet
    from pipeline.train import preflight
    from tests.shards import make_shardset

    root = work / f"set-{shards}"
    make_shardset(root, rows_per_shard={"train": [10], "val": [10]}, dim=4)
    doc = json.loads((root / "manifest.json").read_text())
    (one,) = doc["splits"]["train"]["shards"]
    for i in range(shards):
        if i % _LINKS == 0:  # a file system caps the links of one file (ext4: 65,000)
            source = root / f"train/source-{i // _LINKS}.parquet"
            shutil.copyfile(root / one["path"], source)
        os.link(source, root / f"train/p-{i:06d}.parquet")
    entries = [{**one, "path": f"train/p-{i:06d}.parquet"} for i in range(shards)]
    doc["splits"]["train"] = {"rows": 10 * shards, "shards": entries}
    out: dict[str, tuple[float, float]] = {}
    t, m, _ = _timed(lambda: (root / "manifest.json").write_text(json.dumps(doc)))
    out["write manifest.json"] = (t, m)
    t, m, shardset = _timed(lambda: ShardSet.open(str(root)))
    out["ShardSet.open (read, parse, type)"] = (t, m)
    t, m, _ = _timed(lambda: shardset.check_split_rows("train"))
    out["check_split_rows"] = (t, m)

    def plan() -> Any:
        reader = ShardReader(shardset, "train", rank=511, world_size=512, batch_size=8)
        return reader._rank_ranges(0)

    t, m, _ = _timed(plan)
    out["ShardReader plan (rank 511 of 512, one epoch)"] = (t, m)
    split = shardset.split("train")
    t, m, _ = _timed(lambda: shardset.verify_shards(split.shards, mode="size"))
    out["verify_shards(size)"] = (t, m)
    t, m, _ = _timed(lambda: preflight._check_split(shardset, split, "size"))
    out["preflight _check_split(verify=size)"] = (t, m)
    return out


def data_table(shards: int) -> dict[int, dict[str, tuple[float, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
        return {n: data_figures(n, Path(work)) for n in (shards // 10, shards)}


# -- report ---------------------------------------------------------------------------------------


def _launch_rows(results: dict[int, dict[str, Any]]) -> list[str]:
    rows = [
        "| ranks | launcher | launch s (warm-up) | init s | rendezvous s | driver CPU ms/rank "
        "| JVM CPU ms/rank | driver KiB/rank | +fds | +threads | ratio launch |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, by in results.items():
        ours = by.get(RD, {})
        for name, r in by.items():
            if "skipped" in r:
                rows.append(f"| {n} | {name} | skipped: {r['skipped']} | | | | | | | | |")
                continue
            ratio = (
                f"{ours['launch'] / r['launch']:.3f}×" if name == TD and "launch" in ours else ""
            )
            rdv = f"{r['rendezvous']:.2f}" if name == RD else "n/a"
            rows.append(
                f"| {n} | {name} | {r['launch']:.2f} ({r['warm_launch']:.1f}) | {r['init']:.2f} "
                f"| {rdv} | {r['cpu_ms']:.1f} | {r['jvm_ms']:.0f} | {r['kib']:.0f} "
                f"| {r['fds']} | {r['threads']} | {ratio} |"
            )
    return rows


def _flood_rows(results: dict[int, dict[str, Any]]) -> list[str]:
    rows = [
        "| ranks | sent by ranks | reached driver log | driver msg/s | ranks' msg/s "
        "| slowest log call ms | dropped |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, by in results.items():
        r = by.get(RD, {})
        if "flood_sent" not in r:
            continue
        rows.append(
            f"| {n} | {r['flood_sent']:.0f} | {r['flood_got']:.0f} | {r['flood_rate']:.0f} "
            f"| {r['flood_rank_rate']:.0f} | {r['flood_worst_ms']:.1f} "
            f"| {r['flood_sent'] - r['flood_got']:.0f} |"
        )
    return rows


def _data_rows(data: dict[int, dict[str, tuple[float, float]]]) -> list[str]:
    counts = list(data)
    rows = [
        "| step | " + " | ".join(f"{n:,} shards: s / peak MiB" for n in counts) + " | µs/shard |",
        "| --- | " + " | ".join("---:" for _ in counts) + " | ---: |",
    ]
    big = counts[-1]
    for step in data[big]:
        cells = " | ".join(f"{data[n][step][0]:.3f} / {data[n][step][1]:.1f}" for n in counts)
        rows.append(f"| {step} | {cells} | {1e6 * data[big][step][0] / big:.1f} |")
    return rows


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2,4,8,16,32")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r]
    start, load_before = time.perf_counter(), _loadavg()
    launch = launch_table(ranks, args.reps) if ranks else {}
    print("\n".join([*_launch_rows(launch), "", *_flood_rows(launch)]), flush=True)
    data = data_table(args.shards)
    took = time.perf_counter() - start
    body = "\n".join(
        [
            f"`python bench/scale.py --ranks {args.ranks} --reps {args.reps} --shards "
            f"{args.shards}` ({took / 60:.1f} min). One classic `local[N]` session per rank "
            "count and launcher (spark.task.cpus=1), each rank one gloo `init_process_group` "
            f"+ all_reduce; medians of {args.reps} runs after a warm-up (its wall time in "
            "brackets; it starts the N Python workers, which import torch). Ratio: "
            "run_distributed / TorchDistributor launch time at the same N.",
            "",
            *_launch_rows(launch),
            "",
            "Log channel under a flood (run_distributed): every rank logs for 2 s as fast as "
            "it can; the driver counts what reached its log.",
            "",
            *_flood_rows(launch),
            "",
            "Driver-side data costs, a synthetic shard set whose shards are hard links to copies of one "
            "10-row Parquet file (peak MiB: traced Python allocations):",
            "",
            *_data_rows(data),
            "",
            f"{environment()} Load average at the start: {load_before}; at the end: {_loadavg()}.",
        ]
    )
    print(f"## {SECTION}\n\n{body}")
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
