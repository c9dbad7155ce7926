"""The test helper that writes shard sets must itself honour the shard-set contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shardset import ShardSet
from tests.shards import make_shardset, read_split


def test_manifest_matches_the_files(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path, rows_per_shard={"train": [50, 0, 20], "val": [9]}, dim=5)
    shards = ShardSet.open(uri)
    assert shards.feature_dim == 5 and shards.task == "classification"
    assert shards.classes == [0, 1]
    assert {s: shards.split(s).rows for s in ("train", "val", "test")} == {
        "train": 70,
        "val": 9,
        "test": 0,
    }
    for split in shards.splits.values():
        shards.verify_shards(split.shards, "full")  # real sizes and sha256
        for shard in split.shards:
            assert pq.read_metadata(shards.shard_path(shard)).num_rows == shard.rows
            assert shard.path.startswith(f"{split.name}/part-")
    schema = pq.read_schema(shards.shard_path(shards.split("train").shards[0]))
    assert schema.field("features").type == pa.binary(5 * 4)  # format_version 2: raw bytes
    keys, _, _ = read_split(uri, "train")
    assert keys.tolist() == list(range(70))


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_shardset(tmp_path / "a", rows_per_shard={"train": [30]}, seed=4)
    b = make_shardset(tmp_path / "b", rows_per_shard={"train": [30]}, seed=4)
    sa, sb = ShardSet.open(a).split("train").shards, ShardSet.open(b).split("train").shards
    assert [s.sha256 for s in sa] == [s.sha256 for s in sb]


def test_labels_are_learnable(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path / "c", rows_per_shard={"train": [2000]}, dim=6, num_classes=3)
    _, x, y = read_split(uri, "train")
    assert set(np.unique(y)) == {0, 1, 2}
    onehot = np.eye(3)[y]
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], onehot, rcond=None)
    accuracy = (np.c_[x, np.ones(len(x))] @ w).argmax(1) == y
    assert accuracy.mean() > 0.8  # a linear model separates them
    uri = make_shardset(tmp_path / "r", rows_per_shard={"train": [500]}, task="regression")
    _, x, y = read_split(uri, "train")
    assert y.dtype == np.float32 and ShardSet.open(uri).task == "regression"
    w, res, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert res[0] / len(y) < 1e-3
