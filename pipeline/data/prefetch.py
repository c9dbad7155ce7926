"""The prefetch thread of :class:`pipeline.data.reader.ShardReader`: an epoch plan → batches.

The reader plans which row-group pieces a rank reads in an epoch and in what order (a
:class:`Job`); a :class:`Producer` thread decodes the pieces (through the shard format, in a
small read pool), cuts the stream into shuffle windows, permutes each and puts the batches on
a bounded queue. See the reader's module docstring for the row policy, shuffle and resume.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from pipeline.data.shardset import FEATURES_COLUMN as FEATURES

if TYPE_CHECKING:
    from pipeline.data.reader import ShardReader

__all__ = ["Arrays", "Batch", "Job", "Piece", "Producer", "rng"]

log = logging.getLogger("pipeline.data.reader")  # the reader's messages

# Seed-sequence tags keep the three random streams of an epoch independent.
SHARD_ORDER, PIECE_ORDER, WINDOW_ORDER = 0, 1, 2
_STOP_WAIT_S: Final = 30.0  # how long close() waits for the prefetch thread
_POLL_S: Final = 0.1  # the prefetch thread re-checks its stop flag this often while blocked
_READ_AHEAD: Final = 2  # row-group pieces decoded ahead of the one being batched


Arrays = dict[str, np.ndarray]
"""A piece's or window's input columns by name, each ``[n, *shape]``."""


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` (name → ``[B, *shape]`` tensor) and ``labels`` ``[B]``, contiguous.

    Inputs keep the dtype and shape the manifest declares for their column: the tabular
    ``features`` vector float32 ``[B, D]``, arrays as declared, images uint8 ``[B, H, W, C]``
    (normalization and channels-first happen on the device: :mod:`pipeline.train.inputs`).
    Text columns are int32 ids ``[B, L]``: ``L`` is the column's ``max_length``, or with the
    reader's ``text_padding="batch"`` the last non-pad position of the batch's longest row.
    Labels are int64 class codes for classification and float32 targets for regression.
    ``Batch(tensor, labels)`` is a batch whose only input is ``features``.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.inputs, torch.Tensor):
            object.__setattr__(self, "inputs", {FEATURES: self.inputs})

    @property
    def features(self) -> torch.Tensor:
        """The tabular ``features`` input (KeyError naming the inputs when there is none)."""
        try:
            return self.inputs[FEATURES]
        except KeyError:
            raise KeyError(
                f"this batch has no {FEATURES!r} input (inputs: {', '.join(self.inputs)})"
            ) from None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device`` (dtypes and shapes unchanged)."""
        return Batch(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
            self.labels.to(device, non_blocking=non_blocking),
        )


# -- the plan of an epoch ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, stop)`` of one row group of one shard: a unit of the rank's stream."""

    shard: int  # index into the split's shards
    row_group: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Job:
    """What a prefetch thread produces: the rest of one epoch of one rank."""

    epoch: int
    pieces: tuple[Piece, ...]
    first_batch: int
    batches: int  # how many to produce


def rng(*key: int) -> np.random.Generator:
    """A generator seeded by ``key`` (seed, epoch, stream tag, …)."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


# -- the prefetch thread ---------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside the prefetch thread when it is told to stop."""


class Producer:
    """A daemon thread that turns a :class:`Job` into batches on a bounded queue.

    Row groups are decoded by a small pool, up to :data:`_READ_AHEAD` pieces ahead of the one
    being batched (pyarrow releases the GIL while decoding), so that decoding overlaps the
    shuffle and the consumer, and uses more than one core.
    """

    _END: Final = object()

    def __init__(self, reader: ShardReader, job: Job) -> None:
        self._reader, self._job = reader, job
        self._pads: dict[str, int] = {}  # text columns cut per batch → their pad id
        if reader.text_padding == "batch":
            self._pads = {c.name: c.pad_id for c in reader.inputs if c.pad_id is not None}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=reader.prefetch_batches)
        self._stop = threading.Event()
        name = f"ShardReader-{reader.split}-rank{reader.rank}-epoch{job.epoch}"
        self._pool = ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix=f"{name}-read")
        self._reads: dict[int, Future[tuple[Arrays, np.ndarray]]] = {}  # piece → read
        self._cached: tuple[int, Arrays, np.ndarray] | None = None  # the last piece used
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def get(self) -> Batch | None:
        """The next batch, None at the end; re-raises the thread's error."""
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
        assert isinstance(item, Batch)
        return item

    def stop(self) -> None:
        """Tell the thread to stop, unblock it, and wait for it a bounded time."""
        self._stop.set()
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
            self._cached = None
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _produce(self) -> None:
        r, job = self._reader, self._job
        size, batch = r._window_rows, r.batch_size
        first_row = job.first_batch * batch
        sizes = np.array([p.stop - p.start for p in job.pieces], dtype=np.int64)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        left = job.batches
        window = first_row // size
        while left > 0:
            lo, hi = window * size, min((window + 1) * size, r.rows_per_rank)
            rows = lo + self._order(job.epoch, window, hi - lo)[max(first_row - lo, 0) :]
            held: dict[int, tuple[Arrays, np.ndarray]] = {}  # this window's pieces
            for i in range(0, len(rows), batch):
                cols, labels = self._gather(rows[i : i + batch], starts, ends, held)
                inputs = {k: torch.from_numpy(self._cut(k, v)) for k, v in cols.items()}
                self._put(Batch(inputs, torch.from_numpy(labels)))
                left -= 1
                if left == 0:
                    return
            window += 1

    def _cut(self, name: str, x: np.ndarray) -> np.ndarray:
        """A text column cut after the batch's last non-pad position (per-batch padding)."""
        pad = self._pads.get(name)
        if pad is None:
            return x
        used = np.flatnonzero((x != pad).any(axis=0))
        length = int(used[-1]) + 1 if used.size else 1
        return x if length == x.shape[1] else np.ascontiguousarray(x[:, :length])

    def _gather(
        self,
        rows: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        held: dict[int, tuple[Arrays, np.ndarray]],
    ) -> tuple[Arrays, np.ndarray]:
        """Inputs and labels of stream ``rows`` (piece j holds ``[starts[j], ends[j])``), copied.

        Rows are copied once, straight from the decoded pieces into the batch (``np.take``
        of whole rows; a slice when unshuffled): no copy of the window is made.
        """
        which = np.searchsorted(ends, rows, side="right")
        pieces = np.unique(which)
        for j in pieces.tolist():
            if j not in held:
                if self._stop.is_set():
                    raise _Stopped
                held[j] = self._piece(j)
        if len(pieces) == 1:
            j = int(pieces[0])
            cols, labels = held[j]
            local = rows - starts[j]
            if not self._reader.shuffle:  # consecutive rows
                part = slice(int(local[0]), int(local[-1]) + 1)
                return {k: v[part].copy() for k, v in cols.items()}, labels[part].copy()
            return {k: np.take(v, local, axis=0) for k, v in cols.items()}, np.take(labels, local)
        first_cols, first_labels = held[int(pieces[0])]
        out = {k: np.empty((len(rows), *v.shape[1:]), v.dtype) for k, v in first_cols.items()}
        out_labels = np.empty(len(rows), first_labels.dtype)
        for j in pieces.tolist():
            at = np.flatnonzero(which == j)
            local = rows[at] - starts[j]
            cols, labels = held[j]
            for k, v in cols.items():
                out[k][at] = np.take(v, local, axis=0)
            out_labels[at] = np.take(labels, local)
        return out, out_labels

    def _order(self, epoch: int, window: int, n: int) -> np.ndarray:
        r = self._reader
        if not r.shuffle:
            return np.arange(n)
        return rng(r.seed, epoch, WINDOW_ORDER, r.rank, window).permutation(n)

    def _piece(self, j: int) -> tuple[Arrays, np.ndarray]:
        """Rows of piece ``j``; the last one is kept, as a piece may span two windows."""
        if self._cached is not None and self._cached[0] == j:
            return self._cached[1], self._cached[2]
        pieces = self._job.pieces
        for k in range(j, min(j + 1 + _READ_AHEAD, len(pieces))):
            if k not in self._reads:
                self._reads[k] = self._pool.submit(self._reader._read_piece, pieces[k])
        cols, labels = self._reads.pop(j).result()
        self._cached = (j, cols, labels)
        return cols, labels
