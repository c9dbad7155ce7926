"""The Parquet tensor layout of format_version 2, and version 1 shard sets read as before.

``tests/compat/fixtures/0.1.0-tensors`` is a shard set written by release 0.1.0 (commit
cb86e62, tensor columns as ``fixed_size_list``) with the digests of what that release's
reader yielded (``build.py`` beside it rebuilds both).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.arrays import tensor_to_numpy, to_shard_batch
from pipeline.data.columns import ColumnSpec, arrow_schema, arrow_type
from pipeline.data.formats import get_format
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import FORMAT_VERSION, ShardSet, ShardSetError
from tests.shards import Extra, make_shardset, read_columns

FIXTURE = Path(__file__).resolve().parents[1] / "compat" / "fixtures" / "0.1.0-tensors"


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fixture_build", FIXTURE / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the fixture (the reader must not write next to checked-in files)."""
    root = tmp_path_factory.mktemp("v1") / "shards"
    shutil.copytree(FIXTURE / "shards", root)
    return str(root)


def test_the_fixture_is_a_version_1_set_of_fixed_size_lists(old_set: str) -> None:
    ss = ShardSet.open(old_set)
    assert ss.manifest["format_version"] == 1 < FORMAT_VERSION
    schema = pq.read_schema(Path(old_set) / ss.split("train").shards[0].path)
    assert schema.field("image").type == pa.list_(pa.uint8(), 192)
    assert {c.kind for c in ss.columns} >= {"tabular", "array", "image", "text"}


@pytest.mark.parametrize("run", ["plain", "plain-rank1of2", "fixed-padding"])
def test_version_1_batches_are_bitwise_those_of_0_1_0(old_set: str, run: str) -> None:
    build = _build_module()
    want = json.loads((FIXTURE / "expected.json").read_text())["runs"][run]
    kwargs, epochs = build.RUNS[run]
    with ShardReader(old_set, "train", verify="full", **kwargs) as reader:
        for e, expected in enumerate(want["epochs"][:epochs]):
            reader.set_epoch(e)
            assert [build.digest_batch(b) for b in reader] == expected["batches"]


@pytest.mark.parametrize("run", ["shuffled-rank0of2", "shuffled-rank1of2"])
def test_version_1_shuffled_epochs_hold_the_rows_of_0_1_0(old_set: str, run: str) -> None:
    """Shuffled: the same steps and batch sizes, and each rank the same rows each epoch."""
    build = _build_module()
    want = json.loads((FIXTURE / "expected.json").read_text())["runs"][run]
    kwargs, epochs = build.RUNS[run]
    for e, expected in enumerate(want["epochs"][:epochs]):
        with ShardReader(old_set, "train", text_padding="fixed", **kwargs) as reader:
            reader.set_epoch(e)
            batches = list(reader)
        assert [len(b.labels) for b in batches] == expected["sizes"]
        rows = sorted(d for b in batches for d in build.digest_rows(b))
        assert hashlib.sha256("".join(rows).encode()).hexdigest() == expected["rows_sha256"]


def test_a_version_2_set_of_the_same_rows_reads_the_same(old_set: str, tmp_path: Path) -> None:
    """Rewrite the fixture in the new layout: every batch equal, files self-describing."""
    ss = ShardSet.open(old_set)
    schema = arrow_schema(ss.columns)
    fmt, fs = get_format("parquet"), pafs.LocalFileSystem()
    manifest = dict(ss.manifest, format_version=FORMAT_VERSION)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        entries = []
        for shard in ss.split(split).shards:
            table = pq.read_table(ss.shard_path(shard))
            batch = to_shard_batch(table.combine_chunks().to_batches()[0], schema)
            written = fmt.write(fs, str(tmp_path / shard.path), [batch], 8, schema)
            entries.append({"path": shard.path, "rows": written.rows, "bytes": written.bytes,
                            "sha256": written.sha256})  # fmt: skip
        manifest["splits"] = {**manifest["splits"], split: {"rows": sum(e["rows"] for e in entries), "shards": entries}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    new = pq.ParquetFile(tmp_path / ss.split("train").shards[0].path)
    field = new.schema_arrow.field("image")
    assert field.type == pa.binary(192)
    assert field.metadata == {b"dtype": b"uint8", b"shape": b"[8, 8, 3]", b"order": b"C,<"}
    column = new.metadata.row_group(0).column(new.schema_arrow.get_field_index("image"))
    assert column.physical_type == "FIXED_LEN_BYTE_ARRAY" and not column.is_stats_set
    for kwargs in ({"shuffle": False, "batch_size": 16}, {"seed": 5, "batch_size": 4}):
        with ShardReader(old_set, "train", rank=0, world_size=1, **kwargs) as a:  # type: ignore[arg-type]
            old = list(a)
        with ShardReader(str(tmp_path), "train", rank=0, world_size=1, **kwargs) as b:  # type: ignore[arg-type]
            got = list(b)
        assert len(old) == len(got)
        for x, y in zip(old, got, strict=True):
            assert x.inputs.keys() == y.inputs.keys()
            assert all(np.array_equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
            assert np.array_equal(x.labels, y.labels)


def test_the_readme_one_liner_turns_a_column_back_into_an_array(tmp_path: Path) -> None:
    uri = make_shardset(
        tmp_path,
        rows_per_shard={"train": [20]},
        extra=[Extra("image", "uint8", (4, 5, 3), "image")],
    )
    path = next((tmp_path / "train").glob("*.parquet"))
    table = pq.read_table(path)
    # README, "Shard set": the one line, with pyarrow and numpy only
    x = np.frombuffer(table["image"].combine_chunks().buffers()[1], np.uint8).reshape(-1, 4, 5, 3)
    np.testing.assert_array_equal(x, read_columns(uri, "train")["image"])
    f = np.frombuffer(table["features"].combine_chunks().buffers()[1], "<f4").reshape(-1, 8)
    np.testing.assert_array_equal(f, read_columns(uri, "train")["features"])
    assert table.to_pandas()["image"].map(len).eq(60).all()  # pandas: bytes objects


def test_binary_layout_is_zero_copy_and_checks_its_width() -> None:
    spec = ColumnSpec("emb", "float32", (2, 3))
    x = np.arange(30, dtype=np.float32).reshape(5, 2, 3)
    col = pa.Array.from_buffers(arrow_type(spec), 5, [None, pa.py_buffer(x)])
    got = tensor_to_numpy(col.slice(1, 3), spec)
    assert got.ctypes.data == col.buffers()[1].address + 24
    np.testing.assert_array_equal(got, x[1:4])
    with pytest.raises(
        ShardSetError, match=r"part-3: column 'emb' has values of 24 bytes.*takes 32"
    ):
        tensor_to_numpy(col, ColumnSpec("emb", "float32", (8,)), where="part-3")
    with pytest.raises(ShardSetError, match="1 null rows"):
        tensor_to_numpy(pa.array([b"x" * 24, None], pa.binary(24)), spec)


def test_writer_takes_spark_lists_and_image_bytes() -> None:
    specs = [ColumnSpec("v", "float32", (3,)), ColumnSpec("img", "uint8", (2, 2, 1)),
             ColumnSpec("ids", "int32", (2,))]  # fmt: skip
    schema = arrow_schema(specs)
    spark = pa.RecordBatch.from_pydict(
        {
            "v": pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], pa.list_(pa.float64())),
            "img": pa.array([bytes(range(4)), bytes(range(4, 8))], pa.binary()),
            "ids": pa.array([[1, 2], [3, 4]], pa.list_(pa.int64())),
        }
    )
    out = to_shard_batch(spark.slice(1), schema)
    np.testing.assert_array_equal(tensor_to_numpy(out.column(0), specs[0]), [[4, 5, 6]])
    np.testing.assert_array_equal(tensor_to_numpy(out.column(1), specs[1]).ravel(), [4, 5, 6, 7])
    np.testing.assert_array_equal(tensor_to_numpy(out.column(2), specs[2]), [[3, 4]])
    with pytest.raises(ValueError, match="img values must all have 4 bytes"):
        to_shard_batch(spark.set_column(1, "img", pa.array([b"abc", b"defg"])), schema)
    with pytest.raises(ValueError, match="v arrays must all have length 3"):
        to_shard_batch(spark.set_column(0, "v", pa.array([[1.0], [2.0]])), schema)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batches_cross_to_the_gpu_asynchronously(tmp_path: Path) -> None:
    uri = make_shardset(
        tmp_path,
        rows_per_shard={"train": [40]},
        extra=[Extra("image", "uint8", (4, 4, 3), "image")],
    )
    with ShardReader(uri, "train", rank=0, world_size=1, batch_size=8, pin_memory=True) as r:
        batches = list(r)
    assert all(t.is_pinned() for b in batches for t in [*b.inputs.values(), b.labels])
    with ShardReader(uri, "train", rank=0, world_size=1, batch_size=8) as r:
        plain = list(r)
    for b, p in zip(batches, plain, strict=True):
        on_gpu = b.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.inputs["image"].cpu(), p.inputs["image"])
