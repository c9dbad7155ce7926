"""ETL vs the Spark ML job a user would write by hand, and vs a bare ``read.csv → write.parquet``.

Three kinds, each run in a fresh process (its own JVM), alternating in every round so that
drift on a shared machine hits all alike; ratios are medians of per-round ratios. Only the
job is timed (session start-up excluded):

* ``plain``: ``read.csv(schema) → write.parquet``, the floor;
* ``handwritten``: what a user writes without us (:func:`handwritten`): ``read.csv`` with the
  schema, drop rows without key or label, ``randomSplit``, a Spark ML ``Pipeline``
  (``Imputer`` median, ``StringIndexer``, ``OneHotEncoder``, ``VectorAssembler``,
  ``StandardScaler``) fitted on train, ``vector_to_array``, ``repartition``,
  ``write.parquet`` per split, the ``PipelineModel`` saved — no validation, no quarantine,
  no balance, no manifest;
* ``etl``: ``run_etl`` with the demo config.

    python bench/etl.py [--rows 1000000,5000000] [--reps 3 | --reps 3,1]
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
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import environment, spark_session, write_section  # noqa: E402

KINDS = ("plain", "handwritten", "etl")


def child(kind: str, raw: str, out: str) -> None:
    """Run one measurement in this (fresh) process and print its seconds as JSON."""
    from preprocessing.make_data import demo_etl_section, schema_ddl

    spark = spark_session("6g")
    started = time.perf_counter()
    phases: dict[str, float] = {}
    if kind == "plain":
        df = spark.read.schema(schema_ddl()).option("header", "true").csv(raw)
        df.write.mode("overwrite").parquet(out)
    elif kind == "handwritten":
        handwritten(spark, raw, out)
    else:
        from preprocessing.config import EtlConfig
        from preprocessing.etl import run_etl

        cfg = EtlConfig.from_mapping(demo_etl_section(raw, out))
        phases = run_etl(spark, cfg, force=True).timings_s
    seconds = time.perf_counter() - started
    spark.stop()
    print(json.dumps({"kind": kind, "seconds": seconds, "phases": phases}))


def handwritten(spark: Any, raw: str, out: str) -> None:
    """The Spark ML job a user would write instead of ``run_etl`` (same features, same split
    fractions and seed, 8 files per split)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import (
        Imputer,
        OneHotEncoder,
        StandardScaler,
        StringIndexer,
        VectorAssembler,
    )
    from pyspark.ml.functions import vector_to_array

    from preprocessing.make_data import CATEGORICAL, NUMERIC, demo_etl_section, schema_ddl

    section = demo_etl_section(raw, out)
    onehot = section["onehot"]
    df = spark.read.schema(schema_ddl()).option("header", "true").csv(raw)
    df = df.na.drop(subset=["id", "label"])
    train, val, test = df.randomSplit([0.8, 0.1, 0.1], seed=7)
    imputed = [f"{c}_imp" for c in NUMERIC]
    indexed = [f"{c}_idx" for c in CATEGORICAL]
    stages = [
        Imputer(strategy="median", inputCols=NUMERIC, outputCols=imputed),
        StringIndexer(inputCols=CATEGORICAL, outputCols=indexed, handleInvalid="keep"),
        OneHotEncoder(
            inputCols=[f"{c}_idx" for c in onehot],
            outputCols=[f"{c}_oh" for c in onehot],
            handleInvalid="keep",
        ),
        VectorAssembler(
            inputCols=[
                *imputed,
                *(f"{c}_idx" for c in CATEGORICAL if c not in onehot),
                *(f"{c}_oh" for c in onehot),
            ],
            outputCol="assembled",
        ),
        StandardScaler(inputCol="assembled", outputCol="scaled", withMean=True, withStd=True),
    ]
    model = Pipeline(stages=stages).fit(train)
    for name, part in (("train", train), ("val", val), ("test", test)):
        rows = model.transform(part).select(
            "id", vector_to_array("scaled").alias("features"), "label"
        )
        rows.repartition(8).write.mode("overwrite").parquet(f"{out}/{name}")
    model.write().overwrite().save(f"{out}/pipeline-model")


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
    ap.add_argument("--reps", default="3", help="rounds, one value or one per --rows size")
    ap.add_argument("--child", choices=KINDS)
    ap.add_argument("--raw")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.raw, args.out)
        return
    work = HERE / "_work"
    rows_list = [int(r) for r in args.rows.split(",")]
    reps_list = [int(r) for r in args.reps.split(",")]
    reps = dict(
        zip(
            rows_list, reps_list * len(rows_list) if len(reps_list) == 1 else reps_list, strict=True
        )
    )
    datasets = {rows: _ensure_data(rows, work) for rows in rows_list}
    table = [
        "| rows | plain (s) | hand-written Spark ML (s) | ETL (s) | ETL / hand-written | "
        "ETL / plain | ETL rows/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    phase_rows, phase_names = [], []
    for rows, raw in datasets.items():
        secs: dict[str, list[float]] = {k: [] for k in KINDS}
        ratios: dict[str, list[float]] = {"handwritten": [], "plain": []}
        phases: dict[str, list[float]] = {}
        for rep in range(reps[rows]):
            order = KINDS if rep % 2 == 0 else KINDS[::-1]
            got = {}
            for kind in order:
                got[kind], timings = _run_child(kind, raw, work / f"{kind}-out")
                for name, sec in timings.items():
                    phases.setdefault(name, []).append(sec)
                secs[kind].append(got[kind])
            for base in ratios:
                ratios[base].append(got["etl"] / got[base])
            print(f"rows={rows} rep={rep}: " + ", ".join(f"{k} {v:.1f}s" for k, v in got.items()),
                  flush=True)  # fmt: skip
        med = {k: statistics.median(v) for k, v in secs.items()}
        table.append(
            f"| {rows:,} | {med['plain']:.1f} | {med['handwritten']:.1f} | {med['etl']:.1f} | "
            f"**{statistics.median(ratios['handwritten']):.2f}×** | "
            f"{statistics.median(ratios['plain']):.2f}× | {rows / med['etl']:,.0f} |"
        )
        phase_med = {name: statistics.median(v) for name, v in phases.items()}
        phase_rows.append(
            f"| {rows:,} | "
            + " | ".join(f"{v:.1f}" for v in phase_med.values())
            + f" | {med['etl'] - sum(phase_med.values()):.1f} |"
        )
        phase_names = list(phases)
    body = "\n".join(
        [
            "ETL (`run_etl`, demo config: validation + quarantine, split, features fitted on "
            "train and saved as a Spark ML `PipelineModel`, 8 balanced shards per split, "
            "manifest) vs the hand-written Spark ML "
            "job (`bench/etl.py: handwritten`: read.csv with the schema, drop rows without key "
            "or label, randomSplit, Pipeline of Imputer median / StringIndexer / OneHotEncoder / "
            "VectorAssembler / StandardScaler fitted on train, vector_to_array, repartition(8), "
            "write.parquet per split, PipelineModel saved) and vs a bare `read.csv(schema) → "
            "write.parquet`, on the same `make-data` files; local[2], a fresh process per run, "
            "the three alternating, rounds per size: "
            + ", ".join(f"{n:,} rows {r}" for n, r in reps.items())
            + "; ratios the median of per-round ratios. "
            "Targets: ETL / hand-written ≤ 1.0×, ETL / bare copy toward ≤ 3×.",
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
