"""The prefetch thread of :class:`pipeline.data.reader.ShardReader`: an epoch plan → batches.

It knows the reader only through a :class:`Stream` (a piece decoder and a few numbers).

The reader plans which row-group pieces a rank reads in an epoch and in what order (a
:class:`Job`). A :class:`Producer` thread draws each batch's rows from a window of pieces
that fills and drains continuously (:class:`Draws`), has the pieces decoded ahead of need by
a read pool (pyarrow releases the GIL), copies each row once into the batch's tensors
(pinned memory when asked) and puts the batches on a bounded queue. See the reader's module
docstring for the row policy, shuffle and resume.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.batch import Batch

__all__ = [
    "Arrays",
    "Draws",
    "Job",
    "Piece",
    "Producer",
    "Stream",
    "chunk_rows",
    "group_batches",
    "rng",
    "stream_key",
]

log = logging.getLogger("pipeline.data.reader")  # the reader's messages

# Seed-sequence tags keep the three random streams of an epoch independent.
SHARD_ORDER, PIECE_ORDER, WINDOW_ORDER = 0, 1, 2
_STOP_WAIT_S: Final = 30.0  # how long close() waits for the prefetch thread
_POLL_S: Final = 0.1  # the prefetch thread re-checks its stop flag this often while blocked
_READ_THREADS: Final = max(2, min(4, os.cpu_count() or 1))  # decode threads per reader
_READ_AHEAD: Final = _READ_THREADS + 1  # pieces decoded ahead of the window's newest


Arrays = dict[str, np.ndarray]
"""A piece's or window's input columns by name, each ``[n, *shape]``."""


# -- the plan of an epoch ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, stop)`` of one row group of one shard: a unit of the rank's stream.

    ``rows``, when given, are the piece's rows instead: sorted row-group-local indices within
    ``[start, stop)``, not all of them (an elastic segment's rows: :mod:`pipeline.data.segments`).
    """

    shard: int  # index into the split's shards
    row_group: int
    start: int
    stop: int
    rows: np.ndarray | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        """How many rows the piece gives."""
        return self.stop - self.start if self.rows is None else len(self.rows)


@dataclass(frozen=True, slots=True)
class Job:
    """What a prefetch thread produces: the rest of one epoch of one rank."""

    epoch: int
    pieces: tuple[Piece, ...]
    first_batch: int
    batches: int  # how many to produce
    segment: int = 0  # the epoch's segment (elastic resume): part of the draws' key


@dataclass(frozen=True, slots=True)
class Stream:
    """What a :class:`Producer` needs of its reader: how to decode a piece, and the knobs."""

    name: str  # the prefetch thread's name
    read: Callable[[Piece], tuple[Arrays, np.ndarray]]  # a piece's inputs and labels
    rank: int
    seed: int
    shuffle: bool
    batch_size: int
    rows_per_rank: int
    window_rows: int  # Draws' window
    chunk_rows: int  # Draws' chunk (:func:`chunk_rows`)
    group_batches: int  # batches per hand-off (:func:`group_batches`)
    prefetch_batches: int
    pads: Mapping[str, int]  # text columns cut per batch → their pad id
    pin_memory: bool


def rng(*key: int) -> np.random.Generator:
    """A generator seeded by ``key`` (seed, epoch, stream tag, …)."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


_SEGMENT: Final = 3  # marks the keys of segments after the first


def stream_key(seed: int, epoch: int, tag: int, rank: int, segment: int) -> tuple[int, ...]:
    """The key of a rank's stream ``tag`` (piece order, draws): segment 0 keeps 0.2.0's key.

    A later segment's key has two more words, so it never equals segment 0's per-piece keys
    (the draws' key plus the piece's index).
    """
    if segment == 0:
        return (seed, epoch, tag, rank)
    return (seed, epoch, tag, rank, _SEGMENT, segment)


# -- which rows make each batch ------------------------------------------------------------------
_CHUNK_ROWS: Final = 1024  # rows drawn at once at least (fewer for a small window) …
_CHUNK_BYTES: Final = 1 << 20  # … or as many as hold this many input bytes (small rows)
_GROUP_BYTES: Final = 4 << 20  # batches made and handed over together hold about this much
_GROUP_MAX: Final = 64  # … and are at most this many


def chunk_rows(row_bytes: int) -> int:
    """Rows :class:`Draws` draws at once for rows of ``row_bytes``: a property of the data.

    Each draw costs about 0.1 ms whatever its size, so small rows (a tabular vector, token
    ids) are drawn in chunks of about a MiB; never the batch size (see :class:`Draws`).
    """
    return max(_CHUNK_ROWS, _CHUNK_BYTES // max(row_bytes, 1))


def group_batches(batch_bytes: int, prefetch_batches: int) -> int:
    """Batches a :class:`Producer` makes and hands over at once (each handover costs ~0.1 ms)."""
    return max(1, min(_GROUP_MAX, _GROUP_BYTES // max(batch_bytes, 1), 16 * prefetch_batches))


class Draws:
    """The rank's rows of an epoch in shuffled order, from a window that fills and drains.

    Pieces enter the window in stream order while the rows of the pieces in it (counting
    whole pieces, drained or not) stay within ``window_rows`` (at least one piece, and
    always enough rows for the next draw). Rows are drawn in chunks of :attr:`chunk` rows
    (``chunk_rows``, at most half the window) — set by the row size and the window, not the
    batch size, so that batch sizes with the same window (the reader rounds it to whole
    batches) give the same order: a batch of 32 holds the rows of two batches of 16 —, each
    from the pieces in the window
    at random in proportion to what each has left (a multivariate hypergeometric draw),
    every piece giving its rows in its own seeded random order, the chunk's rows then
    interleaved at random. A piece leaves the window when its last row is drawn, and the
    next one enters; :attr:`last_at` tells when its memory may go. ``key=None``
    (``shuffle=False``): the stream's rows in order.

    Everything depends on the sizes and the seed key only, never on data, so a resume
    replays the draws of the rows already yielded without reading anything (:meth:`take`).
    """

    def __init__(
        self,
        sizes: list[int],
        window_rows: int,
        key: tuple[int, ...] | None,
        chunk_rows: int = _CHUNK_ROWS,
    ) -> None:
        self.sizes, self._budget, self._key = sizes, window_rows, key
        self.chunk = max(1, min(chunk_rows, window_rows // 2))
        self.window: list[int] = []  # pieces in the window, in the order they entered
        self.entered = 0  # pieces that have entered so far (stream order)
        self.last_at: dict[int, int] = {}  # drained piece → position of its last row
        self._left = list(sizes)  # rows each piece has still to give
        self._order: dict[int, np.ndarray] = {}  # shuffled: a piece's row order
        self._gen = None if key is None else rng(*key)
        self._drawn = 0  # rows drawn so far (positions in the epoch's order)
        self._ids = np.empty(0, np.int64)  # drawn, not yet taken: piece of each row
        self._rows = np.empty(0, np.int64)  # … and its row within the piece

    def _admit(self, need: int) -> None:
        held = sum(self.sizes[j] for j in self.window)
        left = sum(self._left[j] for j in self.window)
        while self.entered < len(self.sizes) and (
            not self.window or held + self.sizes[self.entered] <= self._budget or left < need
        ):
            j = self.entered
            self.window.append(j)
            held, left, self.entered = held + self.sizes[j], left + self._left[j], j + 1
            if self._key is not None:
                self._order[j] = rng(*self._key, j).permutation(self.sizes[j])

    def _draw(self) -> None:
        """Draw the next chunk; drained pieces leave the window."""
        self._admit(self.chunk)
        window = list(self.window)
        left = np.array([self._left[j] for j in window], dtype=np.int64)
        n = int(min(self.chunk, left.sum()))
        if self._gen is None:
            counts = np.minimum(left, np.maximum(n - (np.cumsum(left) - left), 0))
        else:
            counts = self._gen.multivariate_hypergeometric(left, n)
        ids, rows = [], []
        for j, c in zip(window, counts.tolist(), strict=True):
            if not c:
                continue
            start = self.sizes[j] - self._left[j]
            ids.append(np.full(c, j, np.int64))
            mine = self._order.get(j)
            rows.append(np.arange(start, start + c) if mine is None else mine[start : start + c])
            self._left[j] -= c
        chunk_ids, chunk_rows = np.concatenate(ids), np.concatenate(rows)
        if self._gen is not None:
            mix = self._gen.permutation(n)
            chunk_ids, chunk_rows = chunk_ids[mix], chunk_rows[mix]
        for j in window:
            if not self._left[j]:
                self.window.remove(j)
                self._order.pop(j, None)
                self.last_at[j] = self._drawn + int(np.flatnonzero(chunk_ids == j)[-1])
        self._drawn += n
        self._ids = np.concatenate([self._ids, chunk_ids])
        self._rows = np.concatenate([self._rows, chunk_rows])

    def pending(self) -> np.ndarray:
        """The pieces of the rows drawn but not yet taken (one per row)."""
        return self._ids

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` rows of the order: ``(piece of each, row within the piece)``."""
        while len(self._ids) < n:
            self._draw()
        ids, rows = self._ids[:n], self._rows[:n]
        self._ids, self._rows = self._ids[n:], self._rows[n:]
        return ids, rows


# -- the prefetch thread ---------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside the prefetch thread when it is told to stop."""


Read = tuple[Arrays, np.ndarray, dict[str, np.ndarray]]
"""A decoded piece: inputs, labels, and per text column each row's used length."""


class Producer:
    """A daemon thread that turns a :class:`Job` into batches on a bounded queue.

    Pieces are decoded by a pool of :data:`_READ_THREADS` threads in the order they enter
    the window, up to :data:`_READ_AHEAD` pieces beyond the window, so that decoding
    overlaps batching and the consumer and uses more than one core. Small batches are made
    and handed over in groups (:func:`group_batches`): one copy and one thread hand-off per
    group, each batch a slice of the group's tensors.
    """

    _END: Final = object()

    def __init__(self, stream: Stream, job: Job) -> None:
        self._reader, self._job = stream, job
        self._pads = stream.pads
        self._group = stream.group_batches
        depth = max(1, -(-stream.prefetch_batches // self._group))
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._ready: collections.deque[Batch] = collections.deque()  # the consumer's group
        self._stop = threading.Event()
        name = f"{stream.name}-epoch{job.epoch}"
        self._pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix=f"{name}-read")
        self._reads: dict[int, Future[Read]] = {}  # piece → its decode, until it drains
        self._next_read = 0  # the next piece (stream order) to submit
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def get(self) -> Batch | None:
        """The next batch, None at the end; re-raises the thread's error."""
        if self._ready:
            return self._ready.popleft()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    raise RuntimeError(
                        "the ShardReader prefetch thread ended unexpectedly"
                    ) from None
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        self._ready.extend(item)
        return self._ready.popleft()

    def stop(self) -> None:
        """Tell the thread to stop, unblock it, and wait for it a bounded time."""
        self._stop.set()
        self._ready.clear()
        while not self._queue.empty():  # only this thread takes items: get cannot block
            self._queue.get_nowait()
        self.thread.join(_STOP_WAIT_S)
        if self.thread.is_alive():
            log.warning(
                "%s did not stop within %.0f s; leaving it (daemon thread)",
                self.thread.name,
                _STOP_WAIT_S,
            )

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:  # noqa: PERF203 - a blocking wait, not a hot loop
                continue
        raise _Stopped

    def _run(self) -> None:
        try:
            self._produce()
            self._put(self._END)
        except _Stopped:
            pass
        except Exception as e:  # handed to the consumer, which re-raises it
            try:
                self._put(e)
            except _Stopped:
                pass
        finally:
            self._reads.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _produce(self) -> None:
        r, job = self._reader, self._job
        sizes = [p.size for p in job.pieces]
        key = (
            stream_key(r.seed, job.epoch, WINDOW_ORDER, r.rank, job.segment) if r.shuffle else None
        )
        draws = Draws(sizes, r.window_rows, key, r.chunk_rows)
        position = job.first_batch * r.batch_size
        draws.take(position)  # a resume: the draws replayed, nothing read
        # Pieces with rows drawn but not yet taken, those still in the window after the
        # replay, then the rest in stream order.
        pending = [j for j in dict.fromkeys(draws.pending().tolist()) if j not in draws.window]
        self._wanted = [*pending, *draws.window, *range(draws.entered, len(sizes))]
        end = job.first_batch + job.batches
        for first in range(job.first_batch, end, self._group):
            counts = [  # rows of each batch of the group
                min(r.batch_size, r.rows_per_rank - b * r.batch_size)
                for b in range(first, min(first + self._group, end))
            ]
            ids, rows = draws.take(sum(counts))
            self._submit(draws.entered)
            try:
                group = self._batches(first, ids, rows, counts)
            except _Stopped:
                raise
            except Exception:
                self._until_failure(first, ids, rows, counts)
                raise
            self._put(group)
            position += sum(counts)
            for j in [j for j, at in draws.last_at.items() if at < position]:
                del draws.last_at[j]
                self._reads.pop(j, None)  # drained: its memory goes

    def _until_failure(
        self, first: int, ids: np.ndarray, rows: np.ndarray, sizes: list[int]
    ) -> None:
        """A group failed: hand over its batches one by one up to the one that fails (raises)."""
        start = 0
        for k, n in enumerate(sizes):
            part = slice(start, start + n)
            self._put(self._batches(first + k, ids[part], rows[part], [n]))
            start += n

    def _submit(self, entered: int) -> None:
        """Submit the decodes of every piece that entered the window and a few beyond."""
        wanted = self._wanted
        while self._next_read < len(wanted) and (wanted[self._next_read] < entered + _READ_AHEAD):
            j = wanted[self._next_read]
            self._reads[j] = self._pool.submit(self._read, self._job.pieces[j])
            self._next_read += 1

    def _read(self, piece: Piece) -> Read:
        """Decode a piece (a read-pool thread); text columns: each row's used length."""
        cols, labels = self._reader.read(piece)
        used = {}
        for name, pad in self._pads.items():
            mask = cols[name] != pad
            width = mask.shape[1]
            last = width - np.argmax(mask[:, ::-1], axis=1)
            used[name] = np.where(mask.any(axis=1), last, 0)
        return cols, labels, used

    def _piece(self, j: int) -> Read:
        if self._stop.is_set():
            raise _Stopped
        return self._reads[j].result()

    def _batches(
        self, first_batch: int, ids: np.ndarray, rows: np.ndarray, sizes: list[int]
    ) -> list[Batch]:
        """The batches of ``sizes`` rows each, every row copied once from its piece.

        Within a batch, the rows one piece gives sit next to each other (pieces in ascending
        order in even batches, descending in odd ones, so that runs continue across batch
        boundaries), so that each run of one piece's rows is one ``take`` into the group's
        tensors, of which every batch is a slice (text columns cut per batch: a copy of the
        cut). A group that fails is handed over batch by batch up to the failing one.
        """
        r, n = self._reader, len(ids)
        bounds = np.cumsum([0, *sizes])
        if r.shuffle and ids.min() != ids.max():
            batch = np.repeat(np.arange(len(sizes)), sizes)
            order = _by_batch_then_piece(ids, batch, first_batch % 2)
            ids, rows = ids[order], rows[order]
        first = self._piece(int(ids[0]))
        out = {
            name: _empty((n, *v.shape[1:]), v.dtype, r.pin_memory) for name, v in first[0].items()
        }
        labels = _empty((n,), first[1].dtype, r.pin_memory)
        views = [(name, t.numpy()) for name, t in out.items()]
        label_view = labels.numpy()
        used = {name: np.empty(n, np.int64) for name in self._pads}
        cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), n]
        for a, b in itertools.pairwise(cuts):
            cols, y, lengths = self._piece(int(ids[a]))
            local: np.ndarray | slice = rows[a:b]
            if not r.shuffle:  # consecutive rows: a slice
                local = slice(int(rows[a]), int(rows[b - 1]) + 1)
            for name, view in views:
                _copy(cols[name], local, view[a:b])
            _copy(y, local, label_view[a:b])
            for name, dst in used.items():
                dst[a:b] = lengths[name][local]
        widths = {
            name: np.maximum(np.maximum.reduceat(u, bounds[:-1]), 1).tolist()
            for name, u in used.items()
        }
        batches = []
        for k, (a, b) in enumerate(itertools.pairwise(bounds.tolist())):
            inputs = {name: t[a:b] for name, t in out.items()}
            for name, w in widths.items():
                inputs[name] = _cut(inputs[name], w[k], r.pin_memory)
            batches.append(Batch(inputs, labels[a:b]))
        return batches


def _by_batch_then_piece(ids: np.ndarray, batch: np.ndarray, odd: int) -> np.ndarray:
    """The stable order of rows by batch, then by piece.

    Pieces ascend in even batches of the epoch and descend in odd ones (``odd``: the parity
    of batch 0 here), so a piece's rows ending one batch and starting the next are one run.
    Two radix passes on 16-bit keys when they fit.
    """
    key = np.where((batch + odd) % 2 == 1, -ids, ids)
    if max(int(ids.max()), int(batch[-1])) < 1 << 15:
        by_piece = np.argsort(key.astype(np.int16), kind="stable")
        return by_piece[np.argsort(batch[by_piece].astype(np.int16), kind="stable")]
    return np.lexsort((key, batch))


def _cut(ids: torch.Tensor, width: int, pin: bool) -> torch.Tensor:
    """The first ``width`` positions of ``ids`` ``[B, L]``, contiguous (itself when all of them)."""
    if width >= ids.shape[1]:
        return ids
    return _empty((ids.shape[0], width), ids.numpy().dtype, pin).copy_(ids[:, :width])


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any], pin: bool) -> torch.Tensor:
    """An uninitialized tensor of ``dtype``: page-locked when ``pin`` (fast async H2D copies).

    Otherwise from Arrow's memory pool, which keeps freed memory for the next batch: torch's
    CPU allocator hands large blocks back to the kernel, and page-faulting a fresh 38 MB
    batch (256 images of 224²) costs 19 ms, half the read (bench/RESULTS.md, Reader).
    """
    if pin:
        kind = torch.from_numpy(np.empty(0, dtype)).dtype
        return torch.empty(shape, dtype=kind, pin_memory=True)
    count = int(np.prod(shape))
    buffer = pa.allocate_buffer(count * dtype.itemsize)
    return torch.from_numpy(np.frombuffer(buffer, dtype, count).reshape(shape))


def _copy(src: np.ndarray, rows: np.ndarray | slice, dst: np.ndarray) -> None:
    """``dst[:] = src[rows]`` in one copy (``np.take`` unbuffered; a slice as a plain copy)."""
    if isinstance(rows, slice):
        dst[...] = src[rows]
    else:
        src.take(rows, 0, dst, "clip")
