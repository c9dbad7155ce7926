"""Elastic resume of ShardReader (issue #25): an epoch read in segments at other world sizes.

Every row of an epoch is read once across the segments (none twice; only the final
segment's tail of fewer than W rows may be left out), the same schedule of world sizes
gives the same batches, and a run that never resizes reads what it read before segments.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pipeline.data.reader import Batch, ShardReader
from tests.shards import make_shardset, read_split

SHARDS = [100, 37, 0, 64, 51]  # 252 rows = 12 * 21; row groups of 16 rows
N = sum(SHARDS)
SEED = 7
Phase = tuple[int, int, int | None]  # world size, batch size, batches per rank (None: to the end)


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("elastic")
    return make_shardset(root, rows_per_shard={"train": SHARDS}, row_group_rows=16, seed=5)


@pytest.fixture(scope="module")
def rows(uri: str) -> dict[bytes, int]:
    """Row identity: the bytes of a feature vector → its index in manifest order."""
    _, feats, _ = read_split(uri, "train")
    return {f.tobytes(): i for i, f in enumerate(feats)}


def reader(uri: str, rank: int, world: int, batch: int, **kw: Any) -> ShardReader:
    kw = {"seed": SEED, "shuffle_buffer_rows": 48, **kw}
    return ShardReader(uri, "train", rank=rank, world_size=world, batch_size=batch, **kw)


def run(
    uri: str,
    phases: Sequence[Phase],
    state: dict[str, Any] | None = None,
    *,
    elastic: bool = True,
    **kw: Any,
) -> tuple[list[list[list[Batch]]], dict[str, Any]]:
    """Each phase on fresh readers of every rank, resumed from the last phase's state.

    Returns each phase's batches per rank, and the state after the last phase (the same on
    every rank: asserted).
    """
    out = []
    for world, batch, count in phases:
        states, ranks = [], []
        for rank in range(world):
            with reader(uri, rank, world, batch, **kw) as r:
                if state is not None:
                    r.load_state_dict(state, elastic=elastic)
                steps = r.steps_per_epoch - r.state_dict()["batches_in_epoch"]
                ranks.append(list(itertools.islice(r, count)))
                assert len(ranks[-1]) == (steps if count is None else count)
                states.append(r.state_dict())
        assert all(s == states[0] for s in states)
        state = states[0]
        out.append(ranks)
    assert state is not None
    return out, state


def ids(batches: Sequence[Batch], rows: dict[bytes, int]) -> list[int]:
    return [rows[f.tobytes()] for b in batches for f in b.features.numpy()]


def read_rows(phases: list[list[list[Batch]]], rows: dict[bytes, int]) -> list[int]:
    return [i for ranks in phases for batches in ranks for i in ids(batches, rows)]


def same(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.features, y.features) and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )


# -- every row once -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("phases", "missing"),
    [
        ([(3, 4, 5), (2, 6, None)], 0),
        ([(2, 6, 5), (3, 4, None)], 0),
        ([(3, 4, 3), (2, 6, 4), (3, 4, None)], 0),
        ([(3, 4, 3), (2, 5, 4), (4, 3, None)], 0),  # the global batch changes: 12, 10, 12
        ([(2, 7, 3), (3, 4, 4), (2, 5, None)], 0),  # 14, 12, 10
        ([(3, 4, 3), (5, 4, None)], 1),  # 216 rows left for 5 ranks: the last one is dropped
        ([(3, 4, 3), (5, 4, 4), (2, 6, None)], 0),  # … unless the segment is interrupted
        ([(4, 5, 0), (3, 4, 2), (5, 3, None)], (N - 24) % 5),  # a resize before any batch
    ],
)
def test_every_row_of_the_epoch_once_across_resizes(
    uri: str, rows: dict[bytes, int], phases: list[Phase], missing: int
) -> None:
    out, state = run(uri, phases)
    seen = read_rows(out, rows)
    twice = [i for i, c in collections.Counter(seen).items() if c > 1]
    assert not twice
    assert len(seen) == N - missing
    assert missing <= phases[-1][0] - 1
    assert state == {  # the epoch ended: the next starts afresh at the last world size
        "epoch": 1,
        "batches_in_epoch": 0,
        "world_size": phases[-1][0],
        "batch_size": phases[-1][1],
        "seed": SEED,
        "segments": [],
    }


def test_segments_in_the_state_and_the_current_segment_s_geometry(uri: str) -> None:
    _, state = run(uri, [(3, 4, 3), (2, 6, 4)])
    assert state["segments"] == [[3, 4, 3]] and state["batches_in_epoch"] == 4
    with reader(uri, 1, 2, 6) as r:
        r.load_state_dict(state)
        assert r.segments == ((3, 4, 3),)
        assert r.rows_per_rank == (N - 36) // 2 and r.steps_per_epoch == (N - 36) // 12
        # as if saved by 4 ranks of batches of 3: 4 * 3 * 4 rows read in segment 1
        r.load_state_dict(state | {"world_size": 4, "batch_size": 3}, elastic=True)
        assert r.segments == ((3, 4, 3), (4, 3, 4))
        assert r.state_dict()["batches_in_epoch"] == 0
        left = N - 36 - 48
        assert r.rows_per_rank == left // 2 and r.steps_per_epoch == -(-(left // 2) // 6)
        r.set_epoch(1)  # another epoch: segment 0 again
        assert r.segments == () and r.rows_per_rank == N // 2 and r.steps_per_epoch == 21


def test_without_shuffle_and_with_drop_last(uri: str, rows: dict[bytes, int]) -> None:
    out, _ = run(uri, [(3, 4, 3), (2, 6, 4), (5, 4, None)], shuffle=False)
    seen = read_rows(out, rows)
    assert len(set(seen)) == len(seen) == N - (N - 36 - 48) % 5
    out, _ = run(uri, [(3, 5, 3), (2, 7, None)], drop_last=True)
    seen = read_rows(out, rows)
    per_rank = (N - 45) // 2  # 103: a partial batch of 5 rows on each rank is dropped
    assert len(set(seen)) == len(seen) == 45 + 2 * (per_rank - per_rank % 7)


def test_the_epoch_after_a_resized_one_is_a_plain_epoch(uri: str) -> None:
    out, _ = run(uri, [(3, 4, 3), (2, 6, None), (2, 6, 5)])
    for rank in range(2):
        with reader(uri, rank, 2, 6) as r:
            r.set_epoch(1)
            assert same(out[2][rank], list(itertools.islice(r, 5)))


# -- the same schedule, the same batches ----------------------------------------------------------
def test_the_same_resizes_give_the_same_batches(uri: str) -> None:
    phases: list[Phase] = [(3, 4, 3), (2, 5, 4), (4, 3, None)]
    first, _ = run(uri, phases)
    again, _ = run(uri, phases)
    for a, b in zip(first, again, strict=True):
        assert all(same(x, y) for x, y in zip(a, b, strict=True))
    other, _ = run(uri, [(3, 4, 3), (2, 5, 5), (4, 3, None)])  # another resize point
    assert not same(first[2][0], other[2][0])


def test_tfrecord_shards_give_the_same_batches(uri: str, tmp_path: Path) -> None:
    tf = make_shardset(
        tmp_path,
        rows_per_shard={"train": SHARDS},
        row_group_rows=16,
        seed=5,
        file_format="tfrecord",
    )
    phases: list[Phase] = [(3, 4, 3), (2, 6, None)]
    for a, b in zip(run(uri, phases)[0], run(tf, phases)[0], strict=True):
        assert all(same(x, y) for x, y in zip(a, b, strict=True))


# -- no resize, no change ------------------------------------------------------------------------
# The rows each rank read in epochs 0 and 1 for these worlds, computed by the reader before
# segments existed (main at 3db0eee): a run that never resizes must read them still.
GOLDEN = "a84354a2e8dbe484ccef2072ce5225801b8da2a4b331fbd943a1331e38534de2"


def test_a_run_without_resize_reads_what_it_read_before(uri: str, rows: dict[bytes, int]) -> None:
    out = []
    for world, batch in [(3, 4), (2, 6), (1, 8), (4, 5)]:
        for rank in range(world):
            with reader(uri, rank, world, batch) as r:
                for e in range(2):
                    r.set_epoch(e)
                    out.append(ids(list(r), rows))
    assert hashlib.sha256(repr(out).encode()).hexdigest() == GOLDEN


@pytest.mark.parametrize("elastic", [False, True])
def test_resume_at_the_same_world_size_is_exact(uri: str, elastic: bool) -> None:
    whole, _ = run(uri, [(3, 4, None)])
    part, state = run(uri, [(3, 4, 5)])
    assert state["segments"] == [] and state["batches_in_epoch"] == 5
    rest, _ = run(uri, [(3, 4, None)], state, elastic=elastic)
    for w, p, q in zip(whole[0], part[0], rest[0], strict=True):
        assert same(w, p + q)


def test_resume_with_segments_at_the_same_world_size_is_exact(uri: str) -> None:
    _, state = run(uri, [(3, 4, 3)])
    whole, _ = run(uri, [(2, 6, None)], state)
    part, mid = run(uri, [(2, 6, 4)], state)
    assert mid["segments"] == [[3, 4, 3]] and mid["batches_in_epoch"] == 4
    for elastic in (False, True):
        rest, _ = run(uri, [(2, 6, None)], mid, elastic=elastic)
        for w, p, q in zip(whole[0], part[0], rest[0], strict=True):
            assert same(w, p + q)


def test_an_old_state_without_segments_resizes_like_an_empty_list(uri: str) -> None:
    _, state = run(uri, [(3, 4, 3)])
    old = {k: v for k, v in state.items() if k != "segments"}
    a, _ = run(uri, [(2, 6, None)], state)
    b, _ = run(uri, [(2, 6, None)], old)
    assert all(same(x, y) for x, y in zip(a[0], b[0], strict=True))


# -- errors --------------------------------------------------------------------------------------
def test_another_seed_is_refused_for_an_exact_resume(uri: str) -> None:
    _, state = run(uri, [(3, 4, 3)])
    with reader(uri, 0, 2, 6, seed=8) as r, pytest.raises(ValueError, match=r"seed=7.*seed=8"):
        r.load_state_dict(state, elastic=True)
    _, mid = run(uri, [(2, 6, 2)], state)
    with reader(uri, 0, 2, 6, seed=8) as r, pytest.raises(ValueError, match="seed=7"):
        r.load_state_dict(mid)  # segments cannot be approximated either


def test_segments_at_another_world_size_need_elastic(uri: str) -> None:
    _, state = run(uri, [(3, 4, 3)])
    _, mid = run(uri, [(2, 6, 2)], state)
    with reader(uri, 0, 3, 4) as r:
        with pytest.raises(ValueError, match=r"world_size=2, batch_size=6.*elastic=True"):
            r.load_state_dict(mid)
        assert r.state_dict()["segments"] == []  # unchanged


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        ([[3, 4]], r"segments\[0\] must be"),
        ([[0, 4, 1]], r"segments\[0\] must be"),
        ("3,4,1", "must be a list"),
        ([[3, 4, 22]], "segment 0 of epoch 0 .* has 22 batches, but it has only 21 steps"),
    ],
)
def test_malformed_segments_are_named(uri: str, segments: object, match: str) -> None:
    state = {"epoch": 0, "batches_in_epoch": 0, "world_size": 2, "batch_size": 6, "seed": SEED}
    with reader(uri, 0, 2, 6) as r, pytest.raises(ValueError, match=match):
        r.load_state_dict(state | {"segments": segments})


# -- the training loop's weights over a segment -------------------------------------------------
def test_the_loop_weighs_a_segment_s_last_micro_batches_by_the_segment_s_rows(uri: str) -> None:
    """Every optimizer step's micro-batch weights sum to 1, the segment's last step too.

    After 3 ranks read 3 batches of 4, 2 ranks share the 216 rows left: 108 each, 21 batches
    of 5 and one of 3. The reader takes the next epoch's shape (126 rows per rank) before it
    yields an epoch's last batch; the loop weighs that batch by the segment it belongs to.
    """
    from pipeline.train.loop import _Trainer

    _, state = run(uri, [(3, 4, 3)])
    groups: list[list[tuple[int, float]]] = [[]]
    with reader(uri, 0, 2, 5) as r:
        r.load_state_dict(state, elastic=True)
        stub = SimpleNamespace(
            train_reader=r,
            cfg=SimpleNamespace(grad_accum_steps=2),
            micro=0,
            inputs=SimpleNamespace(prepare=lambda batch, device: (batch.features, batch.labels)),
            device=torch.device("cpu"),
        )
        stub._rows = lambda first, end: _Trainer._rows(stub, first, end)  # type: ignore[arg-type]
        for _, y, ends, weight in _Trainer._micro_batches(stub):  # type: ignore[arg-type]
            groups[-1].append((len(y), weight))
            if ends:
                groups.append([])
    assert groups.pop() == []
    assert [n for g in groups for n, _ in g] == [5] * 21 + [3]
    for group in groups:
        assert sum(w for _, w in group) == pytest.approx(1.0), group
    assert groups[-1] == [(5, pytest.approx(5 / 8)), (3, pytest.approx(3 / 8))]
