"""The whole YAML config: sections ``spark``, ``etl``, ``train`` (each optional until used).

Loaded with ``yaml.safe_load`` into frozen dataclasses; unknown keys anywhere are an error
that names them; ``--set dotted.key=value`` overrides are applied before validation so that
they are checked exactly like the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.configbase import ConfigError, apply_overrides, build, check, to_dict

__all__ = ["Config", "ConfigError", "SparkConfig", "load_config", "parse_config"]

SECTIONS = ("spark", "etl", "train")
_REMOTE = re.compile(
    r"sc://(\[[0-9A-Fa-f:.]+\]|[\w.-]+)(:\d{1,5})?(/(;[^;=]+=[^;]*)*)?|local(\[(\d+|\*)\])?"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class SparkConfig:
    """How ``spark-train`` builds its SparkSession (ignored under spark-submit, which decides)."""

    master: str = "local[*]"
    """Spark master for ``spark-train``; spark-submit's ``--master`` wins under spark-submit."""
    app_name: str = "spark-train"
    """Application name."""
    conf: Mapping[str, str] = field(default_factory=dict)
    """Extra Spark settings, e.g. ``spark.executor.memory: 4g``."""
    remote: str | None = None
    """Spark Connect server to use instead of ``master``: ``sc://host:port`` (optionally
    ``/;token=…;use_ssl=true``) or ``local[N]`` (a local Connect server started by pyspark);
    ``spark.conf`` then sets the Connect session's settings. Also ``--remote`` on the command line."""

    def __post_init__(self) -> None:
        check(bool(self.master.strip()), "spark.master", "must not be empty")
        if self.remote is not None:
            check(
                _REMOTE.fullmatch(self.remote) is not None,
                "spark.remote",
                f"must be sc://HOST[:PORT][/;key=value…] or local[N], got {self.remote!r}",
            )
        for k, v in self.conf.items():
            check(isinstance(v, str), f"spark.conf.{k}", "values must be strings (quote numbers)")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A validated config file."""

    spark: SparkConfig = field(default_factory=SparkConfig)
    etl_data: Mapping[str, Any] | None = None
    train_data: Mapping[str, Any] | None = None
    source: str = "<memory>"

    @property
    def etl(self) -> Any:
        """The ``etl`` section (:class:`preprocessing.config.EtlConfig`)."""
        from preprocessing.config import EtlConfig

        if self.etl_data is None:
            raise ConfigError("etl", f"{self.source} has no 'etl' section")
        return EtlConfig.from_mapping(self.etl_data)

    @property
    def train(self) -> Any:
        """The ``train`` section (:class:`pipeline.train.config.TrainConfig`)."""
        from pipeline.train.config import TrainConfig

        if self.train_data is None:
            raise ConfigError("train", f"{self.source} has no 'train' section")
        return TrainConfig.from_mapping(self.train_data)

    def validate(self) -> Config:
        """Validate every section present (so errors surface before any Spark work)."""
        if self.etl_data is not None:
            _ = self.etl
        if self.train_data is not None:
            _ = self.train
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logs and bundles."""
        out: dict[str, Any] = {"spark": to_dict(self.spark)}
        if self.etl_data is not None:
            out["etl"] = to_dict(self.etl)
        if self.train_data is not None:
            out["train"] = to_dict(self.train)
        return out


def parse_config(data: Any, source: str = "<memory>", overrides: Sequence[str] = ()) -> Config:
    """Validate already-parsed YAML data (a mapping with the known sections)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides))
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            str(unknown[0]),
            f"unknown section(s) {unknown} in {source}; known: {', '.join(SECTIONS)}",
        )
    for name in ("etl", "train"):
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(name, f"must be a mapping in {source}")
    cfg = Config(
        spark=build(SparkConfig, data.get("spark"), "spark"),
        etl_data=data.get("etl"),
        train_data=data.get("train"),
        source=source,
    )
    return cfg.validate()


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (``None``: only overrides) with ``yaml.safe_load``."""
    if path is None:
        return parse_config({}, "<overrides>", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{p} is not valid YAML: {e}") from e
    return parse_config(data, str(p), overrides)
