"""The mode registry: ``train.mode`` names an entry here; the modes live in :mod:`pipeline.train.modes`.

A mode is one module and one registry entry. Two kinds exist, told apart by
:attr:`Mode.launcher`, which names the driver-side launcher that runs it
(:mod:`pipeline.launch.fit` maps the name to the launcher):

* ``"barrier"`` — :class:`BarrierMode`: ``train.num_workers`` ranks started together (a Spark
  barrier job, or plain ``torchrun``), each running the one training loop of
  :mod:`pipeline.train.loop`. The mode supplies only what differs between ways of keeping
  the ranks' models in step: how the module is placed and wrapped, whether micro-batches
  defer gradient sync, how gradients are clipped, and how the full state is gathered for
  checkpoints and the bundle. Built in: ``ddp`` (:mod:`pipeline.train.modes.ddp`), ``fsdp``
  (:mod:`pipeline.train.modes.fsdp`).
* ``"rounds"`` — model averaging (``average``, :mod:`pipeline.train.modes.average`): one ordinary Spark job per
  round, no process group; the rounds driver lives in :mod:`pipeline.launch.rounds`.

Built-in modes are registered by name and imported on first use: this module imports no
torch. ``train.mode`` is checked where it is resolved, by :func:`get_mode` on the driver
before any rank starts (``fit``, ``spark-train train`` / ``run``, the estimator, every rank of
``python -m pipeline.worker``), not when a config is parsed: a rank rebuilding the config
needs no registration of its own (the driver hands it the mode it resolved). The mode's own
:meth:`Mode.check_config` runs in the training preflight
(:func:`pipeline.train.preflight.check_training_inputs`). :func:`register_mode` adds another
one at run time::

    class LocalMode(BarrierMode):            # one process, no process group
        name = "local"
        process_group = False

    register_mode(LocalMode())               # train.mode: local now trains through fit()

Spark-free.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

from pipeline.core.compat import deprecated
from pipeline.core.configbase import ConfigError
from pipeline.train.modetable import BUILTIN, REGISTERED, mode_names

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.data.shardset import ShardSet
    from pipeline.train.config import TrainConfig

__all__ = [
    "BarrierMode",
    "Mode",
    "WrapContext",
    "get_mode",
    "mode_names",
    "register_mode",
]


class Mode:
    """What every mode declares: its name, its launcher, and its own config and data checks."""

    name: ClassVar[str]
    """The ``train.mode`` value."""
    launcher: ClassVar[str]
    """Which driver-side launcher runs it (see the module docstring)."""

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse settings this mode cannot honour (raise ``ConfigError`` naming the key)."""

    def check_data(self, cfg: TrainConfig, shards: ShardSet) -> None:
        """Refuse a shard set this mode cannot train on, beyond the checks every mode makes."""


class WrapContext:
    """What :meth:`BarrierMode.wrap` may need besides the module (plain attributes)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, backend: str) -> None:
        self.cfg, self.device, self.backend = cfg, device, backend


class BarrierMode(Mode):
    """A mode whose ranks run the training loop together; defaults are a plain local model.

    The defaults describe one process training an unwrapped module: subclasses override
    what their way of synchronizing changes. Methods marked *collective* are called on every
    rank at the same point, so a mode may run collectives inside them.
    """

    launcher: ClassVar[str] = "barrier"
    process_group: ClassVar[bool] = True
    """Whether the loop joins a ``torch.distributed`` process group (``False``: one rank only)."""

    def check_config(self, cfg: TrainConfig) -> None:
        """Without a process group there is one rank."""
        if not self.process_group and cfg.max_workers != 1:
            raise ConfigError(
                "train.num_workers",
                f"must be 1 with train.mode {self.name!r} (it runs without a process group), "
                f"got {cfg.num_workers}",
            )

    def place(self, module: nn.Module, device: torch.device) -> nn.Module:
        """Put the freshly built module on ``device``; returns the module the optimizer steps."""
        return module.to(device)

    def wrap(self, module: nn.Module, ctx: WrapContext) -> nn.Module:
        """The module the loop runs forward and backward through (e.g. a DDP wrapper)."""
        return module

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Context for micro-batches that do not end an optimizer step."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> None:
        """Clip the global gradient norm of ``module`` to ``max_norm``."""
        from torch.nn.utils import clip_grad_norm_

        clip_grad_norm_(module.parameters(), max_norm)

    def full_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """*Collective*: ``(model_state, optimizer_state)`` complete on rank 0, for checkpoints."""
        return module.state_dict(), optimizer.state_dict()

    def load_state(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optim_state: dict[str, Any],
        *,
        source: str,
    ) -> None:
        """*Collective*: restore :meth:`full_state`'s output; ``source`` names its checkpoint."""
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)

    def consolidated(
        self, module: nn.Module, build: Callable[[], nn.Module], rank: int
    ) -> nn.Module | None:
        """*Collective*: a plain module with the trained weights on rank 0 (None elsewhere)."""
        return module if rank == 0 else None


# The name table lives in pipeline.train.modetable, which TrainConfig checks train.mode with.
_BUILTIN: Final = BUILTIN
_REGISTERED: Final[dict[str, Mode]] = REGISTERED


def register_mode(mode: Mode, *, replace: bool = False) -> Mode:
    """Make ``mode`` available as ``train.mode: <mode.name>``; returns it.

    Replacing a name already taken (a built-in one included) needs ``replace=True``; without
    it the replacement still happens (as in 0.1.0) but logs one deprecation line, and from
    0.4.0 it will raise ``ValueError``. Registering the very object already registered is a
    no-op.
    """
    name = getattr(mode, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a mode needs a non-empty string 'name', got {name!r}")
    if getattr(mode, "launcher", None) not in ("barrier", "rounds"):
        raise ValueError(
            f"mode {name!r}: launcher must be 'barrier' or 'rounds', "
            f"got {getattr(mode, 'launcher', None)!r}"
        )
    if not replace and _REGISTERED.get(name) is not mode and _taken(name):
        # 0.1.0 replaced silently; 0.4.0 will refuse. Until then the old call keeps working.
        deprecated(
            f"register_mode({name!r}) replacing a registered mode",
            f"register_mode(mode, replace=True) or another name than {name!r}",
            what="call",
        )
    _REGISTERED[name] = mode
    return mode


def _taken(name: str) -> bool:
    return name in _REGISTERED or name in _BUILTIN


def get_mode(name: str) -> Mode:
    """The mode registered as ``name``; ``ConfigError`` naming ``train.mode`` otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ConfigError(
            "train.mode", f"unknown mode {name!r}; known: {', '.join(map(repr, mode_names()))}"
        )
    module, _, attr = _BUILTIN[name].partition(":")
    mode = getattr(importlib.import_module(module), attr)
    _REGISTERED[name] = mode
    return mode


@contextlib.contextmanager
def registered(mode: Mode, *, replace: bool = False) -> Iterator[Mode]:
    """Register ``mode`` for the duration of a ``with`` block (tests, notebooks).

    ``replace`` as in :func:`register_mode`; the earlier entry comes back afterwards.
    """
    before = _REGISTERED.get(mode.name)
    register_mode(mode, replace=replace)
    try:
        yield mode
    finally:
        if before is None:
            _REGISTERED.pop(mode.name, None)
        else:
            _REGISTERED[mode.name] = before
