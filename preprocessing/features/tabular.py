"""Featurization with Spark ML, fitted on the train split only.

Numeric columns → ``Imputer`` (train median/mean); categorical columns → frequency-ranked
``StringIndexer`` (``handleInvalid='keep'``: null and unseen levels map to one extra index)
and, for ``etl.onehot`` columns, ``OneHotEncoder``; everything → ``VectorAssembler`` →
``StandardScaler`` (train mean/std). The fitted ``PipelineModel`` is saved with the shard set
and reused verbatim by scoring, so training and serving apply the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import (
    Imputer,
    ImputerModel,
    OneHotEncoder,
    StandardScaler,
    StandardScalerModel,
    StringIndexer,
    StringIndexerModel,
    VectorAssembler,
)
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame

from pipeline.data.shardset import FEATURES_COLUMN
from preprocessing.config import EtlConfig

__all__ = ["FittedFeatures", "apply_features", "fit_features"]

_VEC = "_vec"
_SCALED = "_scaled"
UNKNOWN_LEVEL = "__unknown__"


@dataclass(frozen=True)
class FittedFeatures:
    """The fitted transform and what it produces."""

    model: PipelineModel
    names: list[str]
    stats: dict[str, Any]

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        return len(self.names)


def _imp(c: str) -> str:
    return f"_imp_{c}"


def _idx(c: str) -> str:
    return f"_idx_{c}"


def _ohe(c: str) -> str:
    return f"_ohe_{c}"


def _pipeline(cfg: EtlConfig) -> Pipeline:
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
    stages.append(VectorAssembler(inputCols=_assembled(cfg), outputCol=_VEC, handleInvalid="error"))
    stages.append(StandardScaler(inputCol=_VEC, outputCol=_SCALED, withMean=True, withStd=True))
    return Pipeline(stages=stages)


def _assembled(cfg: EtlConfig) -> list[str]:
    cols = [_imp(c) for c in cfg.numeric]
    cols += [_ohe(c) if c in cfg.onehot else _idx(c) for c in cfg.categorical]
    return cols


def fit_features(train: DataFrame, cfg: EtlConfig) -> FittedFeatures:
    """Fit the feature pipeline on the train split (validated, good rows only)."""
    model = _pipeline(cfg).fit(train)
    names, stats = _describe(model, cfg)
    return FittedFeatures(model=model, names=names, stats=stats)


def _describe(model: PipelineModel, cfg: EtlConfig) -> tuple[list[str], dict[str, Any]]:
    levels: dict[str, list[str]] = {}
    surrogates: dict[str, float] = {}
    scaler: StandardScalerModel | None = None
    for stage in model.stages:
        if isinstance(stage, StringIndexerModel):
            levels = {c: list(lv) for c, lv in zip(cfg.categorical, stage.labelsArray, strict=True)}
        elif isinstance(stage, ImputerModel):
            row = stage.surrogateDF.collect()[0].asDict()
            surrogates = {c: float(row[c]) for c in cfg.numeric}
        elif isinstance(stage, StandardScalerModel):
            scaler = stage
    names = list(cfg.numeric)
    for c in cfg.categorical:
        if c in cfg.onehot:
            names += [f"{c}={lv}" for lv in levels[c]] + [f"{c}={UNKNOWN_LEVEL}"]
        else:
            names.append(c)
    assert scaler is not None, "the feature pipeline always ends with a StandardScaler"
    mean, std = scaler.mean.toArray().tolist(), scaler.std.toArray().tolist()
    assert len(mean) == len(names), f"feature names ({len(names)}) != vector size ({len(mean)})"
    stats: dict[str, Any] = {
        "dim": len(names),
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


def apply_features(model: PipelineModel, df: DataFrame) -> DataFrame:
    """Apply a fitted feature model; adds ``features`` (array<float>) and drops intermediates."""
    out = model.transform(df)
    out = out.withColumn(FEATURES_COLUMN, vector_to_array(out[_SCALED], "float32"))
    tmp = [
        c for c in out.columns if c.startswith(("_imp_", "_idx_", "_ohe_")) or c in (_VEC, _SCALED)
    ]
    return out.drop(*tmp)
