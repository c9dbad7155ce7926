"""Hostile image files and array values through the ETL: every row accounted for, none crashes.

A folder of damaged, disguised, oversized and unusual images (``tests.images``), the same
files as a path column of a CSV table (plus missing and empty paths), and a JSON corpus of
bad arrays must each reconcile exactly, with the expected reason and column per row; the good
unusual images (16-bit, palette, RGBA, CMYK, EXIF-rotated) must decode as Pillow's own
conversions say.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.data.shardset import ShardSet
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from tests import images
from tests.shards import tensor_values

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

IMAGE = {"size": [12, 18], "channels": "RGB", "resize": "stretch", "max_pixels": 50_000}


def _rows(ss: ShardSet) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(ss.shard_path(s)) for split in ss.splits.values() for s in split.shards
    )


def _quarantine(spark: Any, ss: ShardSet, *columns: str) -> list[Any]:
    path = f"{ss.uri}/{ss.manifest['quarantine']['path']}"
    return spark.read.parquet(path).select(*columns, "reason", "reason_column").collect()


def _expected_pixels(path: Path) -> np.ndarray:
    """What ``IMAGE`` makes of a good file, spelled with Pillow and numpy directly."""
    with Image.open(path) as src:
        img = ImageOps.exif_transpose(src)
        if img.mode.startswith("I;16"):
            values = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
            img = Image.fromarray(values)
        rgb = img.convert("RGB").resize((18, 12), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _check_good_pixels(table: pa.Table, root: Path) -> None:
    got = tensor_values(table.column("image"), np.dtype(np.uint8), (12, 18, 3))
    for key, pixels in zip(table.column("path").to_pylist(), got, strict=True):
        name = Path(key.removeprefix("file:")).name
        np.testing.assert_array_equal(pixels, _expected_pixels(root / "good" / name), name)


def test_hostile_image_folder_reconciles_exactly(spark: Any, tmp_path: Path) -> None:
    expected = images.write_hostile(tmp_path / "in")
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "in"), "format": "image_folder"},
            "schema": {"path": "string", "label": "string", "image": "binary"},
            "key": "path",
            "label": "label",
            "images": {"image": IMAGE},
            "split": {"val": 0.0, "test": 0.0},
            "output": str(tmp_path / "out"),
            "num_shards": 2,
        }
    )
    ss = ShardSet.open(run_etl(spark, cfg).output)
    bad = {k: r for k, r in expected.items() if r is not None}
    assert ss.manifest["reconciliation"] == {
        "rows_in": len(expected),  # the zero-byte file too, which Spark's scan skips
        "rows_ok": len(expected) - len(bad),
        "rows_quarantined": len(bad),
    }
    assert ss.manifest["quarantine"]["by_reason"] == dict(sorted(Counter(bad.values()).items()))
    assert ss.manifest["quarantine"]["by_column"] == {"image": len(bad)}
    rows = _quarantine(spark, ss, "path")
    got = {"/".join(r["path"].split("/")[-2:]): r["reason"] for r in rows}
    assert got == bad
    table = _rows(ss)
    assert sorted(Path(k).name for k in table.column("key").to_pylist()) == sorted(
        Path(k).name for k, r in expected.items() if r is None
    )
    _check_good_pixels(table.rename_columns(["path", "image", "label"]), tmp_path / "in")
    # a rotated JPEG is stored upright: 30×20 on disk, EXIF orientation 6 → 20 wide, 30 high
    with Image.open(tmp_path / "in" / "good" / "rotated.jpg") as src:
        assert src.size == (30, 20) and ImageOps.exif_transpose(src).size == (20, 30)


def test_hostile_image_paths_reconcile_exactly(spark: Any, tmp_path: Path) -> None:
    """The same files as a path column of a CSV (plus a missing and an empty path)."""
    expected = images.write_hostile(tmp_path / "img")
    rows = [(str(tmp_path / "img" / rel), reason) for rel, reason in expected.items()]
    rows += [
        (str(tmp_path / "img" / "nowhere.png"), "image_unreadable"),
        (str(tmp_path / "img"), "image_unreadable"),  # a directory
        ("nosuchscheme://host/x.png", "image_unreadable"),
        ("", "image_missing"),
    ]
    lines = ["id,path,y"] + [f"{i},{p},{i % 2}" for i, (p, _) in enumerate(rows)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "t.csv").write_text("\n".join(lines) + "\n")
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "raw"), "format": "csv"},
            "schema": {"id": "long", "path": "string", "y": "int"},
            "key": "id",
            "label": "y",
            "images": {"path": IMAGE},
            "split": {"val": 0.0, "test": 0.0},
            "output": str(tmp_path / "out"),
            "num_shards": 2,
        }
    )
    ss = ShardSet.open(run_etl(spark, cfg).output)
    bad = {i: r for i, (_, r) in enumerate(rows) if r is not None}
    rec = ss.manifest["reconciliation"]
    assert rec == {
        "rows_in": len(rows),
        "rows_ok": len(rows) - len(bad),
        "rows_quarantined": len(bad),
    }
    got = {int(r["id"]): (r["reason"], r["reason_column"]) for r in _quarantine(spark, ss, "id")}
    assert got == {i: (r, "path") for i, r in bad.items()}
    table = _rows(ss)
    assert [c["name"] for c in ss.manifest["schema"]] == ["key", "path", "label"]
    paths = [rows[k][0] for k in table.column("key").to_pylist()]
    _check_good_pixels(pa.table({"path": paths, "image": table.column("path")}), tmp_path / "img")


BAD_ARRAYS = {
    "short": ([1.0, 2.0, 3.0], "array_invalid"),
    "long": ([1, 2, 3, 4, 5], "array_invalid"),
    "null": (None, "array_missing"),
    "nan": ("[1.0, NaN, 3.0, 4.0]", "array_invalid"),
    "inf": ("[1e400, 1, 2, 3]", "array_invalid"),
    "over_float32": ([1e39, 1, 2, 3], "array_invalid"),
    "null_element": ([1.0, None, 3.0, 4.0], "array_invalid"),
    "nested": ([[1.0, 2.0], [3.0, 4.0]], "array_invalid"),
    "strings": (["a", "b", "c", "d"], "array_invalid"),
    "scalar": (7, "array_invalid"),
    "object": ({"a": 1}, "array_invalid"),
    "empty": ([], "array_invalid"),
}


def test_array_corpus_reconciles_exactly(spark: Any, tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "y": i % 2, "emb": [i, 1.5, -2.0, 0.25]}) for i in range(60)]
    ids = {}
    for n, (name, (value, _)) in enumerate(BAD_ARRAYS.items()):
        ids[1000 + n] = name
        emb = value if isinstance(value, str) else json.dumps(value)
        lines.append(f'{{"id": {1000 + n}, "y": 0, "emb": {emb}}}')
    lines.append('{"id": 2000, "y": 1}')  # no emb at all: missing
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.json").write_text("\n".join(lines) + "\n")
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "raw"), "format": "json"},
            "schema": {"id": "long", "y": "int", "emb": "array<double>"},
            "key": "id",
            "label": "y",
            "arrays": {"emb": {"shape": [2, 2]}},
            "output": str(tmp_path / "out"),
            "num_shards": 3,
        }
    )
    ss = ShardSet.open(run_etl(spark, cfg).output)
    want = {i: BAD_ARRAYS[name][1] for i, name in ids.items()} | {2000: "array_missing"}
    assert ss.manifest["reconciliation"] == {
        "rows_in": 60 + len(want),
        "rows_ok": 60,
        "rows_quarantined": len(want),
    }
    got = {int(r["id"]): (r["reason"], r["reason_column"]) for r in _quarantine(spark, ss, "id")}
    assert got == {i: (r, "emb") for i, r in want.items()}
    table = _rows(ss)
    emb = tensor_values(table.column("emb"), np.dtype(np.float32), (2, 2))
    keys = np.asarray(table.column("key").to_pylist())
    np.testing.assert_array_equal(emb[:, 0, 0], keys.astype(np.float32))
    np.testing.assert_array_equal(emb[:, 1], np.tile([-2.0, 0.25], (len(keys), 1)))
    assert ss.column("emb") == {"name": "emb", "dtype": "float32", "shape": [2, 2], "kind": "array"}
