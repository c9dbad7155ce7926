"""Array and image columns through the ETL on real Spark (local[2]), real files, real images.

Images: scikit-learn's digits as PNG files in class folders, and tiles of its sample photos
as JPEG; arrays: a Parquet table with an ``array<float>`` embedding beside numeric and
categorical columns, and a Spark ML vector column.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.core.configbase import ConfigError
from pipeline.data.columns import arrow_schema
from pipeline.data.shardset import SPLITS, ShardSet
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from tests import images
from tests.shards import tensor_values

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


def folder_config(root: Path, out: Path, label: str = "int", **image: Any) -> EtlConfig:
    """An ``image_folder`` ETL of ``root`` with one image column ``image``."""
    return EtlConfig.from_mapping(
        {
            "input": {"path": str(root), "format": "image_folder"},
            "schema": {"path": "string", "label": label, "image": "binary"},
            "key": "path",
            "label": "label",
            "images": {"image": image},
            "output": str(out),
            "num_shards": 2,
        }
    )


def shard_table(ss: ShardSet, split: str | None = None) -> pa.Table:
    """Every row of a split (or of all splits) of a Parquet shard set, checked on the way."""
    tables = []
    for name, info in ss.splits.items():
        if split is not None and name != split:
            continue
        ss.verify_shards(info.shards, mode="full")
        rows = [s.rows for s in info.shards]
        assert max(rows) - min(rows) <= 1, (name, rows)
        for shard in info.shards:
            table = pq.read_table(ss.shard_path(shard))
            assert table.schema == arrow_schema(ss.columns)
            tables.append(table)
    return pa.concat_tables(tables)


def pixels(table: pa.Table, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 tensor column (raw bytes per row) as ``[N, *shape]``."""
    return tensor_values(table.column(column), np.dtype(np.uint8), shape)


def test_digits_folder(spark: Any, tmp_path: Path) -> None:
    written = images.write_digits(tmp_path / "digits")
    cfg = folder_config(tmp_path / "digits", tmp_path / "out", size=[8, 8], channels="L")
    result = run_etl(spark, cfg)
    assert run_etl(spark, cfg).status == "up_to_date"  # the folder's files are fingerprinted
    ss = ShardSet.open(result.output)
    rec = ss.manifest["reconciliation"]
    assert rec == {"rows_in": 1797, "rows_ok": 1797, "rows_quarantined": 0}
    assert [c["name"] for c in ss.manifest["schema"]] == ["key", "image", "label"]  # no features
    entry = ss.column("image")
    assert {k: entry[k] for k in ("dtype", "shape", "kind")} == {
        "dtype": "uint8",
        "shape": [8, 8, 1],
        "kind": "image",
    }
    assert ss.column("key")["kind"] == "key" and ss.column("label")["kind"] == "label"
    assert ss.classes == list(range(10))
    table = shard_table(ss)
    assert table.num_rows == 1797
    got = pixels(table, "image", (8, 8, 1))
    for key, label, img in zip(
        table.column("key").to_pylist(), table.column("label").to_pylist(), got, strict=True
    ):
        rel = "/".join(key.split("/")[-2:])
        want_label, want = written[rel]
        assert label == ss.classes.index(want_label) and rel.split("/")[0] == str(want_label)
        np.testing.assert_array_equal(img[:, :, 0], want)  # 8×8 in, 8×8 out: the PNG's pixels
    # the normalization is the per-channel mean / std of x / 255 over the train split
    train = pixels(shard_table(ss, "train"), "image", (8, 8, 1)).astype(np.float64) / 255.0
    norm = entry["normalize"]
    assert norm["scale"] == 255.0
    np.testing.assert_allclose(norm["mean"], [train.mean()], rtol=1e-9)
    np.testing.assert_allclose(norm["std"], [train.std()], rtol=1e-9)


@pytest.mark.parametrize(
    ("policy", "decode"), [("crop", "exact"), ("stretch", "exact"), ("crop", "fast")]
)
def test_photo_tiles_match_pillow_for_the_resize_policy(
    spark: Any, tmp_path: Path, policy: str, decode: str
) -> None:
    tiles = images.write_photo_tiles(tmp_path / "tiles")
    cfg = folder_config(
        tmp_path / "tiles", tmp_path / "out", "string", size=[20, 24], resize=policy, decode=decode
    )
    ss = ShardSet.open(run_etl(spark, cfg).output)
    assert ss.manifest["reconciliation"]["rows_ok"] == len(tiles)
    table = shard_table(ss)
    got = pixels(table, "image", (20, 24, 3))
    for key, label, img in zip(
        table.column("key").to_pylist(), table.column("label").to_pylist(), got, strict=True
    ):
        path = key.removeprefix("file:")
        assert ss.classes[label] == Path(path).parent.name
        with Image.open(path) as src:
            rgb = src.convert("RGB")
            if policy == "crop":  # the largest centred 6:5 box, scaled to 24×20
                want = ImageOps.fit(rgb, (24, 20), method=Image.Resampling.BILINEAR)
            else:
                want = rgb.resize((24, 20), Image.Resampling.BILINEAR)
        if decode == "exact":  # Pillow's own pixels
            np.testing.assert_array_equal(img, np.asarray(want))
        else:  # 72×48 JPEGs decoded at half scale in the executors: close, not equal
            diff = np.abs(img.astype(np.int16) - np.asarray(want))
            assert 0 < diff.mean() < 6, (key, diff.mean())
    norm = ss.column("image")["normalize"]
    assert len(norm["mean"]) == len(norm["std"]) == 3


def test_table_with_embedding_vector_and_tabular_columns(spark: Any, tmp_path: Path) -> None:
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql import types as T

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)
    emb[:, 2] = 4.0  # a constant element: its std is recorded as 1
    rows = [
        (i, float(rng.normal()), "abc"[i % 3], emb[i].tolist(), Vectors.dense([1.0, i]), i % 2)
        for i in range(300)
    ]
    schema = T.StructType(
        [
            T.StructField("id", T.LongType()),
            T.StructField("x", T.DoubleType()),
            T.StructField("city", T.StringType()),
            T.StructField("emb", T.ArrayType(T.FloatType())),
            T.StructField("vec", VectorUDT()),
            T.StructField("y", T.IntegerType()),
        ]
    )
    spark.createDataFrame(rows, schema).write.parquet(str(tmp_path / "raw"))
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "raw"), "format": "parquet"},
            "schema": {
                "id": "long",
                "x": "double",
                "city": "string",
                "vec": "array<double>",
                "emb": "array<float>",
                "y": "int",
            },
            "key": "id",
            "label": "y",
            "numeric": ["x"],
            "categorical": ["city"],
            "onehot": ["city"],
            "arrays": {"emb": {"shape": [2, 3], "standardize": True}, "vec": {"shape": [2]}},
            "output": str(tmp_path / "out"),
            "num_shards": 3,
        }
    )
    ss = ShardSet.open(run_etl(spark, cfg).output)
    names = [c["name"] for c in ss.manifest["schema"]]
    assert names == ["key", "features", "vec", "emb", "label"]  # arrays in etl.schema order
    assert [c["kind"] for c in ss.manifest["schema"]] == [
        "key",
        "tabular",
        "array",
        "array",
        "label",
    ]
    assert ss.column("features")["shape"] == [5] and "normalize" not in ss.column("features")
    assert ss.column("vec") == {"name": "vec", "dtype": "float32", "shape": [2], "kind": "array"}
    table = shard_table(ss)
    keys = np.asarray(table.column("key").to_pylist())
    got = tensor_values(table.column("emb"), np.dtype(np.float32), (2, 3))
    np.testing.assert_array_equal(got, emb[keys].reshape(-1, 2, 3))
    vec = tensor_values(table.column("vec"), np.dtype(np.float32), (2,))
    np.testing.assert_array_equal(vec[:, 1], keys.astype(np.float32))
    train_keys = np.asarray(shard_table(ss, "train").column("key").to_pylist())
    norm = ss.column("emb")["normalize"]
    assert norm["scale"] == 1.0 and np.asarray(norm["mean"]).shape == (2, 3)
    want_std = emb[train_keys].astype(np.float64).std(axis=0, ddof=1)
    want_std[2] = 1.0
    np.testing.assert_allclose(
        np.asarray(norm["mean"]).ravel(), emb[train_keys].mean(axis=0), rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(norm["std"]).ravel(), want_std, rtol=1e-5)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {
        "input": {"path": str(tmp_path / "raw"), "format": "parquet"},
        "schema": {"id": "long", "emb": "array<float>", "img": "string", "y": "int"},
        "key": "id",
        "label": "y",
        "arrays": {"emb": {"shape": [4]}},
        "images": {"img": {"size": [8, 8]}},
        "output": str(tmp_path / "out"),
    }
    EtlConfig.from_mapping(base)  # valid
    cases = {
        "etl.schema.emb": {"arrays": {}},
        "etl.arrays.emb.shape": {"arrays": {"emb": {"shape": [0]}}},
        "etl.images.img.size": {"images": {"img": {"size": [8]}}},
        "etl.images.img": {"schema": {**base["schema"], "img": "double"}},
        "etl.images.features": {
            "schema": {**base["schema"], "features": "string"},
            "images": {"features": {"size": [8, 8]}},
        },
        "etl.input.options": {
            "input": {"path": "x", "format": "image_folder", "options": {"recursive": "x"}},
            "schema": {"id": "string", "y": "int", "img": "binary"},
        },
    }
    for key, change in cases.items():
        with pytest.raises(ConfigError) as err:
            EtlConfig.from_mapping({**base, **change})
        assert err.value.key == key, (key, str(err.value))


def test_a_missing_image_folder_is_a_config_error(spark: Any, tmp_path: Path) -> None:
    """The listing is pyarrow.fs now, not Spark's binaryFile: still exit 2 naming the key."""
    cfg = folder_config(tmp_path / "no-such-folder", tmp_path / "out", size=[8, 8])
    with pytest.raises(ConfigError, match="does not exist") as e:
        run_etl(spark, cfg)
    assert e.value.key == "etl.input.path"


def test_images_decoded_in_the_writers_or_during_validation_give_the_same_shard_set(
    spark: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writers decode; an image that fails there sends the build back to validation."""
    images.write_digits(tmp_path / "digits", limit=400)
    image = {"size": [8, 8], "channels": "L"}
    caplog.set_level(logging.INFO, logger="preprocessing.etl")
    cfg = folder_config(tmp_path / "digits", tmp_path / "a", **image)
    in_writers = run_etl(spark, cfg)
    assert "in the shard writers" in caplog.text
    assert "images_failed_in_writers" not in in_writers.timings_s
    corrupt = tmp_path / "digits" / "3" / "corrupt.png"
    corrupt.write_bytes(next((tmp_path / "digits" / "3").iterdir()).read_bytes()[:60])
    cfg = folder_config(tmp_path / "digits", tmp_path / "b", **image)
    failed = run_etl(spark, cfg)  # the writers meet the truncated PNG: validation decodes
    assert failed.timings_s["images_failed_in_writers"] > 0
    assert failed.manifest["quarantine"]["by_reason"] == {"image_invalid": 1}
    leftovers = [p.name for p in (tmp_path / "b").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []  # what the writers had written is gone
    corrupt.unlink()
    caplog.clear()
    again = run_etl(spark, cfg)  # the last build quarantined an image: validation decodes
    assert "in validation (the last build quarantined one)" in caplog.text
    assert "images_failed_in_writers" not in again.timings_s
    a, b = ShardSet.open(in_writers.output), ShardSet.open(again.output)
    assert a.manifest["schema"] == b.manifest["schema"]  # the image statistics too
    assert a.manifest["reconciliation"] == b.manifest["reconciliation"]
    for split in SPLITS:
        got = [(s.rows, s.sha256) for s in b.splits[split].shards]
        assert [(s.rows, s.sha256) for s in a.splits[split].shards] == got, split
