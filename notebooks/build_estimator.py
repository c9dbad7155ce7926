"""Write ``estimator.ipynb`` from the cells below and execute it to store its outputs.

    .venv/bin/python notebooks/build_estimator.py            # rebuild and execute
    .venv/bin/python notebooks/build_estimator.py --no-run   # rebuild without outputs

Same machinery as ``build_quickstart.py``; tests/integration/test_notebook.py executes the
committed ``.ipynb``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from build_quickstart import build as build_cells
from build_quickstart import execute

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "estimator.ipynb"
TIMEOUT_S = 600

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# A DataFrame in, a model out: `TorchEstimator`

The notebook API of spark-train, with Spark ML's conventions: declare the columns, the
network and the training settings; `fit(df)` runs the whole pipeline (validation and
quarantine, the split, the Spark ML features, balanced shards, distributed training) and
returns a model; `model.transform(df)` scores a DataFrame; `model.write().save(path)` writes
an ordinary model bundle, which `TorchModel.load(path)` and `spark-train score` read.

Everything is written under `out/estimator/` next to this notebook (or under
`$ESTIMATOR_WORK`).""",
    ),
    (
        "code",
        """%matplotlib inline
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from pyspark.sql import SparkSession

# The repository root, so that `pipeline` and `preprocessing` import without installing.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
sys.path.insert(0, str(REPO))
WORK = Path(os.environ.get("ESTIMATOR_WORK", "out/estimator")).resolve()
WORK.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this kernel's Python

spark = (
    SparkSession.builder.master("local[2]")
    .appName("spark-train-estimator")
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
        """## 1. A DataFrame

Seeded synthetic customers: four numbers, a segment (categorical), an 8-value signal (an
array column) and a non-linear binary label, `churned`. A few rows are dirty on purpose:
some `x3` values are missing (imputed by the ETL) and some signals have the wrong length
(quarantined with a reason). 15 % of the rows are kept aside as "new" data to score.""",
    ),
    (
        "code",
        """rng = np.random.default_rng(7)
SEGMENTS = ["retail", "online", "wholesale"]
rows = []
for i in range(3000):
    x = rng.normal(size=4)
    signal = rng.normal(size=8).astype("float32")
    segment = SEGMENTS[int(rng.integers(3))]
    churn = x[0] * x[1] + np.sin(3 * x[2]) + 0.6 * signal[:4].sum() - (segment == "online")
    x3 = None if i % 97 == 0 else float(x[3])
    values = signal[:5] if i % 500 == 1 else signal  # wrong length: quarantined
    rows.append(
        (i, float(x[0]), float(x[1]), float(x[2]), x3, segment, values.tolist(), int(churn > 0))
    )
schema = (
    "id long, x0 double, x1 double, x2 double, x3 double, segment string, "
    "signal array<float>, churned int"
)
df = spark.createDataFrame(rows, schema)
train_df, new_df = df.randomSplit([0.85, 0.15], seed=3)
df.show(3, truncate=40)""",
    ),
    (
        "markdown",
        """## 2. Declare and fit

Column kinds are the ETL's (`numeric`, `categorical` with optional `onehot`, `arrays`,
`images`); their types come from the DataFrame. `etl` and `train` take the other keys of the
config sections, exactly as in a YAML file. A mistake (a column the DataFrame lacks, a
string column declared numeric, an unknown key) raises a `ConfigError` naming the key
before any Spark job runs. Shards, checkpoints and the bundle go under `work_dir`; the
shards are rebuilt on every fit.""",
    ),
    (
        "code",
        """from pipeline import TorchEstimator

estimator = TorchEstimator(
    label="churned",
    key="id",
    numeric=["x0", "x1", "x2", "x3"],
    categorical=["segment"],
    onehot=["segment"],
    arrays={"signal": {"shape": [8]}},
    etl={"num_shards": 2, "split": {"val": 0.15, "test": 0.0}},
    train={
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [64, 32]}},
        "num_workers": 2,
        "epochs": 8,
        "batch_size": 64,
        "optimizer": {"lr": 0.005},
    },
    work_dir=str(WORK / "work"),
)
model = estimator.fit(train_df)
print(model.etl_result.summary())
print("bundle:", model.bundle)""",
    ),
    (
        "markdown",
        """## 3. Training curves

`model.history` holds the per-epoch metrics (`pandas.DataFrame(model.history)` works
too).""",
    ),
    (
        "code",
        """epochs = [e["epoch"] + 1 for e in model.history]
fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
loss_ax.plot(epochs, [e["train_loss"] for e in model.history], marker="o", label="train")
loss_ax.plot(epochs, [e["val_loss"] for e in model.history], marker="o", label="validation")
loss_ax.set(title="loss", xlabel="epoch")
loss_ax.legend()
acc_ax.plot(epochs, [e["val_accuracy"] for e in model.history], marker="o", color="C2")
acc_ax.set(title="validation accuracy", xlabel="epoch")
fig.tight_layout()
plt.show()""",
    ),
    (
        "markdown",
        """## 4. Scoring new rows

`transform` adds `prediction`, `probability` (one entry per class, in `model.classes`
order), `score_error` and `score_error_column` to the DataFrame's own columns, with the
featurization fitted by the ETL. A row the ETL would quarantine gets a null prediction and
the reason.""",
    ),
    (
        "code",
        """scored = model.transform(new_df)
scored.select("id", "churned", "prediction", "probability", "score_error").show(5, truncate=False)
rows = scored.select("churned", "prediction", "probability").where("score_error IS NULL").collect()
truth = np.array([r.churned for r in rows])
predicted = np.array([r.prediction for r in rows])
p_churn = np.array([r.probability[model.classes.index(1)] for r in rows])
print(f"accuracy on {len(rows)} new rows: {(truth == predicted).mean():.3f}")

confusion = np.zeros((2, 2), dtype=int)
np.add.at(confusion, (truth, predicted), 1)
fig, (cm_ax, hist_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
cm_ax.imshow(confusion, cmap="Blues")
for (t, p), n in np.ndenumerate(confusion):
    color = "white" if n > len(rows) / 4 else "black"
    cm_ax.text(p, t, str(n), ha="center", va="center", color=color)
cm_ax.set(title="confusion matrix", xlabel="predicted", ylabel="true", xticks=[0, 1], yticks=[0, 1])
hist_ax.hist([p_churn[truth == 0], p_churn[truth == 1]], bins=20, label=["churned=0", "churned=1"])
hist_ax.set(title="P(churned) on new rows", xlabel="probability")
hist_ax.legend()
fig.tight_layout()
plt.show()""",
    ),
    (
        "markdown",
        """## 5. Save and load

The saved model is an ordinary bundle: `TorchModel.load` reads it back, and the command line
scores files with it (the bundle remembers a DataFrame input as a table, so name the
files' format): `spark-train score --model out/estimator/churn-model --input new.parquet
--format parquet --output scored/`.""",
    ),
    (
        "code",
        """from pipeline import TorchModel

model.write().overwrite().save(str(WORK / "churn-model"))
reloaded = TorchModel.load(str(WORK / "churn-model"))
before = scored.select("id", "prediction").orderBy("id").collect()
after = reloaded.transform(new_df).select("id", "prediction").orderBy("id").collect()
print("reloaded model gives the same predictions:", before == after)""",
    ),
    ("code", "spark.stop()"),
]


def build() -> nbformat.NotebookNode:
    """The notebook with the cells above and no outputs."""
    return build_cells(CELLS)


def drop_stderr(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove stderr streams (Spark's and the JVM's start-up lines) from the stored outputs."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
    return nb


def main() -> int:
    """Rebuild ``estimator.ipynb`` (executed unless ``--no-run``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write it without outputs")
    args = parser.parse_args()
    nb = build()
    if not args.no_run:
        drop_stderr(execute(nb, HERE))
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
