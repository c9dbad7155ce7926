"""The executor side of scoring: a bundle loaded once per Python worker, batches predicted.

:func:`predict_partition` is the ``mapInArrow`` body :func:`pipeline.serve.score.score` runs:
every Arrow batch of a task goes through the model that :func:`cached_bundle` keeps in a
module-level cache keyed by the bundle URI and the sha256 of its weights (computed on the
driver), which later batches and later tasks in the same reused worker hit; a bundle
rewritten in place gets a new digest, hence a reload. Rows the validation flagged are not run
through the model; their outputs are null.

A batch's input columns become the training reader's :class:`~pipeline.data.batch.Batch`
(name → ``[B, *stored shape]`` in the stored dtype: the ``features`` vector and arrays
float32, images uint8 ``[B, H, W, C]`` from their decoded bytes), which goes through
:func:`pipeline.train.engine.to_model` with the bundle's recorded inputs (the training
normalization, channels-first images) and into the model as in training: ``model(x)`` for one
input column, ``model({name: x})`` for several. pyspark, numpy, pyarrow and torch are imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.runtime.threads import torch_threads

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.train.bundle import LoadedBundle
    from pipeline.train.inputs import ModelInput, ModelInputs

__all__ = [
    "CLASS_INDEX",
    "PREDICTION",
    "PROBABILITY",
    "VALUE",
    "Counter",
    "PredictJob",
    "cached_bundle",
    "predict_partition",
]

PREDICTION = "prediction"
PROBABILITY = "probability"
CLASS_INDEX = "_class_index"
"""Column of a batch's predicted class index (mapped to the label's values by the driver)."""
VALUE = "_value"
"""Column of a batch's regression value."""
_CACHE_MAX = 4  # bundles kept per worker process (other digests of the same URI are evicted)
_CACHE: OrderedDict[tuple[str, str], LoadedBundle] = OrderedDict()
_CACHE_LOCK = threading.Lock()


class Counter(Protocol):
    """What counts model loads (a Spark accumulator, or anything with ``add``)."""

    def add(self, term: int) -> None:
        """Add ``term``."""


@dataclass(frozen=True)
class PredictJob:
    """What each Python worker needs to predict (pickled into the ``mapInArrow`` closure)."""

    uri: str
    sha256: str
    task: str
    inputs: tuple[str, ...]
    """The batch's input columns (the model's, as ``model.json`` records them); not returned."""
    batch_size: int
    reason_column: str
    counter: Counter | None


def cached_bundle(uri: str, sha256: str, counter: Counter | None = None) -> LoadedBundle:
    """The bundle at ``uri`` whose weights hash to ``sha256``, loaded at most once per process.

    A miss loads it (checking the digest against the bytes loaded, so a bundle replaced
    since the driver hashed it fails with :class:`~pipeline.train.bundle.BundleError` instead of
    scoring with other weights), evicts other versions of the same URI, keeps at most
    ``_CACHE_MAX`` bundles, and adds 1 to ``counter`` (e.g. a Spark accumulator).
    """
    from pipeline.train.bundle import load_bundle

    key = (uri, sha256)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
        loaded = load_bundle(uri, expected_sha256=sha256)
        for stale in [k for k in _CACHE if k[0] == uri]:
            del _CACHE[stale]
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    if counter is not None:
        counter.add(1)
    return loaded


def predict_partition(
    batches: Iterator[pa.RecordBatch], job: PredictJob
) -> Iterator[pa.RecordBatch]:
    """The mapInArrow body: every batch of one task through the worker's cached model."""
    import torch

    bundle = cached_bundle(job.uri, job.sha256, job.counter)
    inputs = bundle.inputs
    with torch_threads(_task_cpus()), torch.inference_mode():
        for batch in batches:
            yield _predict_batch(bundle.model, inputs, batch, job)


def _task_cpus() -> int:
    """``spark.task.cpus`` inside a task (so tasks sharing a host do not oversubscribe it)."""
    import torch
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return int(ctx.cpus()) if ctx is not None else torch.get_num_threads()


def _predict_batch(
    model: torch.nn.Module, inputs: ModelInputs, batch: pa.RecordBatch, job: PredictJob
) -> pa.RecordBatch:
    """The batch without its input columns, plus the class index and probabilities, or the value.

    Rows with a validation reason are not run through the model; their outputs are null.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from pipeline.data.batch import Batch
    from pipeline.train.engine import to_model

    ok = pc.is_null(batch.column(job.reason_column)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok)
    taken = pa.array(rows)
    xs = {c.name: _tensor(batch.column(c.name).take(taken), c, job) for c in inputs.columns}
    chunks = []
    for i in range(0, len(rows), job.batch_size):
        part = {name: x[i : i + job.batch_size] for name, x in xs.items()}
        labels = torch.zeros(len(next(iter(part.values()))))
        x, _ = to_model(inputs, Batch(part, labels), torch.device("cpu"))
        chunks.append(model(x).float())
    out = torch.cat(chunks) if chunks else torch.zeros((0, 1))
    names = [n for n in batch.schema.names if n not in job.inputs]
    arrays = [batch.column(n) for n in names]
    missing = ~ok
    if job.task == "classification":
        probs = torch.softmax(out, dim=1).numpy() if chunks else np.zeros((0, 1), np.float32)
        index = np.zeros(len(ok), np.int32)
        index[rows] = probs.argmax(axis=1) if len(rows) else 0
        arrays += [pa.array(index, mask=missing), _list_array(probs, ok)]
        names += [CLASS_INDEX, PROBABILITY]
    else:
        value = np.zeros(len(ok), np.float64)
        value[rows] = out.reshape(-1).double().numpy()
        arrays.append(pa.array(value, mask=missing))
        names.append(VALUE)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _tensor(values: pa.Array, column: ModelInput, job: PredictJob) -> torch.Tensor:
    """``[rows, *stored shape]`` in the stored dtype, from one input column of a batch.

    ``list<float>`` (the ``features`` vector, arrays) or, for an image, the decoded pixels as
    ``binary`` (``H * W * C`` bytes a row), read as the training reader reads shards
    (:func:`pipeline.data.arrays.tensor_to_numpy`, every row checked); a row that does not
    fit is a :class:`~pipeline.train.bundle.BundleError` naming the bundle, column and row.
    """
    import torch

    from pipeline.data.arrays import tensor_to_numpy
    from pipeline.data.shardset import ShardSetError
    from pipeline.train.bundle import BundleError

    try:
        flat = tensor_to_numpy(values, column.column.spec, where=job.uri, source="the network")
    except ShardSetError as e:
        raise BundleError(str(e)) from None
    if not flat.flags.writeable:  # a view of Arrow's buffer; torch wants writable memory
        flat = flat.copy()
    return torch.from_numpy(flat)


def _list_array(probs: np.ndarray, ok: np.ndarray) -> pa.Array:
    """``list<float>`` with ``probs``' rows at the ``ok`` positions and nulls elsewhere."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(ok) + 1, np.int32)
    np.cumsum(np.where(ok, probs.shape[1], 0), out=offsets[1:])
    values = pa.array(probs.reshape(-1).astype(np.float32, copy=False))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~ok))
