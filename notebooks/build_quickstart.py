"""Write ``quickstart.ipynb`` from the cells below and execute it to store its outputs.

    .venv/bin/python notebooks/build_quickstart.py            # rebuild and execute
    .venv/bin/python notebooks/build_quickstart.py --no-run   # rebuild without outputs

The notebook is generated so that its source stays reviewable as plain Python here; the
test suite executes the committed ``.ipynb`` (tests/integration/test_notebook.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "quickstart.ipynb"
TIMEOUT_S = 600

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# spark-train quick start

The whole pipeline on a local Spark session, small enough to run in a few minutes on a
laptop: generate a dirty raw table, validate and featurize it into balanced shards, look at
what came out, train the same model with **DDP** (barrier mode, gradients all-reduced every
step) and with **model averaging** (one ordinary Spark job per round), and score a sample
with the saved featurization.

Everything is written under `out/quickstart/` next to this notebook (or under
`$QUICKSTART_WORK`).""",
    ),
    (
        "code",
        """%matplotlib inline
import json
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

# The repository root, so that `pipeline`, `preprocessing` and `jobs` import without installing.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
sys.path.insert(0, str(REPO))
WORK = Path(os.environ.get("QUICKSTART_WORK", "out/quickstart")).resolve()
WORK.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this kernel's Python

spark = (
    SparkSession.builder.master("local[2]")
    .appName("spark-train-quickstart")
    .config("spark.ui.enabled", "false")
    .config("spark.ui.showConsoleProgress", "false")
    .config("spark.sql.shuffle.partitions", "4")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("ERROR")
print("Spark", spark.version)""",
    ),
    (
        "markdown",
        """## 1. A raw table

`make_data` writes a seeded CSV: 20 numeric and 5 categorical columns, a non-linear binary
label, and about 1 % dirty rows of ten kinds (text in numbers, missing labels, broken
lines...).""",
    ),
    (
        "code",
        """from preprocessing.make_data import make_data

RAW = str(WORK / "raw")
make_data(spark, 20_000, RAW, seed=0)
print(open(next(Path(RAW).glob("part-*"))).read().splitlines()[:3])""",
    ),
    (
        "markdown",
        """## 2. ETL: validate, split, featurize, write balanced shards

Bad rows are not dropped: each goes to the quarantine with a reason. The split is a hash
of the key; the Spark ML featurization is fitted on the train split only.""",
    ),
    (
        "code",
        """from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from preprocessing.make_data import demo_etl_section

SHARDS = str(WORK / "shards")
etl_cfg = EtlConfig.from_mapping({**demo_etl_section(RAW, SHARDS), "num_shards": 4})
etl = run_etl(spark, etl_cfg, force=True)
print(etl.summary())""",
    ),
    (
        "markdown",
        """## 3. A look at the shards

`inspect` is the same as `spark-train inspect out/quickstart/shards` on the command line.""",
    ),
    (
        "code",
        """from pipeline.serve.inspect import describe, render

print(render(describe(SHARDS)))""",
    ),
    (
        "code",
        """manifest = json.loads((Path(SHARDS) / "manifest.json").read_text())
names = manifest["feature_names"]
paths = [str(Path(SHARDS) / s["path"]) for s in manifest["splits"]["train"]["shards"]]
train = pq.read_table(paths)
features = np.frombuffer(train.column("features").combine_chunks().buffers()[1], np.float32)
features = features.reshape(len(train), -1)

fig, axes = plt.subplots(1, 4, figsize=(14, 2.6))
for ax, i in zip(axes, [0, 1, 2, 20], strict=True):
    ax.hist(features[:, i], bins=40)
    ax.set_title(names[i])
fig.suptitle("standardized train features")
fig.tight_layout()
plt.show()

reasons = manifest["quarantine"]["by_reason"]
print("quarantined:", manifest["quarantine"]["rows"], "of", manifest["reconciliation"]["rows_in"])
spark.read.parquet(str(Path(SHARDS) / manifest["quarantine"]["path"])).groupBy(
    "reason", "reason_column"
).count().orderBy("count", ascending=False).show(truncate=False)""",
    ),
    (
        "markdown",
        """## 4. Training: DDP

Two ranks in one Spark barrier stage (CPU + gloo here; one GPU each with NCCL on a GPU
cluster), checkpoints every 100 steps, the model bundle written at the end.""",
    ),
    (
        "code",
        """from pipeline.launch.fit import fit
from pipeline.train.config import TrainConfig

base = {
    "dataset": SHARDS,
    "model": {"args": {"hidden": [64, 32]}},
    "num_workers": 2,
    "batch_size": 256,
    "optimizer": {"lr": 0.003},
    "max_attempts": 1,
}
ddp_cfg = TrainConfig.from_mapping(
    {
        **base,
        "epochs": 6,
        "checkpoint": {"dir": str(WORK / "ckpt-ddp"), "every_steps": 100},
        "output": str(WORK / "model-ddp"),
    }
)
ddp = fit(ddp_cfg, spark, show_progress=False)
for e in ddp.epochs:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()})""",
    ),
    (
        "markdown",
        """## 5. Training: model averaging

The same model, config and bundle format with `mode: average`: each round is one ordinary
Spark job in which every worker trains one local epoch on its own slice from the current
global weights; the driver averages the returned weights (weighted by samples). One
synchronization per round instead of one all-reduce per step.""",
    ),
    (
        "code",
        """avg_cfg = TrainConfig.from_mapping(
    {
        **base,
        "mode": "average",
        "epochs": 1,
        "averaging": {"rounds": 6, "local_epochs": 1},
        "checkpoint": {"dir": str(WORK / "ckpt-avg")},
        "output": str(WORK / "model-avg"),
    }
)
avg = fit(avg_cfg, spark, show_progress=False)
for r in avg.rounds:
    moved_kb = (r["bytes_sent"] + r["bytes_received"]) / 1e3
    print(r["round"], round(r["val_loss"], 4), round(r["val_accuracy"], 4), f"{moved_kb:.0f} kB")
print(f"synchronizations: DDP {ddp.steps} all-reduces, averaging {len(avg.rounds)} rounds")""",
    ),
    (
        "code",
        """fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.2))
for name, records in (("DDP (per epoch)", ddp.epochs), ("averaging (per round)", avg.rounds)):
    x = range(1, len(records) + 1)
    loss_ax.plot(x, [r["val_loss"] for r in records], marker="o", label=name)
    acc_ax.plot(x, [r["val_accuracy"] for r in records], marker="o", label=name)
loss_ax.set(title="validation loss", xlabel="epoch / round")
acc_ax.set(title="validation accuracy", xlabel="epoch / round")
acc_ax.legend()
fig.tight_layout()
plt.show()""",
    ),
    (
        "markdown",
        """## 6. Scoring

`pipeline.serve.score` applies the bundle's saved Spark ML featurization (the one fitted by the
ETL, so no training/serving skew) and the network, batch by batch in `mapInArrow`. Rows
the ETL would quarantine get a null prediction and a reason instead of failing the job.
The same runs as `spark-train score --model ... --input ... --output ...`.""",
    ),
    (
        "code",
        """from pipeline import score

raw = spark.read.option("header", True).csv(RAW).limit(2000)
scored = score(spark, raw, str(WORK / "model-ddp"))
scored.select("id", "label", "prediction", "probability", "score_error").show(8, truncate=False)
scored.groupBy("score_error").count().show()""",
    ),
    ("code", "spark.stop()"),
]


def build(cells: list[tuple[str, str]] = CELLS) -> nbformat.NotebookNode:
    """The notebook with ``cells`` (default: the ones above) and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(source))
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell in ``cwd`` with this interpreter's kernel; raises on a failing cell."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def main() -> int:
    """Rebuild ``quickstart.ipynb`` (executed unless ``--no-run``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write it without outputs")
    args = parser.parse_args()
    nb = build()
    if not args.no_run:
        execute(nb, HERE)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
