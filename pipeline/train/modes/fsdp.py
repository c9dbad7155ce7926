"""Fully sharded data parallel training (``train.mode: fsdp``) with FSDP2's ``fully_shard``.

The training loop (:mod:`pipeline.train.loop`) runs unchanged in this mode — same launcher,
reader, checkpoints and bundle — and calls :class:`FsdpMode`'s hooks where DDP's behaviour
does not carry over:

* **Wrapping.** :func:`shard_model` applies ``fully_shard`` bottom-up on one 1-d device mesh
  over all ranks: each direct child of the model that holds parameters (a ``Linear`` or
  ``Conv`` layer of the built-in MLP and CNN; the members of a ``ModuleList``/``ModuleDict``)
  is its own communication unit, whose parameters are all-gathered just before it runs and
  freed after; then the root, which takes whatever parameters are left. Each rank keeps
  ``1/world_size`` of every parameter, gradient and optimizer state, so a model whose
  parameters and optimizer state fit no single device trains as long as the shards and one
  layer's full parameters do. The model is built on the host and each unit is moved to the
  device only while it is sharded.
* **Gradient accumulation** reduce-scatters every micro-batch into the sharded gradients
  (:class:`ShardedModel.no_sync` does not defer it): deferring, as DDP's ``no_sync`` does,
  would hold unsharded gradients of the whole model on every rank between optimizer steps,
  which is the memory that FSDP exists to save. The sum is the same.
* **Gradient clipping** (:func:`clip_grad_norm_`) takes the global norm of the sharded
  gradients (a ``DTensor`` reduction over all ranks) and scales every shard by the same factor.
* **bf16** stays the loop's autocast of the forward pass with fp32 parameters, as in DDP.
  ``train.comm_hook`` is DDP-only and refused with ``train.mode: fsdp`` by the config.

**Checkpoints hold the gathered full state, not ``torch.distributed.checkpoint`` shards.**
:func:`full_state` all-gathers the model's and the optimizer's state into plain CPU tensors
on rank 0 (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
``full_state_dict=True, cpu_offload=True``), and :class:`pipeline.train.checkpoint.CheckpointManager`
writes them as it writes DDP's: one ``state.pt`` in an atomic step directory, with its size
and sha256 in ``meta.json``, loaded only with ``torch.load(weights_only=True)``; on resume
every rank keeps its own shard of that state (:func:`load_full_state`). We chose this over
DCP's sharded format because DCP writes one file per rank from every rank into the same
directory and reads its ``.metadata`` back with ``pickle``: it would need a second commit
protocol (every rank's files complete before the rename) and would lose the weights-only
guarantee, while the gathered state keeps every guarantee of the existing manager and the same
format as a DDP checkpoint. The cost is that rank 0 holds the whole model and optimizer state
in host memory while it saves — the right trade for models that outgrow one GPU but not the
host; beyond that, DCP's sharded save would be the next step.

The bundle gets the consolidated weights too (:func:`consolidated_model`): a plain module on
rank 0 that :func:`pipeline.train.bundle.write_bundle` saves as ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.core.configbase import check
from pipeline.train.registry import BarrierMode, WrapContext

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig

__all__ = [
    "MODE",
    "FsdpMode",
    "ShardedModel",
    "clip_grad_norm_",
    "consolidated_model",
    "full_state",
    "load_full_state",
    "shard_model",
    "sharding_units",
]

# Gathered onto rank 0's host memory; the other ranks get empty dicts.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank passes the full state and keeps its own shard of it.
_SCATTER = StateDictOptions(full_state_dict=True, strict=True)


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that get a ``fully_shard`` unit of their own, in model order.

    Each direct child that holds parameters, except containers without a ``forward`` of their
    own (``ModuleList``, ``ModuleDict``), whose members are taken instead: FSDP2 gathers a
    unit's parameters in a hook on its ``forward``, which a container never runs.
    """
    units: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += sharding_units(child)
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_model(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``module`` in place over every rank of the default process group; returns it.

    ``device`` (this rank's ``cuda:i`` or ``cpu``) gives the mesh's device type; the parameters
    move there unit by unit as they are sharded. The result's parameters are ``DTensor``
    shards: build the optimizer from them, after this call.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in sharding_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


class ShardedModel(nn.Module):
    """The training loop's view of a sharded model, with DDP's ``forward`` and ``no_sync``.

    FSDP2 shards the module in place and has no ``no_sync``; this thin wrapper lets the loop
    drive both modes the same way. Its own ``state_dict`` is never used: checkpoints and the
    bundle go through :func:`full_state` and :func:`consolidated_model`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, FSDPModule):
            raise TypeError(f"expected a module sharded by shard_model, got {type(module)}")
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the sharded model (its hooks all-gather each unit's parameters)."""
        return cast(torch.Tensor, self.module(x))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients of micro-batches inside still reduce-scatter (see the module docstring)."""
        yield


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm.

    With ``DTensor`` (sharded) gradients the per-rank norms are partial: ``full_tensor``
    reduces them over the mesh, so every rank clips by the norm of the whole gradient.
    """
    params = [p for p in parameters if p.grad is not None]
    total = nn.utils.get_total_norm([cast(torch.Tensor, p.grad) for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: ``(model_state, optimizer_state)`` as full CPU tensors on rank 0.

    Every rank must call it; ranks other than 0 get two empty dicts. The optimizer's state
    and param groups name parameters by their fully qualified names.
    """
    model_state = get_model_state_dict(module, options=_GATHER)
    optim_state = get_optimizer_state_dict(module, optimizer, options=_GATHER)
    return dict(model_state), dict(optim_state)


def load_full_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: Mapping[str, Any],
    optim_state: Mapping[str, Any],
    *,
    source: str,
) -> None:
    """Collective: restore what :func:`full_state` saved; each rank keeps its own shards.

    ``source`` (the checkpoint's URI) names the origin of a state that does not fit.
    """
    groups = optim_state.get("param_groups") or []
    if any(not isinstance(p, str) for g in groups for p in g.get("params", [])):
        raise ValueError(
            f"{source} was written by train.mode 'ddp' (its optimizer state names parameters "
            "by position): resume it with train.mode: ddp, or start this fsdp run in an "
            "empty train.checkpoint.dir"
        )
    # The optimizer first: when it has no state yet, loading creates it with a step at
    # learning rate 0, and the weights loaded after that step are then exactly the saved ones.
    set_optimizer_state_dict(module, optimizer, dict(optim_state), options=_SCATTER)
    set_model_state_dict(module, dict(model_state), options=_SCATTER)


def consolidated_model(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """Collective: a plain CPU module with the full trained weights on rank 0, None elsewhere.

    ``build()`` makes an unsharded model of the same architecture; its fresh parameters are
    replaced by (not copied into) the gathered ones, and a mismatch raises naming the keys.
    """
    state = get_model_state_dict(module, options=_GATHER)
    if dist.get_rank() != 0:
        return None
    plain = build()
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


class FsdpMode(BarrierMode):
    """Parameters, gradients and optimizer state sharded over the ranks (FSDP2)."""

    name: ClassVar[str] = "fsdp"

    def check_config(self, cfg: TrainConfig) -> None:
        """``train.comm_hook`` is DDP's; FSDP reduce-scatters gradients itself."""
        super().check_config(cfg)
        check(
            cfg.comm_hook == "none",
            "train.comm_hook",
            f"{cfg.comm_hook!r} is a DDP communication hook; train.mode 'fsdp' "
            "reduce-scatters gradients itself: set it to 'none'",
        )

    def place(self, module: nn.Module, device: torch.device) -> nn.Module:
        """:func:`shard_model`: each unit moves to ``device`` as it is sharded."""
        return shard_model(module, device)

    def wrap(self, module: nn.Module, ctx: WrapContext) -> nn.Module:
        """:class:`ShardedModel` (DDP's interface over the in-place sharded module)."""
        return ShardedModel(module)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Micro-batches still reduce-scatter (see the module docstring)."""
        assert isinstance(model, ShardedModel), "wrap() made the sharded model"
        return model.no_sync()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> None:
        """:func:`clip_grad_norm_`: the global norm of the sharded gradients."""
        clip_grad_norm_(module.parameters(), max_norm)

    def full_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:func:`full_state`: gathered onto rank 0."""
        return full_state(module, optimizer)

    def load_state(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optim_state: dict[str, Any],
        *,
        source: str,
    ) -> None:
        """:func:`load_full_state`: each rank keeps its own shard."""
        load_full_state(module, optimizer, model_state, optim_state, source=source)

    def consolidated(
        self, module: nn.Module, build: Callable[[], nn.Module], rank: int
    ) -> nn.Module | None:
        """:func:`consolidated_model`."""
        return consolidated_model(module, build)


MODE = FsdpMode()
