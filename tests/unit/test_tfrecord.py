"""TFRecord framing, CRC32C, tf.train.Example encoding, and the reader on TFRecord shards."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.arrays import features_to_numpy
from pipeline.data.formats import tfrecord
from pipeline.data.formats._example import _varint
from pipeline.data.formats.tfrecord import TFRecordError
from pipeline.data.reader import ShardReader
from pipeline.data.shardset import MANIFEST_NAME, ShardSet, ShardSetError
from tests.shards import make_shardset, shard_entry

LOCAL = pafs.LocalFileSystem()
I64 = np.dtype(np.int64)


# -- independent references -------------------------------------------------------------------
def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit from the polynomial (no tables): the reference for the fast one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def frames(data: bytes) -> list[tuple[int, int, bytes, int]]:
    """(length, length crc, payload, payload crc) of each record, split by hand."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        (lcrc,) = struct.unpack_from("<I", data, pos + 8)
        payload = data[pos + 12 : pos + 12 + n]
        (dcrc,) = struct.unpack_from("<I", data, pos + 12 + n)
        out.append((n, lcrc, payload, dcrc))
        pos += 16 + n
    return out


def sample(
    n: int = 40, dim: int = 5, seed: int = 0, *, uniform: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys, features, labels; ``uniform``: keys and labels of one varint size (equal records)."""
    rng = np.random.default_rng(seed)
    if uniform:
        keys, labels = rng.integers(2**35, 2**42, n), rng.integers(0, 100, n)
    else:
        keys, labels = rng.integers(-(2**62), 2**62, n), rng.integers(0, 300, n)
        keys[:4] = [0, -1, 2**63 - 1, -(2**63)]
    return keys, rng.standard_normal((n, dim)).astype(np.float32), labels


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# -- CRC32C -------------------------------------------------------------------------------------
def test_crc32c_known_vectors() -> None:
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(b"") == 0
    assert tfrecord.crc32c(b"a") == 0xC1D04330
    # RFC 3720 (iSCSI), appendix B.4
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
    assert tfrecord.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert tfrecord.masked_crc32c(b"123456789") == masked(0xE3069283)
    c = np.array([0xE3069283, 0, 0xFFFFFFFF], np.uint32)
    assert tfrecord.mask_crc(c).tolist() == [masked(int(x)) for x in c]


def test_crc32c_many_matches_the_bitwise_reference() -> None:
    rng = np.random.default_rng(1)
    buf = rng.integers(0, 256, 5000, dtype=np.uint8)
    lengths = np.concatenate([np.arange(0, 20), rng.integers(0, 700, 60)])
    starts = rng.integers(0, 5000 - 700, len(lengths))
    got = tfrecord.crc32c_many(buf, starts, lengths)
    want = [crc32c_bitwise(buf[s : s + n].tobytes()) for s, n in zip(starts, lengths, strict=True)]
    assert got.tolist() == want
    with pytest.raises(ValueError, match="inside the 5000-byte buffer"):
        tfrecord.crc32c_many(buf, [4990], [20])


@pytest.mark.parametrize("spacing", ["even", "uneven"])
def test_crc32c_many_on_runs_of_one_length(spacing: str) -> None:
    """Runs of >= 64 equal lengths take another path (a strided view when evenly spaced)."""
    rng = np.random.default_rng(2)
    buf = rng.integers(0, 256, 40_000, dtype=np.uint8)
    starts = np.arange(100) * 131 if spacing == "even" else np.sort(rng.choice(39_000, 100))
    for length in (8, 13, 131):
        lengths = np.full(100, length)
        lengths[::17] = 5  # a few others mixed in
        got = tfrecord.crc32c_many(buf, starts, lengths)
        want = [
            crc32c_bitwise(buf[s : s + n].tobytes()) for s, n in zip(starts, lengths, strict=True)
        ]
        assert got.tolist() == want


def test_walk_finds_every_record_whatever_the_sizes() -> None:
    rng = np.random.default_rng(3)
    parts = []
    for n, uniform in ((150, True), (70, False), (3, True), (200, False), (90, True)):
        keys = pa.array(
            ["k" * int(x) for x in (np.full(n, 9) if uniform else rng.integers(0, 40, n))]
        )
        parts.append(
            tfrecord.encode_examples(keys, rng.standard_normal((n, 3)), np.zeros(n, np.int64))
        )
    data = b"".join(parts)
    want, pos = [], 0
    for n, *_ in frames(data):
        want.append(pos)
        pos += n + 16
    starts, used = tfrecord._walk(np.frombuffer(data, np.uint8))
    assert len(want) == 513 and starts.tolist() == want and used == len(data)
    starts, used = tfrecord._walk(np.frombuffer(data[:-7], np.uint8))  # the last one is cut
    assert starts.tolist() == want[:-1] and used == want[-1]


# -- encoding -----------------------------------------------------------------------------------
def test_framing_is_tensorflows() -> None:
    keys, feats, labels = sample(7)
    data = tfrecord.encode_examples(keys, feats, labels)
    records = frames(data)
    assert len(records) == 7
    for n, lcrc, payload, dcrc in records:
        assert len(payload) == n
        assert lcrc == masked(crc32c_bitwise(struct.pack("<Q", n)))
        assert dcrc == masked(crc32c_bitwise(payload))
    assert tfrecord.read_records(data) == [r[2] for r in records]


# Serialized by protobuf (SerializeToString(deterministic=True)) from the tf.train.Example
# messages {features: [1.5, 2.5], key: b"abc", label: int64 1} and
# {features: [-0.0, 3.25, 1e-3], key: int64 -2, label: float 0.5}.
GOLDEN_STRING_KEY = (
    "0a3a0a180a086665617475726573120c120a0a080000c03f000020400a0e0a036b657912070a050a03616263"
    "0a0e0a056c6162656c12051a030a0101"
)
GOLDEN_INT_KEY = (
    "0a480a1c0a0866656174757265731210120e0a0c00000080000050406f12833a0a150a036b6579120e1a0c0a0a"
    "feffffffffffffffff010a110a056c6162656c120812060a040000003f"
)


def test_records_are_protobufs_deterministic_serialization() -> None:
    a = tfrecord.encode_examples(pa.array(["abc"]), np.array([[1.5, 2.5]]), np.array([1]))
    assert frames(a)[0][2].hex() == GOLDEN_STRING_KEY
    b = tfrecord.encode_examples(
        np.array([-2]), np.array([[-0.0, 3.25, 1e-3]]), np.array([0.5], np.float32)
    )
    assert frames(b)[0][2].hex() == GOLDEN_INT_KEY


def test_round_trip_int_string_keys_and_float_labels() -> None:
    keys, feats, labels = sample(300, dim=3)
    feats[0] = [np.nan, np.inf, -0.0]
    for i, record in enumerate(
        tfrecord.read_records(tfrecord.encode_examples(keys, feats, labels))
    ):
        ex = tfrecord.decode_example(record)
        assert (
            ex["features"].kind == "float_list"
            and np.asarray(ex["features"].values).dtype == np.float32
        )
        assert np.asarray(ex["features"].values).tobytes() == feats[i].tobytes()
        assert ex["label"] == ("int64_list", pytest.approx([labels[i]]))
        assert np.asarray(ex["key"].values).tolist() == [keys[i]]
    skeys = pa.array(["", "é", "x" * 200, "k3"]).slice(1)  # a slice: offsets start at 1
    floats = np.array([0.25, -1e30, 7.0], np.float32)
    data = tfrecord.encode_examples(skeys, feats[:3], floats)
    for i, record in enumerate(tfrecord.read_records(data)):
        ex = tfrecord.decode_example(record)
        assert ex["key"] == ("bytes_list", [skeys[i].as_py().encode()])
        assert ex["label"].kind == "float_list" and np.asarray(ex["label"].values).tolist() == [
            floats[i]
        ]


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="D >= 1"):
        tfrecord.encode_examples(np.arange(2), np.zeros((2, 0)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="2 feature rows but 3 labels"):
        tfrecord.encode_examples(np.arange(2), np.zeros((2, 1)), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="must not be null"):
        tfrecord.encode_examples(pa.array([1, None]), np.zeros((2, 1)), np.zeros(2, np.int64))


# -- decoding other encodings -------------------------------------------------------------------
def _ld(field: int, body: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(body)) + body


def _foreign_example(feats: np.ndarray, label: int, key: bytes) -> bytes:
    """Another writer's valid encoding: entries out of order, unpacked floats and int64,
    an unknown field, a duplicate entry (the last one wins), Features split in two."""
    unpacked = b"".join(b"\x0d" + struct.pack("<f", x) for x in feats)
    label_list = _ld(3, b"\x08" + _varint(label))  # int64_list, unpacked value
    stale = _ld(1, _ld(1, b"features") + _ld(2, _ld(2, _ld(1, b"\x00" * 4 * len(feats)))))
    entries = [
        _ld(1, _ld(1, b"label") + _ld(2, label_list)),
        stale,
        _ld(1, _ld(1, b"key") + _ld(2, _ld(1, _ld(1, key)))),
        b"\x10\x07",  # unknown varint field 2
        _ld(1, _ld(1, b"features") + _ld(2, _ld(2, unpacked))),
    ]
    return _ld(1, b"".join(entries[:2])) + _ld(1, b"".join(entries[2:]))


def _frame(payloads: list[bytes]) -> bytes:
    out = b""
    for p in payloads:
        n = struct.pack("<Q", len(p))
        out += n + struct.pack("<I", masked(crc32c_bitwise(n))) + p
        out += struct.pack("<I", masked(crc32c_bitwise(p)))
    return out


def test_general_decoder_and_reader_fallback(tmp_path: Path) -> None:
    keys, feats, labels = sample(10, dim=4)
    foreign = _foreign_example(feats[3], int(labels[3]), b"kk")
    ex = tfrecord.decode_example(foreign)
    assert np.asarray(ex["features"].values).tobytes() == feats[3].tobytes()
    assert np.asarray(ex["label"].values).tolist() == [labels[3]] and ex["key"].values == [b"kk"]
    ours = frames(tfrecord.encode_examples(keys, feats, labels))
    payloads = [foreign if i == 3 else r[2] for i, r in enumerate(ours)]
    path = write(tmp_path / "mixed.tfrecord", _frame(payloads))
    index = tfrecord.index_shard(LOCAL, path, 4)
    assert [g.num_rows for g in index.row_groups] == [4, 4, 2]
    got = [tfrecord.read_row_group(LOCAL, path, index, g, dim=4, label_dtype=I64) for g in range(3)]
    assert np.concatenate([f for f, _ in got]).tobytes() == feats.tobytes()
    assert np.concatenate([lab for _, lab in got]).tolist() == labels.tolist()


def test_wrong_records_are_named(tmp_path: Path) -> None:
    keys, feats, labels = sample(6, dim=4)
    data = tfrecord.encode_examples(keys, feats, labels)
    path = write(tmp_path / "s.tfrecord", data)
    index = tfrecord.index_shard(LOCAL, path, 4)
    with pytest.raises(TFRecordError, match=r"s\.tfrecord: record 4: feature 'features' is a "):
        tfrecord.read_row_group(LOCAL, path, index, 1, dim=3, label_dtype=I64)
    with pytest.raises(
        TFRecordError, match="'label' is a int64_list of 1 values; expected a float"
    ):
        tfrecord.read_row_group(LOCAL, path, index, 0, dim=4, label_dtype=np.dtype(np.float32))
    bad = write(tmp_path / "b.tfrecord", _frame([b"\x0a\x05\x0a\x03\x0a\x01"]))
    index = tfrecord.index_shard(LOCAL, bad, 4)
    with pytest.raises(TFRecordError, match=r"record 0: not a valid tf.train.Example"):
        tfrecord.read_row_group(LOCAL, bad, index, 0, dim=4, label_dtype=I64)


# -- corruption ---------------------------------------------------------------------------------
def test_truncated_files_name_the_file_and_record(tmp_path: Path) -> None:
    keys, feats, labels = sample(5, uniform=True)
    data = tfrecord.encode_examples(keys, feats, labels)
    size = len(frames(data)[0][2]) + 16
    assert len(data) == 5 * size
    for cut, part in ((3 * size + 5, "length"), (3 * size + 14, "data"), (len(data) - 1, "data")):
        path = write(tmp_path / "t.tfrecord", data[:cut])
        record = cut // size
        with pytest.raises(
            TFRecordError, match=rf"t\.tfrecord: truncated: record {record} .*{part}"
        ):
            tfrecord.index_shard(LOCAL, path, 2)
        with pytest.raises(TFRecordError, match=rf"truncated: record {record} "):
            tfrecord.read_records(data[:cut], where=path)
    path = write(tmp_path / "t.tfrecord", data)
    index = tfrecord.index_shard(LOCAL, path, 2)
    write(tmp_path / "t.tfrecord", data[: 3 * size])  # cut after it was indexed
    cut_off = rf"t\.tfrecord: row group 1: truncated: {size} of its {2 * size} bytes"
    with pytest.raises(TFRecordError, match=cut_off):
        tfrecord.read_row_group(LOCAL, path, index, 1, dim=5, label_dtype=I64)


def test_corrupt_bytes_fail_their_crc(tmp_path: Path) -> None:
    keys, feats, labels = sample(9, uniform=True)
    data = bytearray(tfrecord.encode_examples(keys, feats, labels))
    size = len(data) // 9
    assert len(data) == 9 * size
    flipped = bytearray(data)
    flipped[5 * size + 30] ^= 0x01  # inside record 5's data
    path = write(tmp_path / "c.tfrecord", bytes(flipped))
    index = tfrecord.index_shard(LOCAL, path, 4)  # the index scan reads lengths only
    with pytest.raises(TFRecordError, match=r"c\.tfrecord: record 5: data CRC32C mismatch"):
        tfrecord.read_row_group(LOCAL, path, index, 1, dim=5, label_dtype=I64)
    tfrecord.read_row_group(LOCAL, path, index, 0, dim=5, label_dtype=I64)  # others are fine
    long = bytearray(data)
    long[6 * size + 2] ^= 0x10  # record 6's length
    with pytest.raises(TFRecordError, match="record 6: the CRC of its length field"):
        tfrecord.index_shard(LOCAL, write(tmp_path / "l.tfrecord", bytes(long)), 4)
    with pytest.raises(TFRecordError, match="record 6: the CRC of its length field"):
        tfrecord.read_records(bytes(long))


def test_index_scan_across_read_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tfrecord, "_SCAN_BYTES", 100)  # records of ~170 bytes: longer than a read
    keys, feats, labels = sample(23, dim=30, uniform=True)
    data = tfrecord.encode_examples(keys, feats, labels)
    size = len(data) // 23
    assert size > 100
    path = write(tmp_path / "i.tfrecord", data)
    index = tfrecord.index_shard(LOCAL, path, 5)
    assert index.num_rows == 23 and index.num_row_groups == 5
    assert index.row_group(4) == tfrecord.RowGroup(20, 3, 20 * size, 3 * size)
    assert sum(g.nbytes for g in index.row_groups) == Path(path).stat().st_size
    feats_back = [
        tfrecord.read_row_group(LOCAL, path, index, g, dim=30, label_dtype=I64)[0] for g in range(5)
    ]
    assert np.concatenate(feats_back).tobytes() == feats.tobytes()
    empty = write(tmp_path / "e.tfrecord", b"")
    assert tfrecord.index_shard(LOCAL, empty, 5) == tfrecord.ShardIndex(0, ())


# -- independent decoders (optional packages) ---------------------------------------------------
def example_message_class() -> Any:
    """tf.train.Example built from its .proto definition with protobuf's descriptor API."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="example.proto", package="tensorflow")
    fdp.syntax = "proto3"
    f = descriptor_pb2.FieldDescriptorProto
    rep, opt = f.LABEL_REPEATED, f.LABEL_OPTIONAL
    for name, ftype in (
        ("BytesList", f.TYPE_BYTES),
        ("FloatList", f.TYPE_FLOAT),
        ("Int64List", f.TYPE_INT64),
    ):
        fdp.message_type.add(name=name).field.add(name="value", number=1, type=ftype, label=rep)
    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in ((1, "bytes_list"), (2, "float_list"), (3, "int64_list")):
        type_name = ".tensorflow." + name.title().replace("_", "")
        feature.field.add(name=name, number=number, type=f.TYPE_MESSAGE, label=opt,
                          type_name=type_name, oneof_index=0)  # fmt: skip
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=opt)
    entry.field.add(
        name="value", number=2, type=f.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature"
    )
    features.field.add(name="feature", number=1, type=f.TYPE_MESSAGE, label=rep,
                       type_name=".tensorflow.Features.FeatureEntry")  # fmt: skip
    fdp.message_type.add(name="Example").field.add(
        name="features", number=1, type=f.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def test_protobuf_parses_our_records_and_we_parse_its() -> None:
    pytest.importorskip("google.protobuf")
    example = example_message_class()
    keys, feats, labels = sample(50, dim=6)
    for i, record in enumerate(
        tfrecord.read_records(tfrecord.encode_examples(keys, feats, labels))
    ):
        msg = example.FromString(record)
        fmap = msg.features.feature
        assert (
            np.array(fmap["features"].float_list.value, np.float32).tobytes() == feats[i].tobytes()
        )
        assert list(fmap["label"].int64_list.value) == [labels[i]]
        assert list(fmap["key"].int64_list.value) == [keys[i]]
        assert msg.SerializeToString(deterministic=True) == record
        ours = tfrecord.decode_example(msg.SerializeToString())  # its map order, not ours
        assert np.asarray(ours["features"].values).tobytes() == feats[i].tobytes()
    foreign = example.FromString(_foreign_example(feats[0], 9, b"z"))
    assert list(foreign.features.feature["features"].float_list.value) == pytest.approx(feats[0])
    assert list(foreign.features.feature["label"].int64_list.value) == [9]


def test_tensorboards_record_reader_reads_our_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    keys, feats, labels = sample(30)
    data = tfrecord.encode_examples(keys, feats, labels)
    reader = pywrap_tensorflow.PyRecordReader_New(write(tmp_path / "tb.tfrecord", data))
    records = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        records.append(reader.record())
    assert records == tfrecord.read_records(data)


def test_tensorflow_reads_our_files(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    keys, feats, labels = sample(20, dim=4)
    path = write(tmp_path / "tf.tfrecord", tfrecord.encode_examples(keys, feats, labels))
    spec = {
        "features": tf.io.FixedLenFeature([4], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.int64),
    }
    batch = next(
        iter(tf.data.TFRecordDataset([path]).batch(20).map(lambda b: tf.io.parse_example(b, spec)))
    )
    assert batch["features"].numpy().tobytes() == feats.tobytes()
    assert batch["label"].numpy().tolist() == labels.tolist()
    assert batch["key"].numpy().tolist() == keys.tolist()


# -- the reader on TFRecord shards --------------------------------------------------------------
def to_tfrecord(uri: str, dest: Path) -> str:
    """The same shard set with every shard rewritten as TFRecord (manifest updated)."""
    manifest = json.loads((Path(uri) / MANIFEST_NAME).read_text())
    manifest["file_format"] = "tfrecord"
    dim = manifest["schema"][1]["shape"][0]
    for split in manifest["splits"].values():
        for i, shard in enumerate(split["shards"]):
            t = pq.read_table(Path(uri) / shard["path"])
            feats = features_to_numpy(t["features"], dim)
            rel = shard["path"].replace(".parquet", ".tfrecord")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            data = tfrecord.encode_examples(t["key"].combine_chunks(), feats, t["label"].to_numpy())
            (dest / rel).write_bytes(data)
            split["shards"][i] = shard_entry(dest, rel, shard["rows"])
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(dest)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("formats")
    parquet = make_shardset(
        root / "pq",
        rows_per_shard={"train": [100, 3, 0, 57], "val": [9]},
        row_group_rows=16,
        seed=5,
    )
    return parquet, to_tfrecord(parquet, root / "tfr")


def _batches(uri: str, **kw: Any) -> list[tuple[bytes, bytes]]:
    args: dict[str, Any] = {"rank": 0, "world_size": 1, "batch_size": 8, **kw}
    with ShardReader(uri, "train", **args) as r:
        return [(b.features.numpy().tobytes(), b.labels.numpy().tobytes()) for b in r]


@pytest.mark.parametrize(
    "kw",
    [
        {"shuffle": False},
        {"world_size": 2, "rank": 1, "shuffle_buffer_rows": 24},
        {"world_size": 3, "rank": 2, "batch_size": 5, "drop_last": True, "seed": 4},
    ],
)
def test_reader_gives_the_parquet_batches(both: tuple[str, str], kw: dict[str, Any]) -> None:
    parquet, tfr = both
    assert ShardSet.open(tfr).file_format == "tfrecord"
    expected = _batches(parquet, **kw)
    assert len(expected) > 2 and _batches(tfr, **kw) == expected


def test_reader_resume_matches_across_formats(both: tuple[str, str]) -> None:
    parquet, tfr = both
    out = {}
    for name, uri in (("pq", parquet), ("tfr", tfr)):
        with ShardReader(uri, "train", rank=0, world_size=2, batch_size=8, seed=2) as r:
            r.load_state_dict({"epoch": 1, "batches_in_epoch": 3})
            batches = list(r)
            assert batches[0].features.dtype == torch.float32
            assert batches[0].labels.dtype == torch.int64
            out[name] = [
                (b.features.numpy().tobytes(), b.labels.numpy().tobytes()) for b in batches
            ]
    assert out["pq"] and out["pq"] == out["tfr"]


def test_reader_names_the_corrupt_shard(both: tuple[str, str], tmp_path: Path) -> None:
    tfr = shutil.copytree(both[1], tmp_path / "copy")
    shard = ShardSet.open(str(tfr)).split("train").shards[0]
    path = tfr / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with (
        pytest.raises(TFRecordError, match=rf"{shard.path}: record \d+: "),
        ShardReader(
            str(tfr), "train", rank=0, world_size=1, batch_size=8, shuffle=False, verify="size"
        ) as r,
    ):
        list(r)
    with pytest.raises(ShardSetError, match=rf"shard .*{shard.path} is corrupt: sha256"):
        ShardSet.open(str(tfr)).verify_shards([shard], "full")


def test_etl_format_key_is_validated(tmp_path: Path) -> None:
    from pipeline.core.configbase import ConfigError
    from preprocessing.config import EtlConfig
    from tests import corpus

    section = corpus.etl_section(str(tmp_path / "raw"), str(tmp_path / "out"), format="tfrecord")
    assert EtlConfig.from_mapping(section).format == "tfrecord"
    with pytest.raises(ConfigError, match=r"etl\.format.*'parquet', 'tfrecord'; got 'orc'"):
        EtlConfig.from_mapping({**section, "format": "orc"})


def test_decoding_paths_agree_and_check_structure(tmp_path: Path) -> None:
    """Runs of >= 64 records of one length are checked against the first one's structure
    bytes; others are parsed field by field; both must reject what is not our layout."""
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 100, 90)  # one-byte varints...
    keys[::9] = 10**12  # ...but every 9th record is longer: the 80 others are unevenly spaced
    feats, labels = rng.standard_normal((90, 3)).astype(np.float32), rng.integers(0, 100, 90)
    data = tfrecord.encode_examples(keys, feats, labels)
    path = write(tmp_path / "d.tfrecord", data)
    index = tfrecord.index_shard(LOCAL, path, 1000)
    got_f, got_l = tfrecord.read_row_group(LOCAL, path, index, 0, dim=3, label_dtype=I64)
    assert got_f.tobytes() == feats.tobytes() and got_l.tolist() == labels.tolist()
    for record in (70, 9):  # in the 80-record run; among the 10 others
        payloads = [r[2] for r in frames(data)]
        payloads[record] = payloads[record].replace(b"label", b"lAbel")
        bad = write(tmp_path / f"bad{record}.tfrecord", _frame(payloads))
        with pytest.raises(TFRecordError, match=rf"record {record}: no feature 'label'"):
            tfrecord.read_row_group(
                LOCAL, bad, tfrecord.index_shard(LOCAL, bad, 1000), 0, dim=3, label_dtype=I64
            )


def test_row_groups_with_string_keys_and_float_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    keys = pa.array([f"user-{i:04d}" if i % 10 else f"u{i}" for i in range(200)])
    feats, labels = rng.standard_normal((200, 6)), rng.standard_normal(200).astype(np.float32)
    path = write(tmp_path / "s.tfrecord", tfrecord.encode_examples(keys, feats, labels))
    index = tfrecord.index_shard(LOCAL, path, 64)
    f32 = np.dtype(np.float32)
    got = [tfrecord.read_row_group(LOCAL, path, index, g, dim=6, label_dtype=f32) for g in range(4)]
    assert np.concatenate([f for f, _ in got]).tobytes() == feats.astype(np.float32).tobytes()
    assert np.concatenate([lab for _, lab in got]).tobytes() == labels.tobytes()


def test_regression_shards_read_like_parquet(tmp_path: Path) -> None:
    parquet = make_shardset(
        tmp_path / "pq", rows_per_shard={"train": [90, 41]}, task="regression", row_group_rows=32
    )
    tfr = to_tfrecord(parquet, tmp_path / "tfr")
    for kw in ({"shuffle": False}, {"seed": 9, "shuffle_buffer_rows": 40}):
        expected = _batches(parquet, **kw)
        assert len(expected) == 17 and _batches(tfr, **kw) == expected
