"""The torchrun environment contract, read from inside a training process.

The launcher (:mod:`pipeline.launch.launcher`) sets these variables in every Spark barrier task;
``torchrun`` sets the same ones without Spark. Training code reads them through
:func:`current` and picks its device and process-group backend with
:func:`device_and_backend`, so one training function runs unchanged under both.

This module imports neither pyspark nor (at import time) torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTEMPT",
    "DEVICE",
    "LAUNCH_REASON",
    "LOG_ADDR",
    "RUN_TOKEN",
    "TORCHRUN_VARS",
    "DistEnv",
    "current",
    "device_and_backend",
    "under_launcher",
]

TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
ATTEMPT = "SPARK_TRAIN_ATTEMPT"
"""0-based attempt number of the barrier job; a relaunch after a failure increments it."""
LAUNCH_REASON = "SPARK_TRAIN_LAUNCH_REASON"
"""Why the launcher started this attempt: ``first launch``, ``failure: …`` (the previous
attempt's cause), or why the ranks stopped on purpose (``preempted: …``, ``grow: …``)."""
RUN_TOKEN = "SPARK_TRAIN_RUN_TOKEN"
"""Random per-attempt token; also authenticates log/progress messages to the driver."""
LOG_ADDR = "SPARK_TRAIN_LOG_ADDR"
"""``host:port`` of the driver's log and progress server."""
DEVICE = "SPARK_TRAIN_DEVICE"
"""``cuda`` when Spark assigned this task a GPU, else ``cpu``. Unset under plain torchrun."""

_GPU_SETTING = "spark.task.resource.gpu.amount"


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    """Where a process sits in the job, as the launcher or torchrun describe it."""

    rank: int
    """Global rank, 0-based."""
    world_size: int
    """Number of ranks in the job."""
    local_rank: int
    """Rank among the processes on this host; also this process's index in CUDA_VISIBLE_DEVICES."""
    local_world_size: int
    """Number of ranks on this host."""
    master_addr: str
    """Host of rank 0, where the process-group store listens."""
    master_port: int
    """Free port on rank 0's host."""
    attempt: int
    """0-based relaunch attempt: the launcher's, or torchrun's restart count; else 0."""
    run_token: str
    """Random per-attempt token (empty outside the launcher)."""


def current(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the torchrun variables; a process started alone is rank 0 of a world of 1."""
    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        raw = env.get(name, "")
        try:
            return int(raw) if raw else default
        except ValueError:
            message = f"environment variable {name} must be an integer, got {raw!r}"
            raise ValueError(message) from None

    return DistEnv(
        rank=number("RANK", 0),
        world_size=number("WORLD_SIZE", 1),
        local_rank=number("LOCAL_RANK", 0),
        local_world_size=number("LOCAL_WORLD_SIZE", 1),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=number("MASTER_PORT", 29500),
        # the launcher's attempt, else torchrun's restart count (--max-restarts)
        attempt=number(ATTEMPT, number("TORCHELASTIC_RESTART_COUNT", 0)),
        run_token=env.get(RUN_TOKEN, ""),
    )


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a rank started by :func:`pipeline.launch.launcher.run_distributed`."""
    env = os.environ if environ is None else environ
    return bool(env.get(RUN_TOKEN)) and bool(env.get(LOG_ADDR))


def device_and_backend(
    prefer: Literal["auto", "cpu", "cuda"] = "auto",
) -> tuple[torch.device, str]:
    """Device and process-group backend of this rank: ``(cuda:i, "nccl")`` or ``(cpu, "gloo")``.

    Under the launcher the choice follows what Spark assigned the task (a GPU address → CUDA);
    under plain torchrun, ``auto`` takes CUDA when torch sees a GPU. The CUDA index is
    ``LOCAL_RANK`` (the launcher orders CUDA_VISIBLE_DEVICES by local rank), or 0 when the
    process sees exactly one GPU. ``prefer="cuda"`` raises a ``RuntimeError`` naming the Spark
    setting when no GPU is available; ``prefer="cpu"`` always returns CPU.
    """
    import torch

    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"prefer must be 'auto', 'cpu' or 'cuda', got {prefer!r}")
    assigned = os.environ.get(DEVICE)
    if prefer == "cpu" or (prefer == "auto" and assigned == "cpu"):
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        if prefer == "cuda" or assigned == "cuda":
            raise RuntimeError(_no_gpu_message(assigned))
        return torch.device("cpu"), "gloo"
    if prefer == "cuda" and assigned == "cpu":
        raise RuntimeError(_no_gpu_message(assigned))
    return torch.device("cuda", _cuda_index(torch.cuda.device_count())), "nccl"


def _cuda_index(visible: int) -> int:
    local_rank = current().local_rank
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees only {visible} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); "
            "start at most one rank per GPU on each host"
        )
    return local_rank


def _no_gpu_message(assigned: str | None) -> str:
    if assigned == "cpu":
        return (
            "a GPU was requested but Spark assigned this task none: set "
            f"'{_GPU_SETTING}' to 1 and 'spark.executor.resource.gpu.amount' (with a GPU "
            "discovery script) so every barrier task gets one GPU"
        )
    return (
        "a GPU was requested but torch sees none (torch.cuda.is_available() is False; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
    )
