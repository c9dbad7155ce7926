"""The shard-format registry, the interface both formats implement, and column specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.core import storage
from pipeline.data.arrays import tensor_to_numpy, to_shard_batch
from pipeline.data.columns import ColumnSpec, arrow_schema, arrow_type
from pipeline.data.formats import (
    DEFAULT_FORMAT,
    FORMATS,
    FormatName,
    ShardFormat,
    UnknownFormatError,
    format_names,
    format_of,
    get_format,
    tfrecord,
)
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import MANIFEST_NAME, ShardSet, ShardSetError
from tests.shards import make_shardset, read_split

LOCAL = pafs.LocalFileSystem()
ALL = sorted(FORMATS)


def shard_table(n: int, dim: int, *, regression: bool = False, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    specs = (
        ColumnSpec("key", "int64"),
        ColumnSpec("features", "float32", (dim,)),
        ColumnSpec("label", "float32" if regression else "int64"),
    )
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32) if regression else rng.integers(0, 3, n)
    return pa.table(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            pa.array(y),
        ],
        schema=arrow_schema(specs, layout="list"),
    )


def for_format(table: pa.Table, fmt: ShardFormat) -> pa.Table:
    """``table`` (tensor columns as lists) in the layout ``fmt``'s writer takes."""
    specs = [
        ColumnSpec(f.name, np.dtype(f.type.value_type.to_pandas_dtype()).name, (f.type.list_size,))
        if pa.types.is_fixed_size_list(f.type)
        else ColumnSpec(f.name, str(f.type))
        for f in table.schema
    ]
    schema = arrow_schema(specs, layout=fmt.tensor_layout)
    return pa.Table.from_batches([to_shard_batch(b, schema) for b in table.to_batches()], schema)


# -- the registry -------------------------------------------------------------------------------
def test_registry_lists_both_formats() -> None:
    assert format_names() == ("parquet", "tfrecord") == tuple(sorted(get_args(FormatName)))
    assert DEFAULT_FORMAT in FORMATS
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, ShardFormat) and fmt.name == name and get_format(name) is fmt
        assert fmt.suffix == f".{name}" and name in repr(fmt)


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(
        UnknownFormatError,
        match=r"unknown shard file format 'orc' \(known formats: 'parquet', 'tfrecord'\)",
    ):
        get_format("orc")
    with pytest.raises(ValueError, match="known formats"):
        get_format(None)  # type: ignore[arg-type]


def test_unknown_format_in_a_manifest_names_the_manifest(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path, rows_per_shard={"train": [4]})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["file_format"] = "orc"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    ss = ShardSet.open(uri)
    with pytest.raises(ShardSetError, match=rf"{MANIFEST_NAME}: unknown shard file format 'orc'"):
        format_of(ss)
    with pytest.raises(ShardSetError, match="unknown shard file format"):
        ShardReader(uri, "train", rank=0, world_size=1, batch_size=2)


# -- one interface, both formats ----------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("regression", [False, True])
def test_round_trip_through_the_interface(tmp_path: Path, name: str, regression: bool) -> None:
    fmt, dim = get_format(name), 5
    table = shard_table(100, dim, regression=regression, seed=1)
    path = str(tmp_path / f"s{fmt.suffix}")
    written = fmt.write(LOCAL, path, for_format(table, fmt), 32)
    assert written.rows == 100 and written.bytes == Path(path).stat().st_size
    assert (written.sha256, written.bytes) == storage.sha256_file(LOCAL, path)
    assert fmt.count_rows(LOCAL, path, where=path) == 100
    index = fmt.index(LOCAL, path, 32, where=path)
    sizes = [index.row_group(i).num_rows for i in range(index.num_row_groups)]
    assert index.num_rows == 100 and sizes == [32, 32, 32, 4]
    label_dtype = np.dtype(np.float32 if regression else np.int64)
    features = ColumnSpec("features", "float32", (dim,))
    parts = [
        fmt.read_row_group(
            LOCAL, path, index, i, features=features, label_dtype=label_dtype, where=path
        )
        for i in range(index.num_row_groups)
    ]
    feats = np.concatenate([f for f, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    assert feats.dtype == np.float32 and feats.shape == (100, dim)
    assert feats.tobytes() == table["features"].combine_chunks().flatten().to_numpy().tobytes()
    assert labels.dtype == label_dtype and labels.tolist() == table["label"].to_pylist()


@pytest.mark.parametrize("name", ALL)
def test_writer_takes_batches_and_empty_shards(tmp_path: Path, name: str) -> None:
    fmt = get_format(name)
    table = for_format(shard_table(70, 3), fmt)
    one = fmt.write(LOCAL, str(tmp_path / f"a{fmt.suffix}"), table, 16)
    writer = fmt.open_writer(LOCAL, str(tmp_path / f"b{fmt.suffix}"), table.schema, 16)
    for batch in table.to_batches(max_chunksize=9):  # batches that straddle row groups
        writer.add(batch)
    assert writer.close() == one  # same bytes, same digest
    empty = fmt.open_writer(LOCAL, str(tmp_path / f"e{fmt.suffix}"), table.schema, 1).close()
    assert (
        empty.rows == 0 and fmt.count_rows(LOCAL, str(tmp_path / f"e{fmt.suffix}"), where="e") == 0
    )


@pytest.mark.parametrize("name", ALL)
def test_reader_gives_the_same_batches_for_every_format(tmp_path: Path, name: str) -> None:
    kw: dict[str, Any] = {"rows_per_shard": {"train": [50, 0, 21]}, "row_group_rows": 8, "seed": 2}
    plain = make_shardset(tmp_path / "plain", **kw)
    other = make_shardset(tmp_path / name, file_format=name, **kw)
    assert (
        ShardSet.open(other).file_format == name
        and format_of(ShardSet.open(other)) is FORMATS[name]
    )
    out = []
    for uri in (plain, other):
        with ShardReader(uri, "train", rank=1, world_size=2, batch_size=4, seed=3) as r:
            out.append([(b.features.numpy().tobytes(), b.labels.numpy().tobytes()) for b in r])
    assert out[0] and out[0] == out[1]
    if name == DEFAULT_FORMAT:
        np.testing.assert_array_equal(read_split(plain, "train")[1], read_split(other, "train")[1])


# -- column specs -------------------------------------------------------------------------------
def test_column_specs_come_from_the_manifest(tmp_path: Path) -> None:
    ss = ShardSet.open(make_shardset(tmp_path, rows_per_shard={"train": [3]}, dim=6))
    assert ss.columns == (
        ColumnSpec("key", "int64"),
        ColumnSpec("features", "float32", (6,)),
        ColumnSpec("label", "int64"),
    )
    assert ss.column_spec("features").shape == (6,) and ss.feature_dim == 6
    assert [c.to_manifest() for c in ss.columns] == ss.manifest["schema"]
    assert ss.column("label") == {"name": "label", "dtype": "int64", "shape": []}
    with pytest.raises(ShardSetError, match="manifest schema has no column 'image'"):
        ss.column_spec("image")
    bad = [*ss.manifest["schema"], {"name": "image", "dtype": "uint8", "shape": [2, 3, -1]}]
    with pytest.raises(ShardSetError, match=rf"{MANIFEST_NAME}: column 'image': shape must be"):
        _ = ShardSet(ss.uri, {**ss.manifest, "schema": bad}).columns


def test_column_spec_checks_and_arrow_types() -> None:
    image = ColumnSpec.from_manifest({"name": "image", "dtype": "uint8", "shape": [4, 4, 3]})
    assert image.is_tensor and image.size == 48 and image.numpy_dtype == np.uint8
    assert arrow_type(image) == pa.binary(48)
    assert arrow_type(image, layout="list") == pa.list_(pa.uint8(), 48)
    tokens = ColumnSpec("tokens", "int32", (7,))
    assert arrow_type(tokens) == pa.binary(28)
    assert arrow_type(tokens, layout="list") == pa.list_(pa.int32(), 7)
    assert arrow_type(ColumnSpec("key", "string")) == pa.string()
    assert arrow_type(ColumnSpec("features", "float32", (9,))) == pa.binary(36)
    assert arrow_type(ColumnSpec("features", "float32", (9,)), layout="list") == pa.list_(
        pa.float32(), 9
    )
    with pytest.raises(ValueError, match="tensor layout must be one of"):
        arrow_type(tokens, layout="nested")
    assert not ColumnSpec("label", "int64").is_tensor
    with pytest.raises(ValueError, match="unknown dtype 'complex'"):
        ColumnSpec("x", "complex")
    with pytest.raises(ValueError, match="shape must be a list of positive integers"):
        ColumnSpec("x", "float32", (0,))
    with pytest.raises(ValueError, match="needs a name and a dtype"):
        ColumnSpec.from_manifest({"name": "x"})


def test_tensor_columns_use_the_spec_type_both_ways() -> None:
    """The writer's conversion and the reader's check derive the type from one spec."""
    image = ColumnSpec("image", "uint8", (2, 2, 3))
    schema = arrow_schema([ColumnSpec("key", "int64"), image])
    values = np.arange(24, dtype=np.int64)  # as a Spark list<bigint> would arrive
    spark = pa.record_batch(
        [
            pa.array([7, 8], pa.int32()),
            pa.ListArray.from_arrays(pa.array([0, 12, 24], pa.int32()), pa.array(values)),
        ],
        names=["key", "image"],
    )
    batch = to_shard_batch(spark, schema)
    assert batch.schema == schema
    got = tensor_to_numpy(batch.column(1), image, where="x")
    assert got.dtype == np.uint8 and got.shape == (2, 2, 2, 3)
    assert got.reshape(-1).tolist() == values.tolist()
    with pytest.raises(
        ShardSetError, match=r"x: column 'image' has values of 12 bytes, the manifest's uint8 \[6\]"
    ):
        tensor_to_numpy(batch.column(1), ColumnSpec("image", "uint8", (6,)), where="x")
    listed = to_shard_batch(spark, arrow_schema([ColumnSpec("key", "int64"), image], layout="list"))
    with pytest.raises(
        ShardSetError, match="x: column 'image' has vectors of 12 values, the manifest says 6"
    ):
        tensor_to_numpy(listed.column(1), ColumnSpec("image", "uint8", (6,)), where="x")
    short = pa.record_batch(
        [
            pa.array([1]),
            pa.ListArray.from_arrays(pa.array([0, 5], pa.int32()), pa.array(values[:5])),
        ],
        names=["key", "image"],
    )
    with pytest.raises(ValueError, match="image arrays must all have length 12"):
        to_shard_batch(short, schema)


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_binary_rows_of_exactly_the_rows_bytes_are_a_tensor(kind: pa.DataType) -> None:
    """Decoded image pixels as Spark holds them (scoring's input): bytes a row, sliced too."""
    pixels = np.arange(5 * 12, dtype=np.uint8).reshape(5, 2, 2, 3)
    column = pa.array([row.tobytes() for row in pixels], kind)
    image = ColumnSpec("image", "uint8", (2, 2, 3))
    assert tensor_to_numpy(column, image).tolist() == pixels.tolist()
    assert tensor_to_numpy(column.slice(2, 3), image).tolist() == pixels[2:].tolist()
    floats = np.linspace(-1, 1, 6, dtype="<f4").reshape(2, 3)
    wide = pa.array([row.tobytes() for row in floats], kind)
    assert tensor_to_numpy(wide, ColumnSpec("v", "float32", (3,))).tolist() == floats.tolist()
    ragged = pa.array([b"\0" * 12, b"\0" * 12, b"\0" * 11], kind)
    with pytest.raises(
        ShardSetError,
        match=r"^m: column 'image' row 1 has 11 bytes, the model's uint8 \[2, 2, 3\] takes 12$",
    ):
        tensor_to_numpy(ragged.slice(1), image, where="m", source="the model")


# -- tensor columns: named columns of any dtype, both formats ----------------------------------
TENSORS = (
    ColumnSpec("emb", "float32", (2, 2)),
    ColumnSpec("features", "float32", (3,)),
    ColumnSpec("image", "uint8", (2, 3, 3)),
    ColumnSpec("tokens", "int32", (5,)),
)


def tensor_table(
    n: int, *, string_keys: bool = False, uniform: bool = False, seed: int = 0
) -> pa.Table:
    """Rows with every kind of tensor column; string keys of varied lengths when asked;
    ``uniform``: every record has the same length and structure (small keys, labels, ids)."""
    rng = np.random.default_rng(seed)
    key = ColumnSpec("key", "string" if string_keys else "int64")
    specs = (key, *TENSORS, ColumnSpec("label", "int64"))
    keys = [f"k{'x' * (i % 37)}{i}" for i in range(n)] if string_keys else np.arange(n) * 1000
    if uniform:
        keys = np.arange(n) % 100
    values = {
        "emb": rng.standard_normal((n, 4)).astype(np.float32),
        "features": rng.standard_normal((n, 3)).astype(np.float32),
        "image": rng.integers(0, 256, (n, 18), dtype=np.uint8),
        # token ids of every varint width, and the int32 extremes
        "tokens": rng.choice([0, 1, 127, 128, 300, 70_000, 2**31 - 1, -(2**31)], (n, 5)),
    }
    if uniform:
        values["tokens"] = np.broadcast_to([300, 5, 70_000, 0, 9], (n, 5)) + rng.integers(
            0, 9, (n, 5)
        )
    cols = [pa.array(keys)]
    for spec in TENSORS:
        flat = values[spec.name].astype(spec.numpy_dtype).reshape(-1)
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), spec.size))
    cols.append(pa.array(rng.integers(0, 100 if uniform else 300, n)))  # 1 or 2 varint bytes
    return pa.table(cols, schema=arrow_schema(specs, layout="list"))


def read_all(fmt: ShardFormat, path: str, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    index = fmt.index(LOCAL, path, rows, where=path)
    parts = [
        fmt.read_columns(
            LOCAL, path, index, i, columns=TENSORS, label_dtype=np.dtype(np.int64), where=path
        )
        for i in range(index.num_row_groups)
    ]
    cols = {c.name: np.concatenate([p[0][c.name] for p in parts]) for c in TENSORS}
    return cols, np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("rows", ["int_keys", "string_keys", "uniform"])
def test_tensor_columns_round_trip(
    tmp_path: Path, name: str, rows: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32, uint8 and int32 tensors come back bitwise, in their dtype and shape.

    Records of one layout are decoded together, never one by one (``uniform``); the others
    (varint widths and key lengths vary) through the general parser.
    """
    fmt = get_format(name)
    table = tensor_table(300, string_keys=rows == "string_keys", uniform=rows == "uniform")
    if rows == "uniform":

        def one_by_one(record: bytes) -> None:
            raise AssertionError("a record of the common layout was parsed on its own")

        monkeypatch.setattr("pipeline.data.formats._template.decode_example", one_by_one)
    path = str(tmp_path / f"t{fmt.suffix}")
    fmt.write(LOCAL, path, for_format(table, fmt), 64)
    cols, labels = read_all(fmt, path, 64)
    for spec in TENSORS:
        want = table[spec.name].combine_chunks().flatten().to_numpy()
        assert cols[spec.name].dtype == spec.numpy_dtype
        assert cols[spec.name].shape == (300, *spec.shape)
        assert cols[spec.name].tobytes() == want.astype(spec.numpy_dtype).tobytes(), spec.name
    assert labels.tolist() == table["label"].to_pylist()


def test_tfrecord_tensor_records_are_plain_examples(tmp_path: Path) -> None:
    """One feature per column, in name order; an image is one bytes_list value of its pixels;
    the tabular layout is byte for byte what the encoder of earlier versions wrote."""
    table = tensor_table(40, string_keys=False)
    path = tmp_path / "t.tfrecord"
    tfrecord.TFRecordFormat().write(LOCAL, str(path), table, 16)
    first = tfrecord.decode_example(tfrecord.read_records(path.read_bytes())[0])
    assert list(first) == sorted(table.schema.names)
    assert first["image"].kind == "bytes_list"
    assert first["image"].values == [table["image"][0].values.to_numpy().tobytes()]
    assert first["tokens"].kind == "int64_list" and first["emb"].kind == "float_list"
    assert first["tokens"].values.tolist() == table["tokens"][0].values.to_pylist()
    tab = shard_table(50, 4)
    old = tfrecord.encode_examples(
        tab["key"].combine_chunks(),
        tab["features"].combine_chunks().flatten().to_numpy().reshape(50, 4),
        tab["label"].to_numpy(),
    )
    tfrecord.TFRecordFormat().write(LOCAL, str(tmp_path / "tab.tfrecord"), tab, 16)
    assert (tmp_path / "tab.tfrecord").read_bytes() == old


def test_tfrecord_tensor_errors_name_the_record_and_feature(tmp_path: Path) -> None:
    table = tensor_table(40, string_keys=False)
    path = str(tmp_path / "t.tfrecord")
    fmt = tfrecord.TFRecordFormat()
    fmt.write(LOCAL, path, table, 16)
    index = fmt.index(LOCAL, path, 16, where=path)
    wrong = ColumnSpec("image", "uint8", (3, 3, 3))
    with pytest.raises(
        ShardSetError,
        match=r"t.tfrecord: record 16: feature 'image' is a bytes_list of 1 value\(s\) of "
        r"\[18\] bytes; expected a bytes_list of one 27-byte value \(uint8 \[3, 3, 3\]\)",
    ):
        fmt.read_columns(
            LOCAL, path, index, 1, columns=[wrong], label_dtype=np.dtype(np.int64), where=path
        )
    with pytest.raises(
        ShardSetError,
        match=r"record 0: feature 'missing' is missing; expected a float_list of 1 values",
    ):
        fmt.read_columns(
            LOCAL,
            path,
            index,
            0,
            columns=[ColumnSpec("missing", "float32", (1,))],
            label_dtype=np.dtype(np.int64),
            where=path,
        )
