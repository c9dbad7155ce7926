"""The feature pipeline: every kind's stages → ``VectorAssembler`` → ``StandardScaler``.

Fitted on the train split only (the scaler with the train mean/std). The fitted
``PipelineModel`` is saved with the shard set and reused verbatim by scoring, so training and
serving apply the same transform. A new kind of feature column is one more module holding a
:class:`~preprocessing.features.kind.FeatureKind`, added to :data:`KINDS`.

A config without numeric or categorical columns (arrays / images only) has no ``features``
vector: its model is an empty ``PipelineModel`` (saved all the same, so every shard set has
one) and :func:`apply_features` leaves a DataFrame unchanged with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import StandardScaler, StandardScalerModel, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame

from pipeline.data.shardset import FEATURES_COLUMN
from preprocessing.config import EtlConfig
from preprocessing.features.kind import FeatureKind
from preprocessing.features.tabular import TABULAR

__all__ = ["KINDS", "FittedFeatures", "apply_features", "fit_features"]

KINDS: tuple[FeatureKind, ...] = (TABULAR,)
"""The feature kinds, in the order their slots appear in the feature vector."""

_VEC = "_vec"
_SCALED = "_scaled"


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


def fit_features(train: DataFrame, cfg: EtlConfig) -> FittedFeatures:
    """Fit the feature pipeline on the train split (validated, good rows only)."""
    if not cfg.has_tabular:
        return FittedFeatures(model=PipelineModel(stages=[]), names=[], stats={"dim": 0})
    per_kind = [kind.stages(cfg) for kind in KINDS]
    assembled = [col for kind in KINDS for col in kind.outputs(cfg)]
    stages = [stage for kind_stages in per_kind for stage in kind_stages]
    stages.append(VectorAssembler(inputCols=assembled, outputCol=_VEC, handleInvalid="error"))
    stages.append(StandardScaler(inputCol=_VEC, outputCol=_SCALED, withMean=True, withStd=True))
    model = Pipeline(stages=stages).fit(train)
    names, stats = _describe(model, cfg, [len(s) for s in per_kind])
    return FittedFeatures(model=model, names=names, stats=stats)


def _describe(
    model: PipelineModel, cfg: EtlConfig, stage_counts: list[int]
) -> tuple[list[str], dict[str, Any]]:
    """Feature names and ``feature_stats`` of a fitted pipeline (``stage_counts``: per kind)."""
    scaler = model.stages[-1]
    assert isinstance(scaler, StandardScalerModel), "the feature pipeline ends with the scaler"
    mean, std = scaler.mean.toArray().tolist(), scaler.std.toArray().tolist()
    names: list[str] = []
    kind_stats: dict[str, Any] = {}
    first = 0
    for kind, count in zip(KINDS, stage_counts, strict=True):
        fitted = model.stages[first : first + count]
        first += count
        kind_names, stats = kind.describe(fitted, cfg, mean[len(names) :], std[len(names) :])
        names += kind_names
        kind_stats.update(stats)
    assert len(mean) == len(names), f"feature names ({len(names)}) != vector size ({len(mean)})"
    return names, {"dim": len(names), **kind_stats}


def apply_features(model: PipelineModel, df: DataFrame) -> DataFrame:
    """Apply a fitted feature model; adds ``features`` (array<float>) and drops intermediates.

    The empty model of a config without tabular features returns ``df`` as it is.
    """
    if not model.stages:
        return df
    out = model.transform(df)
    out = out.withColumn(FEATURES_COLUMN, vector_to_array(out[_SCALED], "float32"))
    prefixes = tuple(p for kind in KINDS for p in kind.intermediate_prefixes)
    tmp = [c for c in out.columns if c.startswith(prefixes) or c in (_VEC, _SCALED)]
    return out.drop(*tmp)
