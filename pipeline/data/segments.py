"""Elastic resume of :class:`pipeline.data.reader.ShardReader`: an epoch read in segments.

A world-size (or batch-size) change mid-epoch ends the epoch's current *segment* and starts
a new one over the rows not yet consumed (the reader's module docstring, "Elastic resume").
Everything here is computed from the shards' row-group sizes and the seeds, never from
data: the rows a finished segment consumed are found by replaying, for each of its ranks,
the :class:`pipeline.data.prefetch.Draws` of the batches it yielded.

Rows are named by their *position* in the epoch's row space of segment 0 (the split's
shards, in the epoch's shard order, concatenated): ``0 .. N-1``. The row space of a later
segment is the previous one minus the rows it consumed, in the same order — ascending
positions —, so it is one sorted array of positions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from pipeline.data.prefetch import PIECE_ORDER, WINDOW_ORDER, Draws, Piece, rng, stream_key

__all__ = [
    "Knobs",
    "Layout",
    "Segment",
    "consumed",
    "parse",
    "rank_pieces",
    "remaining",
    "resume",
    "steps",
    "window_rows",
]

Segment = tuple[int, int, int]
"""A finished segment of an epoch: ``(world_size, batch_size, batches)``."""

_TAKE: Final = 1 << 16  # rows replayed per Draws.take (one big take copies quadratically)


@dataclass(frozen=True, slots=True)
class Knobs:
    """What a rank's plan and draws depend on besides the sizes: the reader's settings."""

    seed: int
    shuffle: bool
    drop_last: bool
    window: int  # the shuffle window in rows, before :func:`window_rows` rounds it
    chunk_rows: int  # Draws' chunk (:func:`pipeline.data.prefetch.chunk_rows`)


def window_rows(window: int, batch_size: int) -> int:
    """The window rounded down to whole batches, at least one (as the reader has it)."""
    return max(1, window // batch_size) * batch_size


def steps(rows_per_rank: int, batch_size: int, drop_last: bool) -> int:
    """The batches of a rank with ``rows_per_rank`` rows."""
    full, rest = divmod(rows_per_rank, batch_size)
    return full + (1 if rest and not drop_last else 0)


class Layout:
    """The epoch's row space: each (shard, row group) of the shard order and its first position.

    ``row_groups(shard)`` gives the row counts of a shard's row groups (its index); it is
    asked only for shards with rows.
    """

    def __init__(
        self, order: Sequence[int], rows: Sequence[int], row_groups: Callable[[int], list[int]]
    ) -> None:
        shards, groups, sizes = [], [], []
        for index in order:
            if not rows[index]:
                continue
            for rg, n in enumerate(row_groups(index)):
                shards.append(index)
                groups.append(rg)
                sizes.append(n)
        self._shards, self._groups = shards, groups
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.num_rows = int(self.starts[-1])
        self._unit = {(s, g): u for u, (s, g) in enumerate(zip(shards, groups, strict=True))}

    def pieces(self, positions: np.ndarray) -> list[Piece]:
        """The pieces of ascending ``positions``, one per row group they touch, in order.

        A piece whose rows are all of a contiguous run is a plain ``[start, stop)`` piece
        (segment 0's pieces are all such); otherwise it lists its rows.
        """
        if not len(positions):
            return []
        unit = np.searchsorted(self.starts, positions, side="right") - 1
        local = positions - self.starts[unit]
        cuts = [0, *(np.flatnonzero(np.diff(unit)) + 1).tolist(), len(positions)]
        out = []
        for a, b in itertools.pairwise(cuts):
            u, lo, hi = int(unit[a]), int(local[a]), int(local[b - 1]) + 1
            rows = None if hi - lo == b - a else local[a:b].copy()
            out.append(Piece(self._shards[u], self._groups[u], lo, hi, rows))
        return out

    def positions(self, piece: Piece) -> np.ndarray:
        """The positions of a piece's rows, in the order the piece gives them."""
        base = self.starts[self._unit[piece.shard, piece.row_group]]
        local = np.arange(piece.start, piece.stop) if piece.rows is None else piece.rows
        return base + local


def rank_pieces(
    layout: Layout,
    space: np.ndarray,
    world: int,
    rank: int,
    epoch: int,
    segment: int,
    knobs: Knobs,
) -> list[Piece]:
    """Rank ``rank``'s stream in a segment: its contiguous slice of ``space``, permuted."""
    per_rank = len(space) // world
    pieces = layout.pieces(space[rank * per_rank : (rank + 1) * per_rank])
    if knobs.shuffle:
        key = stream_key(knobs.seed, epoch, PIECE_ORDER, rank, segment)
        pieces = [pieces[i] for i in rng(*key).permutation(len(pieces))]
    return pieces


def consumed(
    layout: Layout,
    space: np.ndarray,
    done: Segment,
    epoch: int,
    segment: int,
    knobs: Knobs,
) -> np.ndarray:
    """The positions the ranks of a finished segment read: its draws replayed, nothing read."""
    world, batch_size, batches = done
    per_rank = len(space) // world
    most = steps(per_rank, batch_size, knobs.drop_last)
    if batches > most:
        raise ValueError(
            f"reader state: segment {segment} of epoch {epoch} (world_size={world}, "
            f"batch_size={batch_size}) has {batches} batches, but it has only {most} steps"
        )
    count = min(batches * batch_size, per_rank)  # the rows Producer takes for them
    window = window_rows(knobs.window, batch_size)
    out = []
    for rank in range(world):
        pieces = rank_pieces(layout, space, world, rank, epoch, segment, knobs)
        if not count or not pieces:
            continue
        sizes = [p.size for p in pieces]
        key = stream_key(knobs.seed, epoch, WINDOW_ORDER, rank, segment)
        draws = Draws(sizes, window, key if knobs.shuffle else None, knobs.chunk_rows)
        flat = np.concatenate([layout.positions(p) for p in pieces])
        offsets = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype(np.int64)
        left = count
        while left:
            ids, rows = draws.take(min(left, _TAKE))
            out.append(flat[offsets[ids] + rows])
            left -= len(ids)
    return np.concatenate(out) if out else np.empty(0, np.int64)


def remaining(layout: Layout, epoch: int, segments: Sequence[Segment], knobs: Knobs) -> np.ndarray:
    """The row space (ascending positions) of the segment after ``segments``."""
    space = np.arange(layout.num_rows, dtype=np.int64)
    if not segments:
        return space
    left = np.ones(layout.num_rows, bool)
    for segment, done in enumerate(segments):
        left[consumed(layout, space, done, epoch, segment, knobs)] = False
        space = np.flatnonzero(left)
    return space


def parse(value: object) -> tuple[Segment, ...]:
    """A state's ``segments`` (``[[world_size, batch_size, batches], ...]``) checked."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValueError(f"reader state segments must be a list, got {value!r}")
    out = []
    for i, seg in enumerate(value):
        ok = isinstance(seg, list | tuple) and len(seg) == 3
        ok = ok and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in seg)
        if not ok or seg[0] < 1 or seg[1] < 1 or seg[2] < 0:
            raise ValueError(
                f"reader state segments[{i}] must be [world_size >= 1, batch_size >= 1, "
                f"batches >= 0], got {seg!r}"
            )
        out.append((int(seg[0]), int(seg[1]), int(seg[2])))
    return tuple(out)


def resume(
    state: Mapping[str, Any], mine: Mapping[str, Any], *, elastic: bool
) -> tuple[tuple[Segment, ...], int, list[str]]:
    """What a reader state means to a reader whose own state is ``mine``.

    ``(finished segments, batches yielded in the current segment, changed)``; ``changed``
    names the keys that differ when the position can only be approximated (a state of
    segment 0 of another world size, batch size or seed, not ``elastic``), else ``[]``.
    """
    segments, done = parse(state.get("segments")), int(state["batches_in_epoch"])
    old = {k: int(state.get(k, mine[k])) for k in ("world_size", "batch_size", "seed")}
    changed = [k for k, v in old.items() if v != mine[k]]
    resized = bool({"world_size", "batch_size"} & set(changed))
    if (elastic or segments) and old["seed"] != mine["seed"]:
        raise ValueError(
            f"reader state was saved with seed={old['seed']}, this reader has "
            f"seed={mine['seed']}: an exact (elastic) resume needs the same seed"
        )
    if resized and elastic:
        if done:  # a segment that read nothing is no segment
            segments = (*segments, (old["world_size"], old["batch_size"], done))
        return segments, 0, []
    if resized and segments:
        raise ValueError(
            f"reader state of segment {len(segments)} of epoch {state['epoch']} was saved "
            f"with world_size={old['world_size']}, batch_size={old['batch_size']}; this "
            f"reader has world_size={mine['world_size']}, batch_size={mine['batch_size']}: "
            "pass elastic=True to continue exactly"
        )
    return segments, done, changed
