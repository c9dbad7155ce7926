"""A wide raw table (hundreds of columns, few rows) and its config, for the wide-plan tests.

Real tables have hundreds of columns; every expression the ETL and scoring build over the
columns must stay flat (Spark Connect's protobuf plans have a depth limit of about 100).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import yaml

__all__ = ["wide_config", "write_wide_csv"]

NUMERIC = 500
CATEGORICAL = 50


def write_wide_csv(path: Path, rows: int = 300, seed: int = 11) -> Path:
    """``path/data.csv``: ``id``, ``label`` (0/1), ``n0``… (double), ``c0``… (string).

    The label depends on a few numeric and categorical columns; about 1 row in 50 has an
    empty numeric value (imputed) and a few a bad one (quarantined).
    """
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    numeric = [f"n{i}" for i in range(NUMERIC)]
    categorical = [f"c{i}" for i in range(CATEGORICAL)]
    with (path / "data.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label", *numeric, *categorical])
        for r in range(rows):
            xs = [rng.gauss(0.0, 1.0) for _ in numeric]
            cs = [rng.choice("abcd"[: 2 + i % 3]) for i in range(CATEGORICAL)]
            score = xs[0] + xs[1] - xs[2] + (0.8 if cs[0] == "a" else -0.4)
            cells = [f"{x:.5f}" for x in xs]
            if r % 50 == 7:
                cells[3] = ""
            if r % 97 == 5:
                cells[4] = "oops"
            out.writerow([r, int(score > 0), *cells, *cs])
    return path


def wide_config(work: Path, raw: Path, **spark: Any) -> Path:
    """``work/c.yaml``: the ETL of the wide table into 2 shards and a 1-epoch 2-worker MLP."""
    schema = {"id": "long", "label": "int"}
    schema |= {f"n{i}": "double" for i in range(NUMERIC)}
    schema |= {f"c{i}": "string" for i in range(CATEGORICAL)}
    etl = {
        "input": {"path": str(raw), "format": "csv"},
        "schema": schema,
        "key": "id",
        "label": "label",
        "numeric": [f"n{i}" for i in range(NUMERIC)],
        "categorical": [f"c{i}" for i in range(CATEGORICAL)],
        "onehot": ["c0", "c1"],
        "output": str(work / "shards"),
        "num_shards": 2,
    }
    train = {
        "dataset": str(work / "shards"),
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16]}},
        "num_workers": 2,
        "epochs": 1,
        "batch_size": 64,
        "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 0, "keep": 1},
        "output": str(work / "model"),
        "timeout_s": 120,
    }
    data: dict[str, Any] = {"etl": etl, "train": train, "spark": {"master": "local[2]", **spark}}
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
