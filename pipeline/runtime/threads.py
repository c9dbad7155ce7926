"""Torch's intra-op thread count for one task: :func:`torch_threads`.

Ranks (:mod:`pipeline.runtime.rankrun`) and scoring tasks (:mod:`pipeline.serve.predict`)
sharing a host each take ``spark.task.cpus`` threads, so they do not oversubscribe it.

Spark-free; imports no torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Give torch ``n`` threads (at least one) inside the ``with`` block, then restore the count.

    Only a torch already imported is touched: one imported later, by the code inside, takes
    its count from ``OMP_NUM_THREADS`` (see :func:`pipeline.runtime.rankrun.rank_environment`),
    and importing it here would cost every fresh worker seconds.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
