"""A model for the elastic tests: an MLP that records the rows each rank trains on.

``train.model.builder: tests.recording:recording_mlp`` with ``args.record_dir``: every
training forward appends one JSON line ``{"world": W, "first": [...]}`` — the first feature
of each row of the batch, which identifies the row in :func:`tests.shards.make_shardset`
data — to ``<record_dir>/a<attempt>-r<rank>.jsonl``. ``args.hold`` (``{attempt: n}``) makes
every rank of that launch attempt wait, before its forward number ``n + 1``, until the file
``<record_dir>/go-<attempt>`` exists: the test then knows where training stands while it
kills or adds a worker (bounded by ``HOLD_S``). A waiting rank says so in
``<record_dir>/held-a<attempt>-r<rank>`` (:func:`held`): its records alone are complete as
soon as the forward before the hold ran, before that step's backward and checkpoint.
Evaluation forwards are not recorded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.train.models import mlp

__all__ = ["HOLD_S", "held", "recording_mlp", "records"]

HOLD_S = 300.0


class _Recording(nn.Module):
    def __init__(self, inner: nn.Module, record_dir: str, hold: Mapping[str, int]) -> None:
        super().__init__()
        self.inner = inner
        self._dir = Path(record_dir)
        self._hold = {str(k): int(v) for k, v in hold.items()}
        self._count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type != "meta":  # (the driver's check runs on meta)
            attempt = os.environ.get("SPARK_TRAIN_ATTEMPT", "0")
            if self._hold.get(attempt) == self._count:
                (self._dir / f"held-a{attempt}-r{os.environ['RANK']}").touch()
                self._wait(self._dir / f"go-{attempt}")
            line = {"world": int(os.environ["WORLD_SIZE"]), "first": x[:, 0].tolist()}
            path = self._dir / f"a{attempt}-r{os.environ['RANK']}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            self._count += 1
        return self.inner(x)  # type: ignore[no-any-return]

    @staticmethod
    def _wait(flag: Path) -> None:
        deadline = time.monotonic() + HOLD_S
        while not flag.exists():  # the test creates it: nothing to be notified by
            if time.monotonic() > deadline:
                raise TimeoutError(f"{flag} did not appear within {HOLD_S:.0f} s")
            time.sleep(0.1)


def recording_mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    record_dir: str,
    hold: Mapping[str, int] | None = None,
    hidden: Sequence[int] = (8,),
) -> nn.Module:
    """:func:`pipeline.train.models.mlp` that records each training batch (module docstring)."""
    inner = mlp(input_shape=input_shape, num_outputs=num_outputs, hidden=list(hidden))
    return _Recording(inner, record_dir, hold or {})


def records(record_dir: Path, attempt: int) -> dict[int, list[dict[str, Any]]]:
    """Attempt ``attempt``'s records by rank."""
    out = {}
    for path in sorted(record_dir.glob(f"a{attempt}-r*.jsonl")):
        rank = int(path.stem.split("-r")[1])
        out[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def held(record_dir: Path, attempt: int) -> set[int]:
    """The ranks of attempt ``attempt`` waiting at their hold (or past it)."""
    return {int(p.name.split("-r")[1]) for p in record_dir.glob(f"held-a{attempt}-r*")}
