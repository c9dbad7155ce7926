"""Starting from a pretrained model: initial weights, frozen parameters, per-pattern LRs.

* ``train.init`` (:class:`~pipeline.train.config.InitConfig`): :func:`open_source` finds the
  weights (a ``.safetensors`` file, a torch state dict loaded with ``weights_only=True``, one
  of our bundles, a Hugging Face model directory), :func:`plan` maps the file's keys onto the
  model's (``rename``, then ``skip``; shapes must agree), :func:`load_initial` copies them in.
  The driver runs :func:`check_init` before launch (:mod:`pipeline.train.preflight`): a
  missing file, a file of another format, no key in common or a shape mismatch is a
  ``ConfigError`` naming the ``train.init`` key, and it logs one summary line.
* ``train.freeze`` and ``train.optimizer.lr_multipliers``: :func:`apply_freeze` turns
  ``requires_grad`` off for matching parameters, :func:`param_groups` gives the optimizer
  the others, grouped by learning-rate factor.

Spark-free: ranks and model averaging's tasks load the weights themselves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import safetensors
import safetensors.torch
import torch
from torch import nn

from pipeline.core import storage
from pipeline.core.configbase import ConfigError
from pipeline.train.config import FreezeConfig, InitConfig, OptimizerConfig

__all__ = [
    "InitPlan",
    "InitSource",
    "apply_freeze",
    "check_init",
    "load_initial",
    "open_source",
    "param_groups",
    "plan",
    "unfreeze",
]

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SHOWN = 3  # keys named per problem in an error message


@dataclass(frozen=True)
class InitSource:
    """Where ``train.init.uri`` keeps its tensors: format and the files, in order."""

    uri: str
    format: str
    """``safetensors``, ``torch``, ``bundle`` or ``huggingface``."""
    files: tuple[str, ...]
    """The weight files (several for a sharded Hugging Face checkpoint)."""

    def read(self) -> tuple[dict[str, torch.Tensor], str]:
        """``(tensors, sha256)``: every tensor, and the sha256 of the bytes they came from.

        Several files (a sharded checkpoint) hash as the sha256 of their sha256s in order.
        """
        tensors: dict[str, torch.Tensor] = {}
        digests = []
        for uri in self.files:
            data = _read(uri)
            digests.append(hashlib.sha256(data).hexdigest())
            tensors.update(_decode(uri, data))
        if len(digests) == 1:
            return tensors, digests[0]
        return tensors, hashlib.sha256("".join(digests).encode()).hexdigest()

    def record(self, sha256: str) -> dict[str, Any]:
        """What ``model.json`` records under ``init``."""
        return {"uri": self.uri, "format": self.format, "sha256": sha256}


def _read(uri: str) -> bytes:
    fs, path = storage.resolve(uri)
    try:
        return storage.read_bytes(fs, path)
    except FileNotFoundError as e:
        raise ConfigError("train.init.uri", f"{uri} does not exist") from e


def _decode(uri: str, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of one file: safetensors by its header, else a weights-only torch load."""
    if uri.endswith(".safetensors") or _looks_like_safetensors(data):
        try:
            return dict(safetensors.torch.load(data))
        except (safetensors.SafetensorError, ValueError) as e:
            raise ConfigError(
                "train.init.uri", f"{uri} is not a valid safetensors file: {e}"
            ) from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            "train.init.uri",
            f"{uri} is neither a safetensors file nor a torch state dict that loads with "
            f"weights_only=True ({first})",
        ) from e
    return _state_dict(uri, obj)


def _looks_like_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON object."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 0 < size <= len(data) - 8 and data[8:9] == b"{"


def _state_dict(uri: str, obj: Any) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` mapping, also when nested under ``state_dict`` or ``model``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return {str(k): v for k, v in inner.items()}
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
    raise ConfigError(
        "train.init.uri",
        f"{uri} holds a {type(obj).__name__} that is not a state dict (a mapping of names to "
        "tensors, at the top or under 'state_dict' / 'model')",
    )


def open_source(cfg: InitConfig) -> InitSource:
    """Find the weight files of ``train.init.uri`` (no tensor is read yet)."""
    assert cfg.uri is not None, "train.init.uri is set"
    uri = cfg.uri.rstrip("/")
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError("train.init.uri", f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        fmt: str = cfg.format
        if fmt == "auto":
            fmt = "safetensors" if uri.endswith(".safetensors") else "torch"
        if fmt not in ("safetensors", "torch"):
            raise ConfigError(
                "train.init.format", f"is {fmt!r} but {uri} is a file, not a directory"
            )
        return InitSource(uri, fmt, (uri,))
    has = {
        name: storage.exists(fs, storage.join(path, name)) for name in ("model.json", "config.json")
    }
    fmt = cfg.format
    if fmt == "auto":
        fmt = "bundle" if has["model.json"] else "huggingface" if has["config.json"] else ""
    if fmt == "bundle":
        return InitSource(uri, fmt, (storage.join(uri, "model.safetensors"),))
    if fmt == "huggingface":
        return InitSource(uri, fmt, _hf_files(uri))
    if fmt in ("safetensors", "torch"):
        raise ConfigError("train.init.format", f"is {fmt!r} but {uri} is a directory")
    raise ConfigError(
        "train.init.uri",
        f"{uri} is a directory without model.json (a bundle) or config.json (a Hugging Face "
        "model): name the weights file itself",
    )


def _hf_files(uri: str) -> tuple[str, ...]:
    """The weight files of a Hugging Face model directory (the index of a sharded one)."""
    fs, path = storage.resolve(uri)
    for name in _HF_WEIGHTS:
        if not storage.exists(fs, storage.join(path, name)):
            continue
        if not name.endswith(".index.json"):
            return (storage.join(uri, name),)
        index = json.loads(storage.read_bytes(fs, storage.join(path, name)))
        files = sorted(set((index.get("weight_map") or {}).values()))
        if not files:
            raise ConfigError("train.init.uri", f"{uri}/{name} has no weight_map")
        return tuple(storage.join(uri, f) for f in files)
    raise ConfigError(
        "train.init.uri",
        f"{uri} is a Hugging Face model directory without weights (none of "
        f"{', '.join(_HF_WEIGHTS)})",
    )


@dataclass(frozen=True)
class InitPlan:
    """Which key of the file goes to which key of the model, and what is left over."""

    mapping: dict[str, str]
    """File key (as written) → model key."""
    skipped: tuple[str, ...]
    missing: tuple[str, ...]
    """Model keys that get nothing (they keep their initialisation)."""
    unexpected: tuple[str, ...]
    """File keys (after rename) that the model does not have."""

    def summary(self, source: InitSource, sha256: str) -> str:
        """The one log line of ``train.init``."""
        return (
            f"train.init: {len(self.mapping)} tensors loaded from {source.uri} "
            f"({source.format}, sha256 {sha256[:12]}), {len(self.skipped)} skipped, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def plan(
    cfg: InitConfig,
    source_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    where: str,
) -> InitPlan:
    """Map the file's keys onto the model's; ``ConfigError`` naming the ``train.init`` key.

    Errors: no key in common, a shape that differs and no ``skip`` covers, and with
    ``strict`` any missing or unexpected key.
    """
    mapping: dict[str, str] = {}
    skipped, unexpected, mismatched = [], [], []
    for key in source_shapes:
        name = key
        for pattern, replacement in cfg.rename.items():
            name = re.sub(pattern, replacement, name)
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.skip):
            skipped.append(name)
        elif name not in model_shapes:
            unexpected.append(name)
        elif tuple(model_shapes[name]) != tuple(source_shapes[key]):
            mismatched.append(
                f"{name} {list(source_shapes[key])} vs the model's {list(model_shapes[name])}"
            )
        else:
            mapping[key] = name
    if mismatched:
        raise ConfigError(
            "train.init.skip",
            f"{len(mismatched)} tensor(s) of {where} do not fit the model: "
            f"{'; '.join(mismatched[:_SHOWN])}: add their names to train.init.skip "
            "(e.g. a head of another size)",
        )
    loaded = set(mapping.values())
    missing = tuple(sorted(k for k in model_shapes if k not in loaded))
    if not mapping:
        raise ConfigError(
            "train.init.uri",
            f"no tensor of {where} matches a model key (file: {_names(source_shapes)}; model: "
            f"{_names(model_shapes)}): map the names with train.init.rename",
        )
    if cfg.strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} model key(s) get nothing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of the file are unused ({_names(unexpected)})")
        raise ConfigError(
            "train.init.strict",
            f"is true but {where}: {'; '.join(parts)}: use train.init.skip / rename, or "
            "strict: false",
        )
    return InitPlan(mapping, tuple(sorted(skipped)), missing, tuple(sorted(unexpected)))


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_init(cfg: InitConfig, model: nn.Module) -> dict[str, Any]:
    """The driver's check of ``train.init`` against ``model`` (may be on ``meta``).

    Reads the weights, plans the mapping, logs the summary line; returns the record the
    bundle keeps.
    """
    source = open_source(cfg)
    tensors, sha = source.read()
    result = plan(cfg, _shapes(tensors), _shapes(model.state_dict()), source.uri)
    log.info("%s", result.summary(source, sha))
    return source.record(sha)


def load_initial(cfg: InitConfig, model: nn.Module) -> dict[str, Any]:
    """Copy ``train.init``'s tensors into ``model``; returns ``model.json``'s ``init`` record."""
    source = open_source(cfg)
    tensors, sha = source.read()
    result = plan(cfg, _shapes(tensors), _shapes(model.state_dict()), source.uri)
    state = {name: tensors[key] for key, name in result.mapping.items()}
    model.load_state_dict(state, strict=False)
    log.debug("%s", result.summary(source, sha))
    return source.record(sha)


# -- freezing and learning rates -----------------------------------------------------------
def _matching(model: nn.Module, patterns: Iterable[tuple[str, str]]) -> set[str]:
    """Parameter names matching any ``(pattern, config key)``; a pattern matching none is an error."""
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for pattern, key in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(
                key,
                f"{pattern!r} matches no parameter of the model (its parameters: {_names(names)})",
            )
        out |= hits
    return out


def _freeze_patterns(cfg: FreezeConfig) -> list[tuple[str, str]]:
    return [(p, f"train.freeze.patterns[{i}]") for i, p in enumerate(cfg.patterns)]


def apply_freeze(model: nn.Module, cfg: FreezeConfig) -> set[str]:
    """``requires_grad = False`` for parameters matching ``train.freeze.patterns``; their names."""
    frozen = _matching(model, _freeze_patterns(cfg))
    trainable = 0
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
        trainable += p.requires_grad
    if frozen and not trainable:
        raise ConfigError(
            "train.freeze.patterns", "freeze every parameter of the model: nothing would train"
        )
    return frozen


def unfreeze(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Train the parameters ``train.freeze.patterns`` froze; the names, in model order."""
    frozen = _matching(model, _freeze_patterns(cfg))
    names = []
    for name, p in model.named_parameters():
        if name in frozen and not p.requires_grad:
            p.requires_grad_(True)
            names.append(name)
    return names


def param_groups(
    model: nn.Module, cfg: OptimizerConfig, only: set[str] | None = None
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: trainable parameters by learning-rate factor.

    A parameter takes the factor of the first ``train.optimizer.lr_multipliers`` pattern
    its name matches (1 without one); each group's ``lr`` is ``train.optimizer.lr`` × factor.
    ``only`` restricts the groups to those names (parameters unfrozen later).
    """
    if cfg.lr is None:
        raise ValueError(
            "train.optimizer.lr is unresolved: the model's recommended rate is set first"
        )
    lr = cfg.lr
    patterns = list(cfg.lr_multipliers.items())
    _matching(model, [(p, f"train.optimizer.lr_multipliers.{p}") for p, _ in patterns])
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (only is not None and name not in only):
            continue
        factor = next((f for pat, f in patterns if fnmatch.fnmatchcase(name, pat)), 1.0)
        groups.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": lr * f} for f, ps in groups.items()]
