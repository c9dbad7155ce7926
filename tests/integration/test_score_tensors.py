"""Scoring bundles whose model takes image / array columns: ETL → train → score, real Spark.

* digits as a PNG folder (``image_folder``) → ``spark-train run`` (the built-in ``cnn``) →
  ``spark-train score`` on a copy of the folder plus hostile files: good files get the
  prediction the bundle's network gives in-process on the shard set's decoded pixels (so the
  decode in scoring equals the ETL's), bad files a null prediction and the ETL's reason;
* a Parquet table with an ``array<float>`` embedding and numeric columns → ETL → ``mlp`` on
  both inputs → scored predictions equal the network in-process on the shard set's columns.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.cli import main
from pipeline.data.arrays import tensor_to_numpy
from pipeline.data.batch import Batch
from pipeline.data.shardset import SPLITS, ShardSet
from pipeline.launch.fit import fit
from pipeline.serve.score import score_table
from pipeline.train.bundle import load_bundle
from pipeline.train.config import TrainConfig
from pipeline.train.engine import to_model
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from tests import images

pytestmark = [pytest.mark.spark, pytest.mark.timeout(900)]


def _reference(shards: str, bundle: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Keys, split of each key and in-process class probabilities for every shard row."""
    ss = ShardSet.open(shards)
    loaded = load_bundle(bundle)
    inputs = loaded.inputs
    keys: list[str] = []
    splits: dict[str, np.ndarray] = {}
    probs = []
    for s in SPLITS:
        tables = [pq.read_table(ss.shard_path(sh), filesystem=ss.fs) for sh in ss.split(s).shards]
        if not tables:
            continue
        table = pa.concat_tables(tables)
        xs = {
            c.name: torch.from_numpy(tensor_to_numpy(table.column(c.name), c.column.spec).copy())
            for c in inputs.columns
        }
        batch = Batch(xs, torch.zeros(table.num_rows))
        with torch.inference_mode():
            x, _ = to_model(inputs, batch, torch.device("cpu"))
            probs.append(torch.softmax(loaded.model(x).float(), dim=1).numpy())
        split_keys = [str(k) for k in table.column("key").to_pylist()]
        splits[s] = np.array(split_keys)
        keys += split_keys
    return keys, splits, np.concatenate(probs)


def _rel(uri: str) -> str:
    """``<folder>/<file>`` of a file URI (the same file in two copies of a tree)."""
    return "/".join(str(uri).split("/")[-2:])


@pytest.mark.slow
def test_image_folder_run_then_score_with_hostile_files(
    spark: Any, tmp_path: Path, capsys: Any
) -> None:
    digits = images.write_digits(tmp_path / "png")
    etl = {
        "input": {"path": str(tmp_path / "png"), "format": "image_folder"},
        "schema": {"path": "string", "label": "int", "image": "binary"},
        "key": "path",
        "label": "label",
        "images": {"image": {"size": [8, 8], "channels": "L", "max_pixels": 50_000}},
        "output": str(tmp_path / "shards"),
        "num_shards": 2,
    }
    train = {
        "dataset": str(tmp_path / "shards"),
        "model": {"builder": "pipeline.train.models:cnn"},
        "num_workers": 2,
        "epochs": 8,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "lr_schedule": {"name": "cosine", "warmup_steps": 10},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0, "keep": 1},
        "output": str(tmp_path / "model"),
        "timeout_s": 300,
    }
    cfg = tmp_path / "c.yaml"
    data = {"etl": etl, "train": train, "spark": {"master": "local[2]"}}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(cfg)]) == 0
    capsys.readouterr()

    raw = tmp_path / "to-score"
    shutil.copytree(tmp_path / "png", raw)
    hostile = images.write_hostile(raw / "hostile")
    out = tmp_path / "scored"
    rc = main(["score", "--model", train["output"], "--input", str(raw), "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    scored = pq.read_table(out).to_pandas()
    assert "image" not in scored.columns  # an image folder's bytes are not copied out
    scored.index = [_rel(k) for k in scored["path"]]
    assert len(scored) == len(digits) + len(hostile)

    # hostile files: the ETL's reason and a null prediction; good ones a prediction
    for rel, reason in hostile.items():
        row = scored.loc[_rel(rel)]
        assert row["score_error"] == reason, (rel, row["score_error"])
        if reason is None:
            assert row["probability"] is not None and not np.isnan(row["prediction"])
        else:
            assert row["score_error_column"] == "image" and row["probability"] is None

    # digits: the network in-process on the shard set's pixels, for every row the ETL wrote
    keys, splits, probs = _reference(train["dataset"], train["output"])
    rels = [_rel(k) for k in keys]
    assert sorted(rels) == sorted(digits) and scored.loc[rels, "score_error"].isna().all()
    got = np.stack(scored.loc[rels, "probability"].to_numpy()).astype(np.float32)
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-5)
    assert (scored.loc[rels, "prediction"].to_numpy() == probs.argmax(axis=1)).all()
    test = [_rel(k) for k in splits["test"]]
    truth = np.array([digits[r][0] for r in test])
    accuracy = float((scored.loc[test, "prediction"].to_numpy() == truth).mean())
    print(f"digits cnn: test accuracy of the scored predictions {accuracy:.4f} ({len(test)} files)")
    assert accuracy >= 0.9, accuracy

    # --format naming the bundle's own input format (image_folder) reads the folder the same
    again = tmp_path / "scored-again"
    args = ["--model", train["output"], "--input", str(tmp_path / "png"), "--output", str(again)]
    assert main(["score", *args, "--format", "image_folder"]) == 0, capsys.readouterr().err
    rescored = pq.read_table(again).to_pandas()
    rescored.index = [_rel(k) for k in rescored["path"]]
    assert sorted(rescored.index) == sorted(digits) and rescored["score_error"].isna().all()
    got = np.stack(rescored.loc[rels, "probability"].to_numpy()).astype(np.float32)
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-5)


def _embedding_table(path: Path, rows: int = 1200) -> None:
    """``id, x0, x1, emb (array<float>[8]), label``: the label depends on emb and x0."""
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(rows, 8)).astype(np.float32)
    x0, x1 = rng.normal(size=rows) * 10 + 3, rng.normal(size=rows)
    label = ((emb[:, 0] + emb[:, 3] - emb[:, 5] + 0.1 * (x0 - 3)) > 0).astype(np.int32)
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "x0": x0,
            "x1": x1,
            "emb": pa.array(list(emb), type=pa.list_(pa.float32())),
            "label": label,
        }
    )
    bad = pa.table(  # wrong length, null element: array_invalid
        {
            "id": pa.array([rows, rows + 1], pa.int64()),
            "x0": [1.0, 2.0],
            "x1": [0.0, 0.0],
            "emb": pa.array([[1.0] * 3, [1.0] * 7 + [None]], type=pa.list_(pa.float32())),
            "label": pa.array([0, 1], pa.int32()),
        }
    )
    path.mkdir(parents=True)
    pq.write_table(pa.concat_tables([table, bad]), path / "part-0.parquet")


def test_parquet_embedding_and_numeric_columns_score_like_the_model(
    spark: Any, tmp_path: Path
) -> None:
    raw, shards, bundle = tmp_path / "raw", str(tmp_path / "shards"), str(tmp_path / "model")
    _embedding_table(raw)
    etl = {
        "input": {"path": str(raw), "format": "parquet"},
        "schema": {
            "id": "long",
            "x0": "double",
            "x1": "double",
            "emb": "array<float>",
            "label": "int",
        },
        "key": "id",
        "label": "label",
        "numeric": ["x0", "x1"],
        "arrays": {"emb": {"shape": [8], "standardize": True}},
        "output": shards,
        "num_shards": 2,
    }
    run_etl(spark, EtlConfig.from_mapping(etl))
    train = {
        "dataset": shards,
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16]}},
        "num_workers": 2,
        "epochs": 3,
        "batch_size": 64,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0, "keep": 1},
        "output": bundle,
        "timeout_s": 120,
        "max_attempts": 1,
    }
    fit(TrainConfig.from_mapping(train), spark, show_progress=False)
    names = [i["name"] for i in load_bundle(bundle).spec["inputs"]]
    assert sorted(names) == ["emb", "features"]

    res = score_table(spark, bundle, str(raw), str(tmp_path / "scored"))
    assert res.errors == {"array_invalid": 2} and res.rows == 1202
    scored = pq.read_table(tmp_path / "scored").to_pandas().set_index("id")
    assert list(scored.loc[[1200, 1201], "score_error_column"]) == ["emb", "emb"]
    assert scored.loc[[1200, 1201], "prediction"].isna().all()
    keys, _, probs = _reference(shards, bundle)
    ids = [int(k) for k in keys]
    got = np.stack(scored.loc[ids, "probability"].to_numpy()).astype(np.float32)
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-5)
    assert (scored.loc[ids, "prediction"].to_numpy() == probs.argmax(axis=1)).all()
