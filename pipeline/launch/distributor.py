"""A drop-in for PySpark's ``TorchDistributor``, built on :func:`run_distributed`.

Migrating is one import::

    # from pyspark.ml.torch.distributor import TorchDistributor
    from pipeline import TorchDistributor

    model = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(train, 1e-3)

``run`` returns what PySpark's returns: rank 0's return value for a function, ``None`` for a
script. Every rank's result (return values, or exit codes for a script) stays on the
distributor as :attr:`TorchDistributor.results`. What differs is what
:func:`run_distributed` adds: each process is one Spark barrier task with the torchrun
environment (``init_process_group("env://")`` works unchanged), ranks' logs reach the
driver as ``[rank N] …``, a failure raises :class:`~pipeline.launch.errors.DistributedError`
(a ``RuntimeError``, as PySpark raises) naming the rank with its last output lines, and
``max_attempts`` / ``timeout_s`` are available as keyword arguments.

``local_mode=True`` (PySpark: processes on the driver) runs the ranks as tasks of a local
master, which are processes on the driver's machine; with a cluster master it is refused
(the ranks would not run on the driver) — pass ``local_mode=False``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.launch.launcher import run_distributed

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["TorchDistributor"]

_GPU_KEY = "spark.task.resource.gpu.amount"


class TorchDistributor:
    """Run a PyTorch function or script on ``num_processes`` ranks, as PySpark's does.

    Args:
        num_processes: number of ranks (one Spark barrier task each).
        local_mode: True: the ranks run on the driver's machine, which needs a local master
            (``local[N]``); False: on the executors.
        use_gpu: the ranks use GPUs: ``spark.task.resource.gpu.amount`` must be set, and
            each rank sees its task's GPUs as ``cuda:0``… (``LOCAL_RANK`` per host).
        spark: the session (default: the active one).
        max_attempts, timeout_s, env: as for :func:`run_distributed` (not in PySpark's).

    Raises:
        ValueError: ``num_processes`` is not a positive int, or ``local_mode=True`` with a
            cluster master.
        RuntimeError: ``use_gpu`` without ``spark.task.resource.gpu.amount`` (PySpark's message).
    """

    def __init__(
        self,
        num_processes: int = 1,
        local_mode: bool = True,
        use_gpu: bool = True,
        *,
        spark: SparkSession | None = None,
        max_attempts: int = 1,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from pyspark.sql import SparkSession

        if not isinstance(num_processes, int) or isinstance(num_processes, bool):
            raise ValueError(f"num_processes has to be a positive integer, got {num_processes!r}")
        if num_processes <= 0:
            raise ValueError(f"num_processes has to be a positive integer, got {num_processes}")
        self.spark = spark or SparkSession.active()
        self.num_processes = num_processes
        self.local_mode = local_mode
        self.use_gpu = use_gpu
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.env = dict(env or {})
        self.results: list[Any] | None = None
        """Every rank's return value (a function) or exit code (a script) of the last
        :meth:`run`, in rank order; None before the first run."""
        master = str(self.spark.conf.get("spark.master", "") or "")
        if local_mode and not master.startswith("local"):
            raise ValueError(
                f"local_mode=True runs the processes on the driver's machine, which needs a "
                f"local master; spark.master is {master!r}: pass local_mode=False to run them "
                "on the executors"
            )
        if use_gpu and float(self.spark.conf.get(_GPU_KEY, "0") or "0") <= 0:  # 0.5: shared
            raise RuntimeError(f"'{_GPU_KEY}' was unset, so gpu usage is unavailable.")

    def run(self, train_object: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> Any:
        """Run ``train_object`` on every rank; rank 0's return value, or None for a script.

        ``train_object`` is a function, called as ``train_object(*args, **kwargs)``, or the
        path of a ``.py`` script run with ``args`` (converted to strings, as PySpark does) as
        its command line. Raises :class:`~pipeline.launch.errors.DistributedError` when a
        rank fails (in every attempt).
        """
        script = isinstance(train_object, str)
        target: Callable[..., Any] | str = train_object
        if script:
            args = tuple(str(a) for a in args)
        elif kwargs and not isinstance(train_object, str):
            # the function's own keywords, never run_distributed's (env, spark, timeout_s, ...)
            target = functools.partial(train_object, **kwargs)
            kwargs = {}
        self.results = run_distributed(
            target,
            *args,
            num_workers=self.num_processes,
            spark=self.spark,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            env=self.env,
            **kwargs,
        )
        return None if script else self.results[0]
