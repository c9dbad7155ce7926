"""Built-in model builders and the resolver for ``train.model.builder``.

A builder is any callable ``f(*, input_shape, num_outputs, **args) -> nn.Module``.
``input_shape`` is the shape one row's feature vector is viewed as (``(D,)`` for an MLP,
``(C, L)`` or ``(C, H, W)`` for a CNN); the model receives flat ``[B, prod(input_shape)]``
float32 batches and reshapes them itself, so the reader, the loop and the scorer never need
to know the model's layout.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BuilderError", "build_model", "cnn", "mlp", "resolve_builder"]

_KEY = "train.model.builder"


class BuilderError(ValueError):
    """``train.model.builder`` cannot be resolved, or its result is not a usable module."""


class _Reshape(nn.Module):
    """View flat ``[B, prod(shape)]`` rows as ``[B, *shape]``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _check_shape(input_shape: Sequence[int], ranks: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in ranks or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must have {' or '.join(map(str, ranks))} positive dimensions, "
            f"got {tuple(input_shape)}"
        )
    return shape


def mlp(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> nn.Module:
    """A multilayer perceptron: ``Linear → ReLU (→ Dropout)`` per hidden width, then a head.

    Args:
        input_shape: shape of one row's features; flattened, so any rank works.
        num_outputs: logits per row (classes) or 1 (regression).
        hidden: widths of the hidden layers (empty: a linear model).
        dropout: dropout probability after each hidden activation.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    width = math.prod(_check_shape(input_shape, (1, 2, 3)))
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        if int(h) < 1:
            raise ValueError(f"hidden widths must be >= 1, got {list(hidden)}")
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def cnn(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (16, 32),
) -> nn.Module:
    """A small CNN for fixed-shape tensor columns stored as flat feature vectors.

    Each row is viewed as ``input_shape``: ``(C, L)`` uses 1-d convolutions, ``(C, H, W)``
    2-d ones, and a bare ``(L,)`` is treated as ``(1, L)``. Every stage is
    ``Conv(k=3, pad=1) → ReLU → MaxPool(2)`` (pooling only while the size allows), followed
    by global average pooling and a linear head.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    shape = _check_shape(input_shape, (1, 2, 3))
    if len(shape) == 1:
        shape = (1, shape[0])
    if len(channels) < 1 or any(int(c) < 1 for c in channels):
        raise ValueError(
            f"channels must be a non-empty list of positive ints, got {list(channels)}"
        )
    two_d = len(shape) == 3
    conv: type[nn.Conv1d | nn.Conv2d] = nn.Conv2d if two_d else nn.Conv1d
    pool: type[nn.MaxPool1d | nn.MaxPool2d] = nn.MaxPool2d if two_d else nn.MaxPool1d
    layers: list[nn.Module] = [_Reshape(shape)]
    in_ch, size = shape[0], min(shape[1:])
    for c in channels:
        layers += [conv(in_ch, int(c), kernel_size=3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(pool(2))
            size //= 2
        in_ch = int(c)
    layers += [
        nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(in_ch, num_outputs),
    ]
    return nn.Sequential(*layers)


def resolve_builder(spec: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:function"``; errors name ``train.model.builder``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BuilderError(f"{_KEY}: expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BuilderError(f"{_KEY}: cannot import module {module_name!r} of {spec!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BuilderError(f"{_KEY}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BuilderError(f"{_KEY}: {spec!r} is a {type(obj).__name__}, not callable")
    return obj


def build_model(
    spec: str, *, input_shape: Sequence[int], num_outputs: int, args: dict[str, Any] | None = None
) -> nn.Module:
    """Resolve ``spec`` and call it; the result must be an ``nn.Module``."""
    builder = resolve_builder(spec)
    try:
        model = builder(input_shape=tuple(input_shape), num_outputs=num_outputs, **(args or {}))
    except (TypeError, ValueError) as e:
        raise BuilderError(
            f"{_KEY}: {spec!r} rejected its arguments (train.model.args): {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise BuilderError(
            f"{_KEY}: {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
