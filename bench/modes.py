"""DDP vs map-reduce model averaging (``train.mode: average``), side by side in one session.

    python bench/modes.py [--rows 100000] [--sets etl,digits,breast_cancer] [--no-write]

For each data set the same ``train`` config runs once as DDP and then as averaging with
several round / local-epoch settings (only ``train.mode`` and ``train.averaging`` change),
all on one ``local[2]`` session with 2 workers. Data sets:

* ``etl``: ``make_data`` rows through the real ETL (``run_etl`` with the demo's etl
  section: validation, split, one-hot, scaling, 8 shards); the demo's MLP and optimizer.
* ``digits`` and ``breast_cancer``: the tables scikit-learn ships (no download), split
  60/20/20 with a fixed seed, standardized on the train split, written as a shard set.

Reported per run: the val and test accuracy of the bundle (``evaluate_bundle`` on the
whole split, the same pass for both modes), the number of
synchronizations (DDP: optimizer steps, each an all-reduce; averaging: rounds), bytes
communicated, and the wall time of ``fit``. DDP bytes are computed, not measured: a ring
all-reduce of the float32 gradients sends ``2 (W - 1) / W`` times their size per rank
and step. Averaging bytes are measured: the broadcast payload times the workers plus
the workers' serialized results. ``python bench/modes.py`` rewrites the ``## Modes``
section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

from bench._common import environment, write_section  # noqa: E402
from tests.shards import shard_entry, write_manifest  # noqa: E402

WORK = HERE / "_work" / "modes"
WORKERS = 2
SECTION = "Modes"

# (label, train.averaging) for every data set; DDP is the baseline run with the same config.
SETTINGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "etl": [
        ("4 rounds x 1 local epoch", {"rounds": 4, "local_epochs": 1}),
        ("4 x 1, optimizer_state: local", {"rounds": 4, "optimizer_state": "local"}),
        ("4 x 1, optimizer_state: average", {"rounds": 4, "optimizer_state": "average"}),
        ("16 rounds x 20 local steps, average", {"rounds": 16, "local_steps": 20, "optimizer_state": "average"}),
        ("2 rounds x 2 local epochs, average", {"rounds": 2, "local_epochs": 2, "optimizer_state": "average"}),
    ],
    "digits": [
        ("20 rounds x 1 local epoch", {"rounds": 20, "local_epochs": 1}),
        ("10 rounds x 2 local epochs", {"rounds": 10, "local_epochs": 2}),
        ("5 rounds x 4 local epochs", {"rounds": 5, "local_epochs": 4}),
        ("10 x 2, optimizer_state: local", {"rounds": 10, "local_epochs": 2, "optimizer_state": "local"}),
        ("10 x 2, optimizer_state: average", {"rounds": 10, "local_epochs": 2, "optimizer_state": "average"}),
    ],
    "breast_cancer": [
        ("20 rounds x 1 local epoch", {"rounds": 20, "local_epochs": 1}),
        ("10 rounds x 2 local epochs", {"rounds": 10, "local_epochs": 2}),
        ("5 rounds x 4 local epochs", {"rounds": 5, "local_epochs": 4}),
        ("10 x 2, optimizer_state: local", {"rounds": 10, "local_epochs": 2, "optimizer_state": "local"}),
    ],
}  # fmt: skip

# The train config of each data set (epochs: DDP's; averaging covers the same data passes).
TRAIN: dict[str, dict[str, Any]] = {
    "etl": {
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [128, 64]}},
        "epochs": 4,
        "batch_size": 512,
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
        "lr_schedule": {"name": "cosine", "warmup_steps": 20},
        "grad_clip": 1.0,
    },
    "digits": {
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [128]}},
        "epochs": 20,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.002},
        "lr_schedule": {"name": "cosine", "warmup_steps": 10},
    },
    "breast_cancer": {
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [32]}},
        "epochs": 20,
        "batch_size": 16,
        "optimizer": {"name": "adamw", "lr": 0.002},
        "lr_schedule": {"name": "cosine", "warmup_steps": 10},
    },
}


# -- data ------------------------------------------------------------------------------------
def etl_shards(spark: Any, rows: int) -> str:
    """make_data rows → the real ETL; reused when the shard set already has that many rows."""
    from pipeline.config import parse_config
    from preprocessing.etl import run_etl
    from preprocessing.make_data import demo_etl_section, make_data

    root = WORK / f"etl-{rows}"
    raw, out = root / "raw", root / "shards"
    if not (out / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_data(spark, rows, str(raw), seed=0)
        cfg = parse_config({"etl": demo_etl_section(str(raw), str(out))}).etl
        run_etl(spark, cfg)
    return str(out)


def sklearn_shards(name: str) -> str:
    """A data set scikit-learn ships, written as a shard set (60/20/20, standardized)."""
    from sklearn import datasets

    root = WORK / name
    if (root / "manifest.json").exists():
        return str(root)
    shutil.rmtree(root, ignore_errors=True)
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = [int(len(y) * 0.6), int(len(y) * 0.8)]
    parts = dict(zip(("train", "val", "test"), np.split(order, cut), strict=True))
    mean, std = x[parts["train"]].mean(0), x[parts["train"]].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    splits: dict[str, list[dict[str, object]]] = {}
    for split, rows in parts.items():
        shards = np.array_split(rows, 4 if split == "train" else 1)
        splits[split] = [_write_shard(root, split, i, x, y, s) for i, s in enumerate(shards)]
    classes = sorted(int(c) for c in np.unique(y))
    write_manifest(root, splits, dim=x.shape[1], classes=classes, row_group_rows=1024)
    return str(root)


def _write_shard(
    root: Path, split: str, index: int, x: np.ndarray, y: np.ndarray, rows: np.ndarray
) -> dict[str, object]:
    rel = f"{split}/part-{index:05d}.parquet"
    (root / split).mkdir(parents=True, exist_ok=True)
    values = pa.array(x[rows].reshape(-1), pa.float32())
    table = pa.table(
        {
            "key": pa.array(rows.astype(np.int64)),
            "features": pa.FixedSizeListArray.from_arrays(values, x.shape[1]),
            "label": pa.array(y[rows]),
        }
    )
    pq.write_table(table, root / rel, row_group_size=1024)
    return shard_entry(root, rel, len(rows))


# -- runs ------------------------------------------------------------------------------------
def runs(
    spark: Any, name: str, dataset: str, mode: str, averaging: dict[str, Any], seeds: int
) -> dict[str, Any]:
    """``seeds`` fits (train.seed 0, 1, …): mean accuracies and wall time, their spread."""
    each = [run(spark, name, dataset, mode, averaging, seed) for seed in range(seeds)]
    out = dict(each[0])
    for key in ("val", "test", "wall"):
        values = [r[key] for r in each]
        out[key] = sum(values) / len(values)
        out[f"{key}_range"] = (min(values), max(values))
    return out


def run(
    spark: Any, name: str, dataset: str, mode: str, averaging: dict[str, Any], seed: int
) -> dict[str, Any]:
    """One fit; its figures."""
    from pipeline.launch.fit import fit
    from pipeline.serve.evaluate import evaluate_bundle
    from pipeline.train.config import TrainConfig

    slug = "-".join(f"{k}={v}" for k, v in sorted(averaging.items()))
    out = WORK / "runs" / name / f"{mode}-{slug}-seed={seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig.from_mapping(
        {
            **TRAIN[name],
            "dataset": dataset,
            "mode": mode,
            "seed": seed,
            "num_workers": WORKERS,
            "averaging": averaging,
            "checkpoint": {"dir": str(out / "ckpt"), "every_steps": 0, "keep": 1},
            "output": str(out / "model"),
            "verify": "size",
        }
    )
    started = time.perf_counter()
    result = fit(cfg, spark, show_progress=False)
    wall = time.perf_counter() - started
    val, test = (evaluate_bundle(cfg.output, split=s)["accuracy"] for s in ("val", "test"))
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    if mode == "ddp":
        param_bytes = _param_bytes(cfg.output)
        syncs = result.steps
        traffic = syncs * 2 * (WORKERS - 1) * param_bytes  # ring all-reduce, all ranks
    else:
        syncs = metrics["synchronizations"]
        traffic = metrics["bytes_sent"] + metrics["bytes_received"]
    return {
        "val": float(val),
        "test": float(test),
        "syncs": int(syncs),
        "bytes": int(traffic),
        "wall": wall,
        "steps": result.steps,
    }


def _param_bytes(bundle: str) -> int:
    from safetensors.torch import load_file

    return sum(
        t.numel() * t.element_size() for t in load_file(f"{bundle}/model.safetensors").values()
    )


def _warm_workers(spark: Any) -> None:
    """Import torch and the pipeline in both Python workers before anything is timed."""

    def load(_: Any) -> int:
        import pipeline.train.modes.average  # noqa: F401

        return 0

    spark.sparkContext.parallelize(range(WORKERS), WORKERS).map(load).collect()


# -- report ------------------------------------------------------------------------------------
def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _acc(r: dict[str, Any]) -> str:
    low, high = r["val_range"]
    return f"{r['val']:.4f}" + (f" ({low:.3f}–{high:.3f})" if high > low else "")


def table(name: str, ddp: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        "| mode | setting | syncs | fewer syncs | bytes | val acc (range) | Δ val (pts) "
        "| test acc | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| ddp | {TRAIN[name]['epochs']} epochs | {ddp['syncs']} | 1x | {_bytes(ddp['bytes'])} | "
        f"{_acc(ddp)} | – | {ddp['test']:.4f} | {ddp['wall']:.1f} |",
    ]
    for label, r in rows:
        lines.append(
            f"| average | {label} | {r['syncs']} | {ddp['syncs'] / r['syncs']:.0f}x | "
            f"{_bytes(r['bytes'])} | {_acc(r)} | {100 * (r['val'] - ddp['val']):+.1f} | "
            f"{r['test']:.4f} | {r['wall']:.1f} |"
        )
    return "\n".join(lines)


def verdict(ddp: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The target: within 1 point of DDP's val accuracy with >= 10x fewer synchronizations."""
    eligible = [(label, r) for label, r in rows if ddp["syncs"] >= 10 * r["syncs"]]
    if not eligible:
        return "no averaging setting had >= 10x fewer synchronizations"
    label, best = max(eligible, key=lambda item: item[1]["val"])
    gap = 100 * (best["val"] - ddp["val"])
    met = "met" if gap >= -1.0 else "NOT met"
    return (
        f"best setting with >= 10x fewer synchronizations: **{label}**, val accuracy "
        f"{best['val']:.4f} vs DDP {ddp['val']:.4f} ({gap:+.1f} points; target >= -1.0: {met}), "
        f"{ddp['syncs'] / best['syncs']:.0f}x fewer synchronizations, "
        f"{ddp['bytes'] / best['bytes']:.1f}x fewer bytes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="make_data rows for 'etl'")
    parser.add_argument("--sets", default="etl,digits,breast_cancer")
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs per setting on the scikit-learn sets"
    )
    parser.add_argument("--etl-seeds", type=int, default=1, help="runs per setting on 'etl'")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args()
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{WORKERS}]")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[1]
    sections = []
    try:
        _warm_workers(spark)
        for name in args.sets.split(","):
            dataset = etl_shards(spark, args.rows) if name == "etl" else sklearn_shards(name)
            seeds = args.etl_seeds if name == "etl" else args.seeds
            ddp = runs(spark, name, dataset, "ddp", {}, seeds)
            print(f"{name} ddp: {ddp}", flush=True)
            rows = []
            for label, averaging in SETTINGS[name]:
                rows.append((label, runs(spark, name, dataset, "average", averaging, seeds)))
                print(f"{name} {label}: {rows[-1][1]}", flush=True)
            sections.append((name, dataset, seeds, ddp, rows))
    finally:
        spark.stop()
    body = report(sections, args.rows, load_before)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


def report(sections: list[Any], rows: int, load_before: float) -> str:
    parts = [
        f"`python bench/modes.py --rows {rows}` — the same `train` config as DDP and as "
        f"model averaging (`train.mode: average`, only `train.averaging` varies), "
        f"{WORKERS} workers on one `local[{WORKERS}]` session. Accuracies and wall times are "
        "means over runs with `train.seed` 0, 1, … (the number is given per data set; the "
        "range of the val accuracy is shown). "
        "*syncs*: DDP optimizer steps (one gradient all-reduce each) or averaging rounds. "
        "*bytes*: DDP computed as steps × 2(W−1) × float32 parameter bytes (ring "
        "all-reduce, all ranks); averaging measured (broadcast × workers + the workers' "
        "results). *val acc* / *test acc*: the bundle on the whole split (`evaluate_bundle`, "
        "the same pass for both modes). *wall s*: `fit` start to return, Spark "
        "jobs, Python-worker imports and bundle writing included.",
    ]
    for name, dataset, seeds, ddp, results in sections:
        manifest = json.loads((Path(dataset) / "manifest.json").read_text())
        splits = {k: v["rows"] for k, v in manifest["splits"].items()}
        source = (
            f"make_data {rows:,} rows → run_etl (demo etl section)"
            if name == "etl"
            else f"scikit-learn load_{name}"
        )
        parts.append(
            f"### {name}\n\n{source}: {splits['train']:,} train / {splits['val']:,} val / "
            f"{splits['test']:,} test rows, {manifest['schema'][1]['shape'][0]} features, "
            f"{len(manifest['label']['classes'])} classes; config `{json.dumps(TRAIN[name])}`; "
            f"{seeds} run(s) per row.\n\n"
            f"{table(name, ddp, results)}\n\n{verdict(ddp, results)}."
        )
    parts.append(
        f"{environment()} 5-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[1]:.1f} after (the machine is shared: wall times are noisy)."
    )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
