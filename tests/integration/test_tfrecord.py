"""``etl.format: tfrecord`` end to end: the same data through the ETL as Parquet and as TFRecord."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.data.formats import tfrecord
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet, ShardSetError
from pipeline.launch.fit import fit
from pipeline.train.config import TrainConfig
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from preprocessing.make_data import demo_etl_section, make_data
from tests.shards import tensor_values

# The module's fixture runs the ETL twice (~25 s each on a warm session).
pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def sets(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, ShardSet]:
    """One small raw table, through the ETL once per format (3 shards, row groups of 128)."""
    root = tmp_path_factory.mktemp("tfrecord-etl")
    make_data(spark, 3000, str(root / "raw"), seed=1)
    out = {}
    for fmt in ("parquet", "tfrecord"):
        section = demo_etl_section(str(root / "raw"), str(root / fmt))
        section.update(num_shards=3, row_group_rows=128, format=fmt)
        out[fmt] = ShardSet.open(run_etl(spark, EtlConfig.from_mapping(section)).output)
    return out["parquet"], out["tfrecord"]


def _parquet_rows(ss: ShardSet, shard: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
    t = pq.read_table(ss.shard_path(shard))
    feats = tensor_values(t["features"], np.dtype(np.float32), (ss.feature_dim,))
    return t["key"].to_pylist(), feats, t["label"].to_numpy()


def _tfrecord_rows(ss: ShardSet, shard: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
    records = tfrecord.read_records(Path(ss.shard_path(shard)).read_bytes(), where=shard.path)
    examples = [tfrecord.decode_example(r) for r in records]
    keys = [int(e["key"].values[0]) for e in examples]
    feats = np.array([e["features"].values for e in examples], np.float32).reshape(
        -1, ss.feature_dim
    )
    return keys, feats, np.array([e["label"].values[0] for e in examples], np.int64)


def test_tfrecord_shards_hold_the_parquet_rows_in_the_same_order(
    sets: tuple[ShardSet, ShardSet],
) -> None:
    pq_set, tf_set = sets
    assert (pq_set.file_format, tf_set.file_format) == ("parquet", "tfrecord")
    for key in ("schema", "feature_names", "label", "reconciliation", "row_group_rows"):
        assert tf_set.manifest[key] == pq_set.manifest[key], key
    assert pq_set.split("train").rows > 2000
    for name in ("train", "val", "test"):
        a, b = pq_set.split(name), tf_set.split(name)
        assert [s.rows for s in b.shards] == [s.rows for s in a.shards]
        tf_set.verify_shards(b.shards, mode="full")
        for sa, sb in zip(a.shards, b.shards, strict=True):
            assert sb.path.endswith(".tfrecord") and sb.path.startswith(f"{name}/part-")
            keys_a, feats_a, labels_a = _parquet_rows(pq_set, sa)
            keys_b, feats_b, labels_b = _tfrecord_rows(tf_set, sb)
            assert keys_b == keys_a  # the same rows in the same order
            assert feats_b.tobytes() == feats_a.tobytes()
            assert labels_b.tolist() == labels_a.tolist()


@pytest.mark.parametrize(
    ("split", "world_size", "shuffle"), [("train", 2, True), ("val", 1, False)]
)
def test_reader_batches_are_bitwise_equal(
    sets: tuple[ShardSet, ShardSet], split: str, world_size: int, shuffle: bool
) -> None:
    def batches(ss: ShardSet, rank: int) -> list[tuple[bytes, bytes]]:
        with ShardReader(ss, split, rank=rank, world_size=world_size, batch_size=64,
                         shuffle=shuffle, shuffle_buffer_rows=256, seed=3) as r:  # fmt: skip
            r.set_epoch(1)
            return [(b.features.numpy().tobytes(), b.labels.numpy().tobytes()) for b in r]

    for rank in range(world_size):
        expected = batches(sets[0], rank)
        assert len(expected) >= 2
        assert batches(sets[1], rank) == expected


def test_a_corrupt_record_is_a_clear_error(sets: tuple[ShardSet, ShardSet], tmp_path: Path) -> None:
    copy = shutil.copytree(sets[1].uri, tmp_path / "copy")
    ss = ShardSet.open(str(copy))
    shard = ss.split("train").shards[1]
    path = Path(ss.shard_path(shard))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    reader = ShardReader(ss, "train", rank=0, world_size=1, batch_size=64, verify="size")
    with pytest.raises(
        tfrecord.TFRecordError, match=rf"{ss.shard_uri(shard)}: record \d+: data CRC"
    ):
        list(reader)
    with pytest.raises(ShardSetError, match=rf"{shard.path} is corrupt: sha256"):
        list(ShardReader(ss, "train", rank=0, world_size=1, batch_size=64))  # verify: auto


def test_one_ddp_epoch_on_tfrecord_equals_parquet(
    spark: Any, sets: tuple[ShardSet, ShardSet], tmp_path: Path
) -> None:
    weights = []
    for ss in sets:
        out = tmp_path / ss.file_format
        cfg = TrainConfig.from_mapping(
            {
                "dataset": ss.uri,
                "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16]}},
                "num_workers": 2,
                "epochs": 1,
                "batch_size": 128,
                "checkpoint": {"dir": str(out / "ckpt"), "every_steps": 1000},
                "output": str(out / "model"),
                "timeout_s": 60,
                "max_attempts": 1,
            }
        )
        result = fit(cfg, spark, show_progress=False)
        assert result.steps == math.ceil(sets[0].split("train").rows // 2 / 128)
        weights.append(load_file(str(out / "model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_tensor_columns_in_tfrecord_read_as_in_parquet(spark: Any, tmp_path: Path) -> None:
    """An image (PNG bytes), an array<float> embedding and a numeric column, through the ETL
    as Parquet and as TFRecord: equal manifests' columns and bitwise-equal reader batches,
    the image uint8 on both."""
    from pyspark.sql import types as T

    rng = np.random.default_rng(3)
    rows = []
    for i in range(96):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(png, "PNG")
        emb = rng.normal(size=4).astype(np.float32).tolist()
        rows.append((i, float(rng.normal()), emb, png.getvalue(), i % 3))
    schema = T.StructType(
        [
            T.StructField("id", T.LongType()),
            T.StructField("x", T.DoubleType()),
            T.StructField("emb", T.ArrayType(T.FloatType())),
            T.StructField("img", T.BinaryType()),
            T.StructField("y", T.IntegerType()),
        ]
    )
    spark.createDataFrame(rows, schema).write.parquet(str(tmp_path / "raw"))
    sets = []
    for fmt in ("parquet", "tfrecord"):
        section = {
            "input": {"path": str(tmp_path / "raw"), "format": "parquet"},
            "schema": {
                "id": "long",
                "x": "double",
                "emb": "array<float>",
                "img": "binary",
                "y": "int",
            },
            "key": "id",
            "label": "y",
            "numeric": ["x"],
            "arrays": {"emb": {"shape": [4]}},
            "images": {"img": {"size": [4, 4]}},
            "output": str(tmp_path / fmt),
            "num_shards": 2,
            "row_group_rows": 16,
            "format": fmt,
        }
        sets.append(ShardSet.open(run_etl(spark, EtlConfig.from_mapping(section)).output))
    pq_set, tf_set = sets
    assert pq_set.manifest["schema"] == tf_set.manifest["schema"]
    assert tf_set.column("img")["dtype"] == "uint8"
    for split in pq_set.splits:
        batches = [
            list(ShardReader(ss, split, rank=0, world_size=1, batch_size=8, seed=4)) for ss in sets
        ]
        assert len(batches[0]) == len(batches[1]) > 0
        for a, b in zip(*batches, strict=True):
            assert a.inputs.keys() == b.inputs.keys() == {"features", "emb", "img"}
            assert b.inputs["img"].dtype == torch.uint8 and b.inputs["img"].shape[1:] == (4, 4, 3)
            for name in a.inputs:
                assert torch.equal(a.inputs[name], b.inputs[name]), (split, name)
            assert torch.equal(a.labels, b.labels)
