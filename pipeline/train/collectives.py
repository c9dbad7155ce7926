"""The few collectives the training loop uses, over a process group or over one process.

:class:`ProcessGroup` joins ``torch.distributed``'s default group (the torchrun environment
that the Spark launcher or torchrun set); :class:`SingleProcess` is the same interface for a
mode that runs without one (:attr:`pipeline.train.modes.BarrierMode.process_group`), where
every collective is the identity. Spark-free.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Collectives", "ProcessGroup", "SingleProcess", "init_process_group"]


class Collectives(abc.ABC):
    """Sums and object exchange between the ranks of one training job."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""

    @abc.abstractmethod
    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (rank order); None on the other ranks."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group."""

    def any_of(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag OR-ed over the ranks.

        A sum through :meth:`all_reduce` of a CPU tensor; :class:`ProcessGroup` keeps it on
        the CPU under any backend.
        """
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        self.all_reduce(t)
        return [bool(v > 0) for v in t.tolist()]

    def sum_floats(self, *values: torch.Tensor | float, device: torch.device) -> list[float]:
        """Sum scalars over all ranks (in float64)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        self.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def on_rank0(self, fn: Callable[[], Any], what: str, error: type[Exception]) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result, or its failure.

        Other ranks would otherwise wait in their next collective until ``train.timeout_s``;
        here they raise ``error`` with rank 0's message at once.
        """
        box: Any = None
        failure: Exception | None = None
        if self.rank == 0:
            try:
                box = ("ok", fn())
            except Exception as e:
                box, failure = ("error", f"{type(e).__name__}: {e}"), e
        status, value = self.broadcast_object(box)
        if failure is not None:
            raise failure
        if status == "error":
            raise error(f"rank 0 failed to {what}: {value}")
        return value


class ProcessGroup(Collectives):
    """The default ``torch.distributed`` process group (joined by :func:`init_process_group`)."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._cpu_group: Any = None  # gloo, for any_of under another backend

    def any_of(self, flags: Sequence[bool]) -> list[bool]:
        """``dist.all_reduce`` (max) of the flags as a CPU tensor, over gloo.

        Under NCCL a side gloo group (made by every rank at its first call) carries it, so
        reading the answer never waits for the GPU's queue.
        """
        if self._cpu_group is None:
            default = dist.get_backend()
            self._cpu_group = (
                dist.group.WORLD if default == "gloo" else dist.new_group(backend="gloo")
            )
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return [bool(v) for v in t.tolist()]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """``dist.all_reduce`` (sum)."""
        dist.all_reduce(tensor)

    def gather_object(self, obj: Any) -> list[Any] | None:
        """``dist.gather_object`` onto rank 0."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """``dist.broadcast_object_list`` from rank 0."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """``dist.destroy_process_group``."""
        dist.destroy_process_group()


class SingleProcess(Collectives):
    """One rank, no process group: every collective is the identity."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Nothing to add."""

    def gather_object(self, obj: Any) -> list[Any] | None:
        """``[obj]``."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """``obj``."""
        return obj

    def close(self) -> None:
        """No group to leave."""

    def any_of(self, flags: Sequence[bool]) -> list[bool]:
        """The flags themselves."""
        return [bool(f) for f in flags]


def init_process_group(backend: str, timeout: timedelta) -> ProcessGroup:
    """``init_process_group("env://")``, with a fresh store namespace on torchrun restarts.

    torchrun (``--max-restarts``) keeps its agent store across restarts, and gloo's
    rendezvous would read the dead attempt's addresses from it ("Connection refused").
    Prefixing the keys with the restart count gives every attempt its own namespace.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart in ("", "0"):
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return ProcessGroup()
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"spark-train/restart-{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    return ProcessGroup()
