"""Tabular features: numeric and categorical columns, fitted on the train split only.

Numeric columns → ``Imputer`` (train median/mean); categorical columns → frequency-ranked
``StringIndexer`` (``handleInvalid='keep'``: null and unseen levels map to one extra index)
and, for ``etl.onehot`` columns, ``OneHotEncoder``. The vector holds the numeric columns
first, then each categorical column (its index, or its one-hot block), in declared order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyspark.ml.feature import (
    Imputer,
    ImputerModel,
    OneHotEncoder,
    StringIndexer,
    StringIndexerModel,
)

from preprocessing.config import EtlConfig
from preprocessing.features.kind import FeatureKind

__all__ = ["TABULAR", "UNKNOWN_LEVEL"]

UNKNOWN_LEVEL = "__unknown__"
"""Name of the one-hot slot that null and unseen levels map to."""


def _imp(c: str) -> str:
    return f"_imp_{c}"


def _idx(c: str) -> str:
    return f"_idx_{c}"


def _ohe(c: str) -> str:
    return f"_ohe_{c}"


def _stages(cfg: EtlConfig) -> list[Any]:
    stages: list[Any] = []
    if cfg.numeric:
        stages.append(
            Imputer(
                inputCols=list(cfg.numeric),
                outputCols=[_imp(c) for c in cfg.numeric],
                strategy=cfg.impute_strategy,
            )
        )
    if cfg.categorical:
        stages.append(
            StringIndexer(
                inputCols=list(cfg.categorical),
                outputCols=[_idx(c) for c in cfg.categorical],
                handleInvalid="keep",
                stringOrderType="frequencyDesc",
            )
        )
    if cfg.onehot:
        stages.append(
            OneHotEncoder(
                inputCols=[_idx(c) for c in cfg.onehot],
                outputCols=[_ohe(c) for c in cfg.onehot],
                dropLast=False,
            )
        )
    return stages


def _outputs(cfg: EtlConfig) -> list[str]:
    cols = [_imp(c) for c in cfg.numeric]
    cols += [_ohe(c) if c in cfg.onehot else _idx(c) for c in cfg.categorical]
    return cols


def _describe(
    stages: Sequence[Any], cfg: EtlConfig, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[str], dict[str, Any]]:
    levels: dict[str, list[str]] = {}
    surrogates: dict[str, float] = {}
    for stage in stages:
        if isinstance(stage, StringIndexerModel):
            levels = {c: list(lv) for c, lv in zip(cfg.categorical, stage.labelsArray, strict=True)}
        elif isinstance(stage, ImputerModel):
            row = stage.surrogateDF.collect()[0].asDict()
            surrogates = {c: float(row[c]) for c in cfg.numeric}
    names = list(cfg.numeric)
    for c in cfg.categorical:
        if c in cfg.onehot:
            names += [f"{c}={lv}" for lv in levels[c]] + [f"{c}={UNKNOWN_LEVEL}"]
        else:
            names.append(c)
    stats: dict[str, Any] = {
        "impute_strategy": cfg.impute_strategy,
        "numeric": {
            c: {"train_mean": mean[i], "train_std": std[i], "impute_value": surrogates.get(c)}
            for i, c in enumerate(cfg.numeric)
        },
        "categorical": {
            c: {"levels": len(levels[c]), "top": levels[c][:5], "onehot": c in cfg.onehot}
            for c in cfg.categorical
        },
    }
    return names, stats


TABULAR = FeatureKind(
    name="tabular",
    stages=_stages,
    outputs=_outputs,
    describe=_describe,
    intermediate_prefixes=("_imp_", "_idx_", "_ohe_"),
)
"""The numeric + categorical kind (:data:`~preprocessing.features.assemble.KINDS`)."""
