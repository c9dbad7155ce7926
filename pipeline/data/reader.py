"""Arrow → torch reader for a shard set: equal steps on every rank, bounded shuffle, exact resume.

Which rows a rank reads (the drop policy; nothing is padded or repeated)
-----------------------------------------------------------------------
For epoch ``e`` every rank computes the same shard order — a permutation seeded by
``(seed, e)``, or the manifest order when ``shuffle=False`` — and views the concatenation of
the split's shards as one row space of ``N`` rows. Rank ``r`` of ``W`` owns the contiguous
slice ``[r*P, (r+1)*P)`` with ``P = N // W`` (:attr:`ShardReader.rows_per_rank`); the last
``N - W*P`` rows of that order (at most ``W - 1``) are **dropped** for the epoch. The shard
order changes with the epoch, so different rows are dropped each epoch (with
``shuffle=False`` always the same last rows). Every rank thus has exactly ``P`` rows and
``ceil(P / batch_size)`` steps (``P // batch_size`` with ``drop_last``: the partial last
batch is dropped too), whatever the shard sizes. Only the final batch of an epoch may be
smaller than ``batch_size``, and it has the same size on every rank. Empty shards take no
part; a split with fewer rows than ranks (or none) gives ``P = 0`` and no steps, on every
rank alike, so no rank waits for another.

Batches
-------
A :class:`Batch` maps the name of every input column (:func:`pipeline.data.arrays.input_columns`:
all columns but key and label, in manifest order) to a ``[B, *shape]`` tensor in the column's
stored dtype — uint8 images stay uint8 ``[B, H, W, C]`` until the training device has them
(:mod:`pipeline.train.inputs` normalizes there) — plus the labels; ``batch.features`` is the
tabular vector. Text columns (int32 token ids) are padded to their ``max_length`` in the
shards; ``text_padding="batch"`` (the default) cuts each batch's ids after the last position
any of its rows uses, so a batch of short texts carries no columns of padding — measured in
``bench/text.py`` (bench/RESULTS.md, "Text"); ``"fixed"`` keeps ``max_length``. Which rows
make a batch does not change, so equal steps, shuffle and resume hold alike. All columns of a
row move together, so the row policy, shuffle and resume below hold for every column alike.

Shuffle
-------
A rank reads only the Parquet row groups that overlap its slice. These pieces
(row group ∩ slice) are read in an order permuted by ``(seed, e, r)`` — the rank's stream —
and enter a window that fills and drains continuously (:class:`pipeline.data.prefetch.Draws`):
pieces enter in stream order while the window's pieces hold at most ``S`` rows
(``shuffle_buffer_rows``, or fewer so that they take at most ``shuffle_buffer_bytes`` of
input columns — large images —; at least one piece, and always enough rows for the next
batch); rows are drawn in chunks (1,024 rows, or about a MiB of inputs when rows are
smaller than a KiB; at most half the window; never the batch size, so a batch of 32 holds
the rows of two batches of 16) from the pieces
in the window at random, in proportion to the rows each has left, each piece giving its rows
in an order permuted by ``(seed, e, r, piece)``, and each chunk's rows are interleaved at
random; a drained piece leaves and the next one enters. So a batch mixes
the rows of about ``S / row_group_rows`` row groups (the manifest records
``row_group_rows``): make the buffer several row groups when rows within a shard are
ordered. Same seed, same batches (for a given numpy version); another epoch, another order.

The randomness given up against a uniform permutation of ``S``-row windows (the reader of
0.1.0): a row cannot meet rows more than about a window apart in the stream — as before —;
the rows one piece gives to a batch sit next to each other in it (the model sees a batch as
a set); and a piece drains at a rate set by the draws, so the last rows of an epoch come
from the last pieces of the stream. In exchange the first batch needs only the first
window's pieces (once per epoch, not once per window), and from then on reading overlaps
batching: each drained piece is replaced by one decoded ahead.

The shard file format (manifest ``file_format``) is the shard set's entry in
:mod:`pipeline.data.formats`, which indexes a shard into row groups and decodes one; the
reader itself does not depend on the format. TFRecord shards are read in the same pieces:
their row groups are runs of the manifest's ``row_group_rows`` records (the sizes of the
Parquet row groups of the same data), found by an index of byte offsets built by one scan of
the file when it is first used (:mod:`pipeline.data.formats.tfrecord`); every record's CRCs
are checked when its row group is decoded. The two formats of the same data give the same
batches.

Memory and copies: the window's decoded pieces (``S`` rows, at most ``shuffle_buffer_bytes``
of inputs unless one piece or batch is larger; 128 MiB by default — 0.1.0 had 1 GiB, but
decoded row groups are fresh memory each epoch, and page-faulting a GiB of it cost more than
the rest of the read: ``bench/RESULTS.md``, Reader), a few pieces decoded ahead by a small
thread pool, and ``prefetch_batches`` queued batches. Parquet tensor columns of
``format_version`` 2 decode into one buffer that numpy views without a copy; a batch's rows
are copied once, straight from the pieces into the batch's tensors (``pin_memory=True``:
page-locked, so that ``Tensor.to(cuda, non_blocking=True)`` overlaps the step). Small batches
(under a MiB or so: a tabular vector, token ids) are made and handed to the consumer in
groups of up to 64 — one copy per run of a piece's rows and one thread hand-off per group,
each batch a slice of the group's tensors — so the per-batch cost stays in microseconds;
``prefetch_batches`` then counts batches rounded up to whole groups.

Resume
------
:meth:`ShardReader.state_dict` holds the epoch and the batches already yielded in it, and is
the same on every rank. The draws depend only on the pieces' sizes and the seeds, so
:meth:`ShardReader.load_state_dict` resumes by replaying the draws of the batches already
yielded without reading any data: pieces drained before the resume point are not read at
all. The remaining batches are bit-identical to an uninterrupted run.

Elastic resume
--------------
``load_state_dict(state, elastic=True)`` at another world or batch size continues the epoch
exactly, in a new *segment* (:mod:`pipeline.data.segments`): the state's segment ends
(``state_dict()["segments"]`` lists the epoch's finished ones as ``[world_size, batch_size,
batches]``) and the new one reads the rows of the previous segment's row space (segment 0:
all ``N`` rows of the epoch's shard order, its dropped tail included) that it did not
consume, in the same order; which rows were consumed is replayed from the draws, nothing is
read. Segment ``s >= 1`` splits its ``N_s`` rows as above: contiguous slices of
``P_s = N_s // W_s`` rows, pieces (now any subset of a row group) and draws keyed by
``(seed, e, r, s)``. Guarantee: every row of the epoch is read at most once across its
segments, and all are read except, in the segment that ends the epoch, the last
``N_s - W_s*P_s`` rows of its row space (at most ``W_s - 1``, as without a resize) and, with
``drop_last``, each rank's partial last batch; an interrupted segment drops nothing, its
unread rows pass on. The same sequence of world sizes, batch sizes and resize points gives
the same batches. The plan assumes the same ``shuffle``, ``drop_last`` and shuffle buffer
settings as the states' (the seed is checked); it reads every shard's index (not its
sha256; a TFRecord shard is scanned) and replays every rank of every finished segment.

Verification
------------
Before a rank first reads a shard, :meth:`ShardSet.verify_shards` checks it against the
manifest (``verify="size"``: existence and size; ``"full"``: also the sha256; ``"auto"``: the
sha256 of files under 1 GiB; ``"none"``: nothing), and the row count of its index (Parquet
footer, TFRecord scan) must equal the manifest's — always, since the row space is computed from the manifest. Errors
name the file; errors in the prefetch thread are re-raised in the consumer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Final, Literal

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.arrays import InputColumn, features_to_numpy, input_columns, labels_to_numpy
from pipeline.data.batch import Batch
from pipeline.data.formats import RowGroupIndex, format_of
from pipeline.data.prefetch import (
    PIECE_ORDER,
    SHARD_ORDER,
    Arrays,
    Job,
    Piece,
    Producer,
    Stream,
    chunk_rows,
    group_batches,
    rng,
)
from pipeline.data.segments import Knobs, Layout, Segment, rank_pieces, remaining, resume, steps
from pipeline.data.segments import window_rows as whole_batches
from pipeline.data.shardset import FEATURES_COLUMN, ShardSet, ShardSetError
from pipeline.runtime import timeouts

__all__ = ["Batch", "ShardReader", "features_to_numpy", "features_to_tensor", "labels_to_numpy"]

log = logging.getLogger(__name__)

Verify = Literal["auto", "full", "size", "none"]
_VERIFY_MODES: Final = ("auto", "full", "size", "none")


# -- Arrow → torch ---------------------------------------------------------------------------
def features_to_tensor(
    column: pa.ChunkedArray | pa.Array, dim: int, *, where: str = ""
) -> torch.Tensor:
    """:func:`features_to_numpy` as a tensor sharing its memory (do not write into it)."""
    array = features_to_numpy(column, dim, where=where)
    with warnings.catch_warnings():
        # The tensor may view a read-only Arrow buffer; callers treat it as read-only.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class ShardReader:
    """Batches of one split for one rank; see the module docstring for the row policy.

    Iterating yields the rest of the current epoch from the current position; the position
    advances as batches are yielded, and when the last batch of epoch ``e`` is yielded the
    reader moves to the start of epoch ``e + 1``. :meth:`set_epoch` with another epoch moves
    to its start; with the current one it keeps the position, so a loop that calls
    ``set_epoch(epoch)`` after :meth:`load_state_dict` resumes mid-epoch. One iteration is
    active at a time: starting another, :meth:`set_epoch` to another epoch,
    :meth:`load_state_dict` and :meth:`close` end the one in progress.
    """

    def __init__(
        self,
        shardset: ShardSet | str,
        split: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer_rows: int = 65536,
        shuffle_buffer_bytes: int = 1 << 27,
        drop_last: bool = False,
        verify: Verify = "auto",
        prefetch_batches: int = 4,
        text_padding: Literal["batch", "fixed"] = "batch",
        pin_memory: bool = False,
    ) -> None:
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("shuffle_buffer_rows", shuffle_buffer_rows, 1)
        _check_int("shuffle_buffer_bytes", shuffle_buffer_bytes, 1)
        _check_int("prefetch_batches", prefetch_batches, 1)
        if text_padding not in ("batch", "fixed"):
            raise ValueError(f"text_padding must be 'batch' or 'fixed', got {text_padding!r}")
        self.text_padding = text_padding
        if verify not in _VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(_VERIFY_MODES)}, got {verify!r}")
        self.shardset = ShardSet.open(shardset) if isinstance(shardset, str) else shardset
        self.split = split
        self._shards = self.shardset.check_split_rows(split).shards
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.verify: Verify = verify
        self.prefetch_batches = prefetch_batches
        self.pin_memory = bool(pin_memory)
        """Batches in page-locked memory (for CUDA: asynchronous host→device copies)."""
        self.inputs: tuple[InputColumn, ...] = input_columns(self.shardset)
        """The input columns each batch holds (``Batch.inputs``), in manifest order."""
        names = [c.name for c in self.inputs]
        self.dim: int | None = self.shardset.feature_dim if FEATURES_COLUMN in names else None
        """Length of the ``features`` vector (None for a set without one)."""
        self._columns = tuple(c.spec for c in self.inputs)
        self._format = format_of(self.shardset)
        self._label_dtype = np.dtype(
            np.int64 if self.shardset.task == "classification" else np.float32
        )
        self.num_rows = sum(s.rows for s in self._shards)
        self.rows_per_rank: int = 0
        """This rank's rows in the current segment of the epoch (all of it unless resized)."""
        self.steps_per_epoch: int = 0
        """This rank's batches in the current segment of the epoch (all of it unless resized)."""
        self._segments: tuple[Segment, ...] = ()  # the epoch's finished segments
        self._space: np.ndarray | None = None  # the current segment's rows (None: segment 0)
        self._enter((), None)
        row_bytes = self._window(shuffle_buffer_rows, shuffle_buffer_bytes)
        self._layout: tuple[int, Layout] | None = None  # (epoch, its row space), once needed
        self._group_batches = group_batches(row_bytes * batch_size, prefetch_batches)
        if self.rows_per_rank == 0 and self.num_rows:
            log.warning(
                "split %r of %s has %d rows for %d ranks: no steps",
                split,
                self.shardset.uri,
                self.num_rows,
                world_size,
            )
        # shard index → its row groups (Parquet footer, TFRecord index), once read
        self._metadata: dict[int, RowGroupIndex] = {}
        self._verified: set[int] = set()  # shards checked against the manifest
        self._epoch = 0
        self._done = 0  # batches of the current epoch already yielded
        self._generation = 0  # bumped whenever the position jumps; stale iterators stop
        self._producer: Producer | None = None
        self._closed = False

    def _window(self, buffer_rows: int, buffer_bytes: int) -> int:
        """Set the shuffle window and draw chunk from the buffer limits; a row's input bytes."""
        row_bytes = sum(c.size * c.numpy_dtype.itemsize for c in self._columns)
        window = min(buffer_rows, buffer_bytes // max(row_bytes, 1))
        # Whole batches, at least one (as in 0.1.0): the window, and so the order, is then the
        # same for batch sizes that divide it (a batch of 32 = two of 16; prefetch.Draws).
        self._window_rows = whole_batches(window, self.batch_size)
        self._chunk_rows = chunk_rows(row_bytes)
        self._knobs = Knobs(self.seed, self.shuffle, self.drop_last, window, self._chunk_rows)
        return row_bytes

    # -- position ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The finished segments of the current epoch: ``(world_size, batch_size, batches)``."""
        return self._segments

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; a no-op when it is the current epoch."""
        _check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._jump(epoch, 0)

    def state_dict(self) -> dict[str, Any]:
        """The position (plain ints and lists, identical on every rank) and what it depends on.

        ``batches_in_epoch``, ``world_size`` and ``batch_size`` are those of the current
        segment; ``segments`` lists the epoch's finished ones (``[]`` unless resized).
        """
        return {
            "epoch": self._epoch,
            "batches_in_epoch": self._done,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "segments": [list(s) for s in self._segments],
        }

    def load_state_dict(self, state: Mapping[str, Any], *, elastic: bool = False) -> None:
        """Continue from ``state``; exact when world size, batch size and seed are the same.

        ``elastic=True`` with another world or batch size: exact too — the state's segment
        ends and this reader starts a new one over the epoch's rows not yet read (module
        docstring, "Elastic resume"); the seed must be the same. Otherwise, for a state of a
        segment 0 (a warning is logged), the position is mapped to the same number of
        samples seen by all ranks together, rounded down to a whole step.
        """
        missing = [k for k in ("epoch", "batches_in_epoch") if k not in state]
        if missing:
            raise ValueError(f"reader state lacks {', '.join(missing)} (got keys {sorted(state)})")
        epoch, done = int(state["epoch"]), int(state["batches_in_epoch"])
        _check_int("state['epoch']", epoch, 0)
        mine = self.state_dict()
        segments, done, changed = resume(state, mine, elastic=elastic)
        if changed:
            log.warning(
                "reader state was saved with %s; this reader has %s: resuming near the same "
                "sample count, not exactly",
                {k: state[k] for k in changed},
                {k: mine[k] for k in changed},
            )
            seen = done * int(state.get("batch_size", self.batch_size))
            seen *= int(state.get("world_size", self.world_size))
            first = steps(self.num_rows // self.world_size, self.batch_size, self.drop_last)
            done = min(seen // (self.batch_size * self.world_size), first)
        space = None
        if segments:
            space = remaining(self._layout_of(epoch), epoch, segments, self._knobs)
        n = self.num_rows if space is None else len(space)
        most = steps(n // self.world_size, self.batch_size, self.drop_last)
        if not 0 <= done <= most:
            raise ValueError(
                f"reader state batches_in_epoch={done} is outside 0..{most} "
                f"(steps of segment {len(segments)} of epoch {epoch} of split {self.split!r})"
            )
        self._jump(epoch, done)
        self._enter(segments, space)
        if done == most and done:
            self._jump(epoch + 1, 0)

    def _jump(self, epoch: int, done: int) -> None:
        self._stop_producer()
        self._generation += 1
        if epoch != self._epoch:
            self._enter((), None)
        self._epoch, self._done = epoch, done

    def _enter(self, segments: tuple[Segment, ...], space: np.ndarray | None) -> None:
        """Make a segment of the epoch current: its finished ones and its row space."""
        self._segments, self._space = segments, space
        n = self.num_rows if space is None else len(space)
        self.rows_per_rank = n // self.world_size
        self.steps_per_epoch = steps(self.rows_per_rank, self.batch_size, self.drop_last)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch."""
        if self._closed:
            raise RuntimeError(f"ShardReader for split {self.split!r} is closed")
        self._jump(self._epoch, self._done)
        generation, epoch = self._generation, self._epoch
        remaining = self.steps_per_epoch - self._done
        if remaining <= 0:
            self._jump(epoch + 1, 0)
            return iter(())
        job = Job(epoch, self._plan(epoch), self._done, remaining, len(self._segments))
        return self._consume(job, generation)

    def _consume(self, job: Job, generation: int) -> Iterator[Batch]:
        # The thread starts on the first next(), so an iterator never advanced leaks nothing.
        self._check_current(generation)
        producer = self._producer = Producer(self._stream(), job)
        try:
            while True:
                self._check_current(generation)
                batch = producer.get()
                if batch is None:
                    return
                timeouts.beat()  # progress, for the training watchdog
                self._done += 1
                if self._done == self.steps_per_epoch:
                    self._epoch, self._done = self._epoch + 1, 0
                    self._enter((), None)
                yield batch
        finally:
            producer.stop()
            if self._producer is producer:
                self._producer = None

    def _stream(self) -> Stream:
        pads = {}
        if self.text_padding == "batch":
            pads = {c.name: c.pad_id for c in self.inputs if c.pad_id is not None}
        return Stream(
            name=f"ShardReader-{self.split}-rank{self.rank}",
            read=self._read_piece,
            rank=self.rank,
            seed=self.seed,
            shuffle=self.shuffle,
            batch_size=self.batch_size,
            rows_per_rank=self.rows_per_rank,
            window_rows=self._window_rows,
            chunk_rows=self._chunk_rows,
            group_batches=self._group_batches,
            prefetch_batches=self.prefetch_batches,
            pads=pads,
            pin_memory=self.pin_memory,
        )

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError(
                "this iteration was ended by set_epoch(), load_state_dict(), close() or "
                "a newer iteration over the same ShardReader"
            )

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def close(self) -> None:
        """Stop the prefetch thread (a bounded wait); the reader cannot be iterated afterwards."""
        self._stop_producer()
        self._generation += 1
        self._closed = True

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[Piece, ...]:
        """The pieces of this rank's stream for ``epoch``, verifying shards read the first time."""
        if self._space is not None:  # a segment after a resize
            segment = len(self._segments)
            layout = self._layout_of(epoch)
            args = (self.world_size, self.rank, epoch, segment, self._knobs)
            pieces = rank_pieces(layout, self._space, *args)
            for index in dict.fromkeys(p.shard for p in pieces):
                self._check_shard(index)
            return tuple(pieces)
        ranges = self._rank_ranges(epoch)
        for index, _, _ in ranges:
            self._check_shard(index)
        pieces = [p for index, lo, hi in ranges for p in self._pieces(index, lo, hi)]
        if self.shuffle:
            order = rng(self.seed, epoch, PIECE_ORDER, self.rank).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        return tuple(pieces)

    def _shard_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            return rng(self.seed, epoch, SHARD_ORDER).permutation(len(self._shards)).tolist()
        return list(range(len(self._shards)))

    def _layout_of(self, epoch: int) -> Layout:
        """The epoch's row space over every shard (their indexes read, not verified)."""
        if self._layout is None or self._layout[0] != epoch:
            sizes = [s.rows for s in self._shards]
            layout = Layout(self._shard_order(epoch), sizes, self._row_groups)
            self._layout = (epoch, layout)
        return self._layout[1]

    def _row_groups(self, index: int) -> list[int]:
        metadata = self._index(index)
        return [metadata.row_group(rg).num_rows for rg in range(metadata.num_row_groups)]

    def _rank_ranges(self, epoch: int) -> list[tuple[int, int, int]]:
        """``(shard index, first row, end row)`` of the shards overlapping this rank's slice."""
        order = self._shard_order(epoch)
        lo, hi = self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank
        out, pos = [], 0
        for index in order:
            n = self._shards[index].rows
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((index, a - pos, b - pos))
            pos += n
            if pos >= hi:
                break
        return out

    def _pieces(self, index: int, lo: int, hi: int) -> Iterator[Piece]:
        metadata, start = self._metadata[index], 0
        for rg in range(metadata.num_row_groups):
            n = metadata.row_group(rg).num_rows
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                yield Piece(index, rg, a - start, b - start)
            start += n

    def _check_shard(self, index: int) -> None:
        """Verify a shard and read its row groups (footer / index), once per reader."""
        if index in self._verified:
            return
        if self.verify != "none":
            self.shardset.verify_shards([self._shards[index]], self.verify)
        self._index(index)
        self._verified.add(index)

    def _index(self, index: int) -> RowGroupIndex:
        """A shard's row groups (footer / index), its row count checked; not its sha256."""
        if index in self._metadata:
            return self._metadata[index]
        shard, fmt = self._shards[index], self._format
        where = self.shardset.shard_uri(shard)
        path, part = self.shardset.shard_path(shard), fmt.index_source
        try:
            metadata = fmt.index(self.shardset.fs, path, self.shardset.row_group_rows, where=where)
        except (OSError, pa.ArrowException) as e:
            raise ShardSetError(f"shard {where}: cannot read the {part}: {e}") from e
        self.shardset.check_shard_rows(shard, metadata.num_rows, part)
        self._metadata[index] = metadata
        return metadata

    def _read_piece(self, piece: Piece) -> tuple[Arrays, np.ndarray]:
        """Inputs and labels of a piece (runs in the read pool; opens its own file handle)."""
        shard = self._shards[piece.shard]
        cols, labels = self._format.read_columns(
            self.shardset.fs,
            self.shardset.shard_path(shard),
            self._metadata[piece.shard],
            piece.row_group,
            columns=self._columns,
            label_dtype=self._label_dtype,
            where=self.shardset.shard_uri(shard),
        )
        if piece.rows is None:
            rows = slice(piece.start, piece.stop)
            return {k: v[rows] for k, v in cols.items()}, labels[rows]
        return {k: v.take(piece.rows, 0) for k, v in cols.items()}, labels.take(piece.rows)


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
