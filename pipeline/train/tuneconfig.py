"""The fine-tuning sections of ``train``: ``train.init`` and ``train.freeze``.

Initial weights and frozen parameters; re-exported by :mod:`pipeline.train.config`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.core.configbase import check

__all__ = ["FreezeConfig", "InitConfig"]


def _frozen_mapping(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


def _replacement_problem(pattern: str, replacement: str) -> str | None:
    """Why ``replacement`` cannot replace ``pattern`` (a group it does not have), or None."""
    try:
        re.sub(pattern, replacement, "")  # the template is checked even without a match
    except (re.error, TypeError) as e:
        return str(e)
    return None


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Initial weights from a file or directory (``train.init``), instead of random ones."""

    uri: str | None = None
    """Where the initial weights are (any storage URI): a ``.safetensors`` file, a torch
    state dict (``.pt`` / ``.pth`` / ``.bin``, loaded with ``weights_only=True``), a model
    bundle of ours, or a Hugging Face model directory (``model.safetensors`` or
    ``pytorch_model.bin``, sharded ones through their index). Null: random initialisation.
    The driver checks it against the model before any rank starts; the bundle records it
    and its sha256 (``model.json`` ``init``)."""

    format: Literal["auto", "safetensors", "torch", "bundle", "huggingface"] = "auto"
    """How to read ``uri``: ``auto`` decides by its name (``.safetensors``; ``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``; a directory with ``model.json`` is a bundle, one with
    ``config.json`` a Hugging Face model)."""

    rename: Mapping[str, str] = field(default_factory=_frozen_mapping)
    """``{regex: replacement}`` applied to every key of the file, in the order written
    (``re.sub``; e.g. ``{"^backbone\\.": ""}``), before ``skip`` and before matching the
    model's keys."""

    skip: tuple[str, ...] = ()
    """Glob patterns (``fnmatch``) of keys, after ``rename``, not to load: e.g. ``fc.*`` for
    a head that gets another number of outputs."""

    strict: bool = False
    """``true``: every model key must be loaded and every key of the file used (after
    ``skip``); ``false``: keys that are missing or unexpected are counted in the summary
    line and the model keeps its initialisation for them. A shape mismatch that no ``skip``
    covers is an error either way."""

    def __post_init__(self) -> None:
        check(
            self.uri is None or bool(self.uri.strip()),
            "train.init.uri",
            "must be a URI or null",
        )
        for pattern, replacement in self.rename.items():
            problem = _regex_problem(pattern)
            check(
                problem is None,
                f"train.init.rename.{pattern}",
                f"is not a regular expression: {problem}",
            )
            problem = _replacement_problem(pattern, replacement)
            check(
                problem is None,
                f"train.init.rename.{pattern}",
                f"replacement {replacement!r} does not fit the pattern: {problem}",
            )
        for i, pattern in enumerate(self.skip):
            check(bool(pattern.strip()), f"train.init.skip[{i}]", "must not be empty")
        if self.uri is None:
            check(
                not (self.rename or self.skip or self.strict),
                "train.init.uri",
                "is null, but train.init has rename / skip / strict: set the URI",
            )


@dataclass(frozen=True, kw_only=True)
class FreezeConfig:
    """Parameters that do not train (``train.freeze``), e.g. a pretrained backbone."""

    patterns: tuple[str, ...] = ()
    """Glob patterns (``fnmatch``) of parameter names (as in the model's ``state_dict``,
    e.g. ``conv1.*``, ``layer*``, ``bert.embeddings.*``): matching parameters get
    ``requires_grad = False`` and are left out of the optimizer, so they end the run
    bitwise as they started. A pattern that matches no parameter is an error. Buffers
    (BatchNorm running statistics) are not parameters: they still update in training."""

    epochs: int | None = None
    """Keep them frozen for this many epochs, then train them too, in parameter groups of
    their own that follow the schedule (null: the whole run). ``train.mode: ddp`` only."""

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.patterns):
            check(bool(pattern.strip()), f"train.freeze.patterns[{i}]", "must not be empty")
        if self.epochs is not None:
            check(
                self.epochs >= 1, "train.freeze.epochs", f"must be >= 1 or null, got {self.epochs}"
            )
            check(
                bool(self.patterns),
                "train.freeze.epochs",
                "is set but train.freeze.patterns is empty",
            )
