"""Config files for the tests that run the whole pipeline (ETL → train) on make-data rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from preprocessing.make_data import demo_etl_section


def pipeline_config(
    tmp_path: Path, raw: Path, *, master: str | None = "local[2]", **train: Any
) -> Path:
    """``tmp_path/c.yaml``: the demo ETL of ``raw`` into 2 shards and a small 2-worker MLP.

    ``train`` keys replace the defaults of the train section; ``master=None`` leaves out the
    spark section (the master then comes from spark-submit).
    """
    etl = demo_etl_section(str(raw), str(tmp_path / "shards"))
    etl["num_shards"] = 2
    section = {
        "dataset": str(tmp_path / "shards"),
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16]}},
        "num_workers": 2,
        "epochs": 1,
        "batch_size": 128,
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 50, "keep": 1},
        "output": str(tmp_path / "model"),
        "timeout_s": 120,
        **train,
    }
    data: dict[str, Any] = {"etl": etl, "train": section}
    if master is not None:
        data["spark"] = {"master": master}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
