from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.reader import (
    Batch,
    ShardReader,
    features_to_numpy,
    features_to_tensor,
    labels_to_numpy,
)
from pipeline.data.shardset import MANIFEST_NAME, ShardSet, ShardSetError
from tests.shards import make_shardset, read_split, shard_entry

UNEVEN = [100, 3, 0, 57]  # 160 rows; row groups of 16 rows


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("uneven")
    return make_shardset(
        root, rows_per_shard={"train": UNEVEN, "val": [5], "test": []}, row_group_rows=16, seed=3
    )


@pytest.fixture(scope="module")
def rows(uneven: str) -> dict[bytes, int]:
    """Row identity: the bytes of a feature vector → its index in manifest order."""
    _, feats, _ = read_split(uneven, "train")
    return {f.tobytes(): i for i, f in enumerate(feats)}


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ShardReader")]


def ids(batches: list[Batch], rows: dict[bytes, int]) -> list[int]:
    return [rows[f.tobytes()] for b in batches for f in b.features.numpy()]


def epoch(uri: str, **kw: object) -> list[Batch]:
    with ShardReader(uri, "train", **{"rank": 0, "world_size": 1, "batch_size": 8, **kw}) as r:  # type: ignore[arg-type]
        return list(r)


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.features, y.features) and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )


# -- Arrow → numpy/torch ----------------------------------------------------------------------
def test_fixed_size_list_is_zero_copy_and_honours_slices() -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
    flat = col.flatten()
    out = features_to_numpy(col, 4)
    assert out.ctypes.data == flat.buffers()[1].address
    np.testing.assert_array_equal(out, x)
    sliced = col.slice(3, 5)
    out = features_to_numpy(sliced, 4)
    assert out.ctypes.data == flat.buffers()[1].address + 3 * 4 * 4  # a view at the offset
    np.testing.assert_array_equal(out, x[3:8])
    t = features_to_tensor(sliced, 4)
    assert t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() == out.ctypes.data


def test_chunked_and_spark_style_list_columns() -> None:
    x = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)
    chunked = pa.chunked_array([fixed.slice(0, 5), fixed.slice(5, 0), fixed.slice(5, 7)])
    np.testing.assert_array_equal(features_to_numpy(chunked, 3), x)
    offsets = pa.array(np.arange(0, 37, 3, dtype=np.int32))
    listed = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1).astype(np.float64)))
    np.testing.assert_array_equal(features_to_numpy(listed.slice(2, 6), 3), x[2:8])
    assert features_to_numpy(listed, 3).dtype == np.float32
    assert features_to_numpy(pa.chunked_array([], fixed.type), 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())), "row 1 has 1 values"),
        (pa.array([[1.0, 2.0], None], pa.list_(pa.float32())), "null rows"),
        (pa.array([[1.0, None]], pa.list_(pa.float32())), "null elements"),
        (pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32(), 3)), "vectors of 3 values"),
        (pa.array([1.0, 2.0]), "expected a list of floats"),
    ],
)
def test_bad_feature_columns_are_named(column: pa.Array, match: str) -> None:
    with pytest.raises(ShardSetError, match=f"part-7.parquet: .*{match}"):
        features_to_numpy(column, 2, where="part-7.parquet")


def test_labels() -> None:
    assert labels_to_numpy(pa.array([0.0, 2.0]), np.dtype(np.int64)).tolist() == [0, 2]
    with pytest.raises(ShardSetError, match="non-integer"):
        labels_to_numpy(pa.array([0.5]), np.dtype(np.int64))
    with pytest.raises(ShardSetError, match="nulls"):
        labels_to_numpy(pa.array([1, None]), np.dtype(np.int64))


# -- content ------------------------------------------------------------------------------------
def test_batches_equal_the_parquet_content(uneven: str) -> None:
    _, feats, labels = read_split(uneven, "train")
    batches = epoch(uneven, shuffle=False, batch_size=48)
    assert [len(b.labels) for b in batches] == [48, 48, 48, 16]
    for b in batches:
        assert b.features.dtype == torch.float32 and b.features.is_contiguous()
        assert b.features.shape[1] == 8 and b.labels.dtype == torch.int64
        assert b.labels.is_contiguous()
    np.testing.assert_array_equal(torch.cat([b.features for b in batches]).numpy(), feats)
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), labels)


def test_regression_and_spark_list_shards(tmp_path: Path) -> None:
    uri = make_shardset(
        tmp_path,
        rows_per_shard={"train": [30, 20]},
        task="regression",
        feature_type="list",
        row_group_rows=7,
    )
    _, feats, labels = read_split(uri, "train")
    batches = epoch(uri, shuffle=False, batch_size=16)
    assert batches[0].labels.dtype == torch.float32
    np.testing.assert_array_equal(torch.cat([b.features for b in batches]).numpy(), feats)
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), labels)


# -- equal steps, every row once ---------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize(("batch_size", "drop_last"), [(7, False), (7, True), (64, False)])
def test_equal_steps_and_every_row_once(
    uneven: str, rows: dict[bytes, int], world_size: int, batch_size: int, drop_last: bool
) -> None:
    n = sum(UNEVEN)
    per_rank = n // world_size
    dropped_sets = []
    for ep in range(3):
        seen: list[int] = []
        for rank in range(world_size):
            with ShardReader(
                uneven,
                "train",
                rank=rank,
                world_size=world_size,
                batch_size=batch_size,
                drop_last=drop_last,
                shuffle_buffer_rows=32,
            ) as r:
                assert r.rows_per_rank == per_rank
                expected = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
                assert r.steps_per_epoch == expected
                r.set_epoch(ep)
                batches = list(r)
            assert len(batches) == r.steps_per_epoch
            assert all(len(b.labels) == batch_size for b in batches[:-1])
            seen += ids(batches, rows)
        assert len(seen) == len(set(seen))  # no row twice
        if not drop_last:
            assert len(seen) == per_rank * world_size and n - len(seen) <= world_size - 1
        dropped_sets.append(frozenset(range(n)) - frozenset(seen))
    if world_size == 3 and not drop_last:  # 160 % 3 == 1: a different row each epoch
        assert len(set(dropped_sets)) > 1


@pytest.mark.parametrize("world_size", [1, 4, 7])
def test_empty_split_and_fewer_rows_than_ranks(uneven: str, world_size: int) -> None:
    for split in ("test", "val"):  # 0 rows; 5 rows
        for rank in range(world_size):
            with ShardReader(uneven, split, rank=rank, world_size=world_size, batch_size=4) as r:
                n = 0 if split == "test" else 5
                assert r.rows_per_rank == n // world_size
                assert r.steps_per_epoch == -(-(n // world_size) // 4)
                assert len(list(r)) == r.steps_per_epoch
                assert r.state_dict()["epoch"] == 1
    assert not reader_threads()


# -- order ---------------------------------------------------------------------------------------
def test_same_seed_same_order_other_epoch_other_order(uneven: str, rows: dict[bytes, int]) -> None:
    a, b = epoch(uneven, seed=5), epoch(uneven, seed=5)
    assert same(a, b)
    assert not same(a, epoch(uneven, seed=6))
    with ShardReader(uneven, "train", rank=0, world_size=1, batch_size=8, seed=5) as r:
        e0, e1 = list(r), list(r)  # a finished epoch moves the reader to the next one
    assert same(e0, a) and not same(e0, e1)
    assert sorted(ids(e0, rows)) == sorted(ids(e1, rows)) == list(range(sum(UNEVEN)))
    assert ids(e0, rows) != sorted(ids(e0, rows))  # shuffled


def test_shuffle_mixes_row_groups_within_a_window(uneven: str, rows: dict[bytes, int]) -> None:
    first = ids(epoch(uneven, seed=1, batch_size=32, shuffle_buffer_rows=64)[:1], rows)
    assert len({i // 16 for i in first}) > 2  # rows of several 16-row groups in one batch


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 9])
def test_resume_mid_epoch_is_exact(uneven: str, consumed: int) -> None:
    kw = {"rank": 1, "world_size": 2, "batch_size": 8, "seed": 11, "shuffle_buffer_rows": 32}
    with ShardReader(uneven, "train", **kw) as r:  # type: ignore[arg-type]
        r.set_epoch(2)
        full = list(r)
    assert len(full) == 10
    with ShardReader(uneven, "train", **kw) as r:  # type: ignore[arg-type]
        r.set_epoch(2)
        it = iter(r)
        head = [next(it) for _ in range(consumed)]
        state = r.state_dict()
    assert state == {
        "epoch": 2,
        "batches_in_epoch": consumed,
        "world_size": 2,
        "batch_size": 8,
        "seed": 11,
        "segments": [],  # no resize: no finished segment (test_reader_elastic.py)
    }
    assert all(type(v) is int for k, v in state.items() if k != "segments")
    with ShardReader(uneven, "train", **kw) as r:  # type: ignore[arg-type]
        r.load_state_dict(state)
        r.set_epoch(2)  # what a training loop does after loading: keeps the position
        rest = list(r)
    assert same(head + rest, full)


def test_resume_reads_only_what_remains(uneven: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *a: object, **k: object) -> pa.Table:
        calls.append(i)
        return original(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    epoch(uneven, batch_size=8, shuffle_buffer_rows=32)
    full = len(calls)
    calls.clear()
    with ShardReader(
        uneven, "train", rank=0, world_size=1, batch_size=8, shuffle_buffer_rows=32
    ) as r:
        r.load_state_dict({"epoch": 0, "batches_in_epoch": 16})  # the last window of 5
        assert len(list(r)) == 4
    assert 0 < len(calls) < full / 2


def test_resume_at_epoch_end_goes_to_next_epoch(uneven: str) -> None:
    with ShardReader(uneven, "train", rank=0, world_size=1, batch_size=64) as r:
        r.load_state_dict({"epoch": 4, "batches_in_epoch": 3})
        assert r.state_dict()["epoch"] == 5 and r.state_dict()["batches_in_epoch"] == 0
        with pytest.raises(ValueError, match=r"outside 0\.\.3"):
            r.load_state_dict({"epoch": 0, "batches_in_epoch": 4})
        with pytest.raises(ValueError, match="lacks batches_in_epoch"):
            r.load_state_dict({"epoch": 0})


def test_resume_with_other_world_size_maps_samples(
    uneven: str, caplog: pytest.LogCaptureFixture
) -> None:
    with ShardReader(uneven, "train", rank=0, world_size=2, batch_size=8) as r:
        r.load_state_dict(
            {"epoch": 1, "batches_in_epoch": 6, "world_size": 1, "batch_size": 8, "seed": 0}
        )
        assert r.state_dict()["batches_in_epoch"] == 3
    assert "not exactly" in caplog.text


def test_set_epoch_or_new_iteration_ends_the_old_one(uneven: str) -> None:
    with ShardReader(uneven, "train", rank=0, world_size=1, batch_size=8) as r:
        old = iter(r)
        next(old)
        r.set_epoch(3)
        with pytest.raises(RuntimeError, match="ended by set_epoch"):
            next(old)
        assert r.state_dict()["batches_in_epoch"] == 0
        assert len(list(r)) == r.steps_per_epoch
    assert not reader_threads()


# -- verification ----------------------------------------------------------------------------
def shard_file(uri: str, index: int = 0) -> Path:
    shards = ShardSet.open(uri)
    return Path(shards.shard_path(shards.split("train").shards[index]))


@pytest.fixture()
def fresh(tmp_path: Path) -> str:
    return make_shardset(tmp_path, rows_per_shard={"train": [40, 30]}, row_group_rows=10)


def test_bit_flip_is_caught_by_sha256(fresh: str) -> None:
    path = shard_file(fresh, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match=rf"{path.name} is corrupt: sha256"):
        epoch(fresh, verify="auto")
    with pytest.raises(ShardSetError, match=rf"{path.name} is corrupt"):
        epoch(fresh, verify="full")


def test_truncation_and_missing_shard_are_named(fresh: str) -> None:
    path = shard_file(fresh, 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardSetError, match=rf"{path.name} has \d+ bytes, the manifest says"):
        epoch(fresh, verify="size")
    path.unlink()
    with pytest.raises(ShardSetError, match=rf"{path.name} is missing"):
        epoch(fresh, verify="size")


def test_row_count_mismatch_is_named_even_without_verification(fresh: str) -> None:
    path = shard_file(fresh, 0)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 39), path)  # one row fewer; manifest updated but for rows
    manifest_path = Path(fresh) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    entry = shard_entry(Path(fresh), manifest["splits"]["train"]["shards"][0]["path"], 40)
    manifest["splits"]["train"]["shards"][0] = entry
    manifest_path.write_text(json.dumps(manifest))
    for verify in ("auto", "none"):
        with pytest.raises(
            ShardSetError,
            match=rf"{path.name} has 39 rows in its Parquet footer, "
            "the manifest says 40",
        ):
            epoch(fresh, verify=verify)


def test_manifest_rows_must_add_up(fresh: str) -> None:
    manifest_path = Path(fresh) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["train"]["rows"] = 71
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match="says 71 rows but its shards add up to 70"):
        ShardReader(fresh, "train", rank=0, world_size=1, batch_size=4)


# -- the prefetch thread ----------------------------------------------------------------------
def test_reader_error_reaches_the_consumer_with_the_file(
    fresh: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pq.ParquetFile.read_row_group

    def failing(self: pq.ParquetFile, i: int, *a: object, **k: object) -> pa.Table:
        if i == 2:  # shards of 4 and 3 row groups, read in order: part-00000's fails first
            raise OSError("disk on fire")
        return original(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", failing)
    r = ShardReader(
        fresh,
        "train",
        rank=0,
        world_size=1,
        batch_size=5,
        shuffle=False,
        shuffle_buffer_rows=5,
        prefetch_batches=1,
    )
    got: list[Batch] = []
    with pytest.raises(
        ShardSetError,
        match=r"part-00000-\w+\.parquet: reading row group 2 failed: "
        "disk on fire",
    ):
        got.extend(r)
    assert len(got) == 4  # the batches before the failure arrived
    r.close()
    assert not reader_threads()


def test_corrupt_pages_without_verification_name_the_file(fresh: str) -> None:
    path = shard_file(fresh, 0)
    data = bytearray(path.read_bytes())
    data[4:400] = bytes(396)  # zero the first data pages, keep size and footer
    path.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match=path.name):
        epoch(fresh, verify="none", shuffle=False)
    assert not reader_threads()


def test_close_and_break_leave_no_thread(uneven: str) -> None:
    r = ShardReader(uneven, "train", rank=0, world_size=1, batch_size=2, prefetch_batches=2)
    it: Iterator[Batch] = iter(r)
    next(it)  # the thread is now blocked on a full queue
    assert reader_threads()  # the prefetch thread and its read pool
    r.close()
    assert not reader_threads()
    with pytest.raises(RuntimeError, match="closed"):
        iter(r)
    with ShardReader(uneven, "train", rank=0, world_size=1, batch_size=2) as r:
        for _ in r:
            break
        assert r.state_dict()["batches_in_epoch"] == 1
    assert not reader_threads()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "world_size": 2}, "rank must be < world_size"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"verify": "sha"}, "verify must be one of"),
        ({"seed": -1}, "seed must be"),
        ({"prefetch_batches": 0}, "prefetch_batches must be"),
    ],
)
def test_bad_arguments_are_named(uneven: str, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"rank": 0, "world_size": 1, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        ShardReader(uneven, "train", **args)  # type: ignore[arg-type]


def test_an_iterator_superseded_before_its_start_starts_nothing(uneven: str) -> None:
    with ShardReader(uneven, "train", rank=0, world_size=1, batch_size=8) as r:
        stale, current = iter(r), iter(r)
        first = next(current)
        with pytest.raises(RuntimeError, match="newer iteration"):
            next(stale)
        assert len(list(current)) == r.steps_per_epoch - 1 and first.labels.shape == (8,)
    assert not reader_threads()
