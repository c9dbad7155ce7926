"""The feature pipeline: every kind's fitted stages, then one SQL stage that standardizes.

Fitted on the train split only (each slot standardized with its train mean / std, as Spark
ML's ``StandardScaler`` does: ``(x - mean) * (1 / std)``, and 0 where ``std`` is 0). The
saved model is a Spark ML ``PipelineModel``: the kinds' transformers followed by a
``SQLTransformer`` whose statement computes the ``features`` array (``array<float>``)
from the slots' expressions — plain SQL, so that it runs in generated code and loads on any
Spark, Spark Connect included. It is saved with the shard set and reused verbatim by
scoring, so training and serving apply the same transform. A new kind of feature column is
one more module holding a :class:`~preprocessing.features.kind.FeatureKind`, added to
:data:`KINDS`.

A config without numeric or categorical columns (arrays / images only) has no ``features``
vector: its model is an empty ``PipelineModel`` (saved all the same, so every shard set has
one) and :func:`apply_features` leaves a DataFrame unchanged with it. Models saved by
earlier versions (``Imputer`` … ``VectorAssembler`` → ``StandardScaler``) still apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.ml import PipelineModel
from pyspark.ml.feature import SQLTransformer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame

from pipeline.data.shardset import FEATURES_COLUMN
from preprocessing.config import EtlConfig
from preprocessing.features.kind import FeatureKind, Slot
from preprocessing.features.tabular import TABULAR
from preprocessing.sqltext import quote, sql_double

__all__ = ["KINDS", "FittedFeatures", "apply_features", "fit_features"]

KINDS: tuple[FeatureKind, ...] = (TABULAR,)
"""The feature kinds, in the order their slots appear in the feature vector."""

# What models saved by earlier versions add: the assembled and the scaled vector, and the
# imputed / one-hot intermediates.
_LEGACY_VECTOR, _LEGACY_SCALED = "_vec", "_scaled"
_LEGACY_PREFIXES = ("_imp_", "_ohe_")


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
    fitted = [f for f in (kind.fit(train, cfg) for kind in KINDS) if f is not None]
    if not fitted:
        return FittedFeatures(model=PipelineModel(stages=[]), names=[], stats={"dim": 0})
    slots = [slot for f in fitted for slot in f.slots]
    stages = [stage for f in fitted for stage in f.stages]
    stages.append(SQLTransformer(statement=_statement(slots)))
    stats: dict[str, Any] = {"dim": len(slots)}
    for f in fitted:
        stats.update(f.stats)
    return FittedFeatures(PipelineModel(stages=stages), [s.name for s in slots], stats)


def _statement(slots: list[Slot]) -> str:
    """``SELECT *, array(<standardized slots>) AS features FROM __THIS__``."""
    values = []
    for s in slots:
        scale = 1.0 / s.std if s.std != 0 else 0.0
        values.append(f"CAST(({s.sql} - {sql_double(s.mean)}) * {sql_double(scale)} AS FLOAT)")
    return f"SELECT *, array({', '.join(values)}) AS {quote(FEATURES_COLUMN)} FROM __THIS__"


def apply_features(model: PipelineModel, df: DataFrame) -> DataFrame:
    """Apply a fitted feature model; adds ``features`` (array<float>) and drops intermediates.

    The empty model of a config without tabular features returns ``df`` as it is.
    """
    if not model.stages:
        return df
    out = model.transform(df)
    if _LEGACY_SCALED in out.columns:
        out = out.withColumn(FEATURES_COLUMN, vector_to_array(out[_LEGACY_SCALED], "float32"))
    prefixes = (*(p for kind in KINDS for p in kind.intermediate_prefixes), *_LEGACY_PREFIXES)
    tmp = [
        c for c in out.columns if c.startswith(prefixes) or c in (_LEGACY_VECTOR, _LEGACY_SCALED)
    ]
    return out.drop(*tmp)
