"""Typed, frozen config sections built from plain YAML data.

Each stage owns a ``@dataclass(frozen=True, kw_only=True)`` section and validates its own
values in ``__post_init__`` by raising :class:`ConfigError` with the dotted key. This module
turns a mapping into such a dataclass: unknown keys are an error that names them, nested
dataclasses are built recursively, and scalar types are checked (no silent coercion of
``"10"`` into ``10``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

__all__ = ["ConfigError", "apply_overrides", "build", "check", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; ``key`` is its dotted path (``train.optimizer.lr``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}" if key else message)
        self.key = key


def check(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, message)


def build(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping or None), naming keys under ``prefix``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(_dotted(prefix, str(k)) for k in unknown)
        raise ConfigError(
            _dotted(prefix, str(unknown[0])),
            f"unknown key(s) {keys}; known keys under '{prefix or '<top>'}': {', '.join(sorted(fields))}",
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, _dotted(prefix, name)) for name, value in data.items()
    }
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_dotted(prefix, missing[0]), "is required")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(prefix, str(e)) from e


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, Mapping):  # a section: its own errors name its keys
            sections = [o for o in options if dataclasses.is_dataclass(o)]
            if len(sections) == 1:
                return build(sections[0], value, key)  # type: ignore[arg-type]
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(opt, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"{value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return types.MappingProxyType(
            {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
        )
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported config type {_type_name(tp)}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(t) for t in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "--set expects dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(key, "--set needs a non-empty dotted key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"--set value {raw!r} is not valid YAML: {e}") from e
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    ".".join(parts[: i + 1]), "is not a section; cannot set a sub-key"
                )
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-able) data from a config dataclass, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj
