"""ETL vs a plain Spark ``read.csv → write.parquet`` of the same files.

Each measurement runs in a fresh process (its own JVM), the two kinds alternating, so that
drift on a shared machine hits both alike; the figure is the median of per-pair ratios.
Only the job is timed (session start-up is excluded from both).

    python bench/etl.py [--rows 1000000,5000000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import environment, spark_session, write_section  # noqa: E402


def child(kind: str, raw: str, out: str) -> None:
    """Run one measurement in this (fresh) process and print its seconds as JSON."""
    from preprocessing.make_data import demo_etl_section, schema_ddl

    spark = spark_session("6g")
    started = time.perf_counter()
    phases: dict[str, float] = {}
    if kind == "plain":
        df = spark.read.schema(schema_ddl()).option("header", "true").csv(raw)
        df.write.mode("overwrite").parquet(out)
    else:
        from preprocessing.config import EtlConfig
        from preprocessing.etl import run_etl

        cfg = EtlConfig.from_mapping(demo_etl_section(raw, out))
        phases = run_etl(spark, cfg, force=True).timings_s
    seconds = time.perf_counter() - started
    spark.stop()
    print(json.dumps({"kind": kind, "seconds": seconds, "phases": phases}))


def _run_child(kind: str, raw: Path, out: Path) -> tuple[float, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--raw", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), result["phases"]


def _ensure_data(rows: int, work: Path) -> Path:
    raw = work / f"raw-{rows}"
    if not (raw / "_SUCCESS").exists():
        from preprocessing.make_data import make_data

        spark = spark_session("6g")
        t = time.perf_counter()
        make_data(spark, rows, str(raw), seed=0)
        print(f"make-data {rows} rows: {time.perf_counter() - t:.1f}s", flush=True)
        spark.stop()
    return raw


def main() -> None:
    """Run the benchmark and update bench/RESULTS.md."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1000000,5000000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=("etl", "plain"))
    ap.add_argument("--raw")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.raw, args.out)
        return
    work = HERE / "_work"
    rows_list = [int(r) for r in args.rows.split(",")]
    datasets = {rows: _ensure_data(rows, work) for rows in rows_list}
    table = [
        "| rows | plain read.csv→write.parquet (s, median) | ETL (s, median) | ETL / plain (median of pairs) |",
        "|---:|---:|---:|---:|",
    ]
    phase_rows = []
    for rows, raw in datasets.items():
        plain, etl, ratios = [], [], []
        phases: dict[str, list[float]] = {}
        for rep in range(args.reps):
            p, _ = _run_child("plain", raw, work / "plain-out")
            e, timings = _run_child("etl", raw, work / "etl-out")
            for name, sec in timings.items():
                phases.setdefault(name, []).append(sec)
            plain.append(p)
            etl.append(e)
            ratios.append(e / p)
            print(
                f"rows={rows} rep={rep}: plain {p:.1f}s etl {e:.1f}s ratio {e / p:.2f}", flush=True
            )
        table.append(
            f"| {rows:,} | {statistics.median(plain):.1f} | {statistics.median(etl):.1f} | "
            f"**{statistics.median(ratios):.2f}×** |"
        )
        phase_rows.append(
            f"| {rows:,} | "
            + " | ".join(f"{statistics.median(v):.1f}" for v in phases.values())
            + f" | {statistics.median(etl) - sum(statistics.median(v) for v in phases.values()):.1f} |"
        )
        phase_names = list(phases)
    body = "\n".join(
        [
            "ETL (`run_etl`, demo config: validation + quarantine, split, Spark ML features fitted on "
            "train, 8 balanced shards per split, manifest) vs plain `spark.read.csv(schema) → "
            "write.parquet` of the same `make-data` files; local[2], fresh process per run, "
            f"alternating, {args.reps} pairs. Target ≤ 1.5×.",
            "",
            *table,
            "",
            "ETL phases (s, median over the runs, as `run_etl` reports them; the rest is "
            "what no phase covers: checking the output directory, planning):",
            "",
            "| rows | " + " | ".join(phase_names) + " | rest |",
            "|---:|" + "---:|" * (len(phase_names) + 1),
            *phase_rows,
            "",
            environment(),
        ]
    )
    write_section("ETL", body)
    print("\n".join(table))


if __name__ == "__main__":
    main()
