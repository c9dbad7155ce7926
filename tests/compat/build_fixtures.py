"""Rebuild the golden compatibility fixtures from earlier releases in git history.

For each release below, this checks the release out into a throwaway worktree
(``git worktree add --detach /tmp/rel-COMMIT COMMIT``) and runs *that release's* code (its
``jobs.cli`` with ``PYTHONPATH`` pointing at the worktree, this interpreter) to build, in a
scratch directory:

* ``raw/``: a small make-data table (the release's own generator; the configs read it), and
  ``sample.csv``: a few of its rows that the release scored;
* ``shards/``: the shard set of ``mlp.yaml``'s ETL (csv → Parquet shards + manifest);
* ``mlp/`` and ``cnn/``: bundles of the release's built-in ``mlp`` and ``cnn``, spelled as the
  release documented them (``pipeline.models:…`` before the restructuring);
* ``ckpt/``: the ``mlp`` run's latest checkpoint; ``run-summary.json``: its run summary;

then records, with the release's code, each bundle's evaluation on the test split and its
predictions on ``sample.csv`` in ``fixture.json``. The directories are copied to
``tests/compat/fixtures/COMMIT/``, where
``tests/compat/test_fixtures.py`` checks that today's code reproduces them.

Run from the repository root, with the Makefile's environment::

    make compat-fixtures [RELEASES="668cac7 2d5aabd"]

The worktrees are removed afterwards. Old code is never edited; it runs as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# commit -> (what it is, module of the built-in builders as that release documented it)
RELEASES: dict[str, tuple[str, str]] = {
    "668cac7": ("0.1.0 before the restructuring into subpackages", "pipeline.models"),
    "2d5aabd": ("0.1.0 after the restructuring, before tensor columns", "pipeline.train.models"),
    "cb86e62": ("0.1.0 main before format versioning and aliases", "pipeline.train.models"),
}
ROWS = 400
SAMPLE_ROWS = 6
RAW_COLUMNS = [f"f{i}" for i in range(20)] + [f"c{i}" for i in range(5)]


def config(builder: str, *, output: str, ckpt: str, args: dict[str, object]) -> str:
    """A config in the form the old README documented (old key spellings included)."""
    schema = {"id": "long", **dict.fromkeys(RAW_COLUMNS[:20], "double")}
    schema.update(dict.fromkeys(RAW_COLUMNS[20:], "string"))
    schema["label"] = "int"
    doc = {
        "spark": {
            "master": "local[2]",
            "app_name": "compat-fixture",
            "conf": {"spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"},
        },
        "etl": {
            "input": {"path": "raw", "format": "csv"},
            "schema": schema,
            "label": "label",
            "key": "id",
            "numeric": RAW_COLUMNS[:20],
            "categorical": RAW_COLUMNS[20:],
            "onehot": ["c0", "c3"],
            "classes": [0, 1],
            "missing": "impute",
            "split": {"val": 0.2, "test": 0.2, "seed": 7},
            "output": "shards",
            "num_shards": 2,
            "format": "parquet",
            "row_group_rows": 64,
        },
        "train": {
            "dataset": "shards",
            "task": "classification",
            "mode": "ddp",
            "model": {"builder": builder, "args": args},
            "num_workers": 1,
            "epochs": 2,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "lr_schedule": {"name": "constant"},
            "seed": 0,
            "timeout_s": 120,
            "max_attempts": 1,
            "checkpoint": {"dir": ckpt, "every_steps": 0, "keep": 1},
            "output": output,
        },
    }
    return json.dumps(doc, indent=2)  # JSON is YAML


RECORD = textwrap.dedent(
    """
    import glob, json, sys
    from pyspark.sql import SparkSession
    try:
        from pipeline.serve.evaluate import evaluate_bundle
    except ImportError:
        from pipeline.evaluate import evaluate_bundle
    from pipeline import score, __version__

    spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    out = {"spark_train_version": __version__, "evaluate": {}, "predictions": {}}
    for name in ("mlp", "cnn"):
        for split in ("val", "test"):
            r = evaluate_bundle(name, "shards", split)
            r.pop("seconds", None)
            out["evaluate"].setdefault(name, {})[split] = r
    raw = spark.read.csv("raw", header=True)
    candidates = raw.orderBy("id").limit(40)
    scored = score(spark, candidates, "mlp").where("prediction is not null")
    ids = [r["id"] for r in scored.orderBy("id").select("id").limit(int(sys.argv[1])).collect()]
    sample = candidates.where(candidates["id"].isin(ids)).orderBy("id")
    sample.toPandas().to_csv("sample.csv", index=False)
    sample = spark.read.csv("sample.csv", header=True)
    for name in ("mlp", "cnn"):
        rows = score(spark, sample, name).orderBy("id").collect()
        out["predictions"][name] = [
            {"id": r["id"], "prediction": r["prediction"],
             "probability": [float(p) for p in r["probability"]]}
            for r in rows
        ]
    steps = sorted(glob.glob("ckpt/step-*"))
    out["checkpoint"] = {"dir": steps[-1].split("/")[-1], "metrics": json.load(open("mlp/metrics.json"))}
    json.dump(out, open("recorded.json", "w"), indent=2)
    spark.stop()
    """
)


def sh(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def build(commit: str, work: Path) -> dict[str, object]:
    """Build one release's artifacts in ``work`` with that release's code; returns its record."""
    what, models = RELEASES[commit]
    tree = Path(f"/tmp/rel-{commit}")
    if not tree.exists():
        sh(
            ["git", "worktree", "add", "--detach", str(tree), commit],
            cwd=REPO,
            env=dict(os.environ),
        )
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
    )
    py = [sys.executable, "-m", "jobs.cli"]
    (work / "mlp.yaml").write_text(
        config(f"{models}:mlp", output="mlp", ckpt="ckpt", args={"hidden": [16]})
    )
    (work / "cnn.yaml").write_text(
        config(f"{models}:cnn", output="cnn", ckpt="ckpt-cnn", args={"channels": [4, 8]})
    )
    sh([*py, "make-data", "--rows", str(ROWS), "--output", "raw", "--seed", "3"], cwd=work, env=env)
    sh([*py, "run", "--config", "mlp.yaml", "--summary", "run-summary.json"], cwd=work, env=env)
    sh([*py, "train", "--config", "cnn.yaml"], cwd=work, env=env)
    (work / "record.py").write_text(RECORD)
    sh([sys.executable, "record.py", str(SAMPLE_ROWS)], cwd=work, env=env)
    git = subprocess.run(
        ["git", "log", "-1", "--format=%H %cI %s", commit],
        cwd=REPO,
        text=True,
        check=True,
        capture_output=True,
    ).stdout.split(" ", 2)
    record = json.loads((work / "recorded.json").read_text())
    return {
        "commit": git[0],
        "date": git[1],
        "subject": git[2].strip(),
        "what": what,
        "builders": {"mlp": f"{models}:mlp", "cnn": f"{models}:cnn"},
        **record,
    }


def install(commit: str, work: Path, record: dict[str, object]) -> Path:
    """Copy the artifacts into the fixtures folder (the ETL keeps one generation only)."""
    dest = FIXTURES / commit
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("*.crc", "_SUCCESS", ".tmp-*")
    shutil.copytree(work / "shards", dest / "shards", ignore=ignore)
    for name in ("raw", "mlp", "cnn", "ckpt"):
        shutil.copytree(work / name, dest / name, ignore=ignore)
    for name in ("mlp.yaml", "cnn.yaml", "sample.csv", "run-summary.json"):
        shutil.copy2(work / name, dest / name)
    (dest / "fixture.json").write_text(json.dumps(record, indent=2) + "\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commits", nargs="*", default=list(RELEASES))
    ap.add_argument("--keep", action="store_true", help="keep the scratch dirs and worktrees")
    ns = ap.parse_args()
    for commit in ns.commits:
        work = Path(tempfile.mkdtemp(prefix=f"compat-{commit}-"))
        record = build(commit, work)
        dest = install(commit, work, record)
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        print(f"{commit}: {dest} ({size / 1024:.0f} KiB)", flush=True)
        if not ns.keep:
            shutil.rmtree(work)
            subprocess.run(
                ["git", "worktree", "remove", "--force", f"/tmp/rel-{commit}"],
                cwd=REPO,
                check=False,
            )


if __name__ == "__main__":
    main()
