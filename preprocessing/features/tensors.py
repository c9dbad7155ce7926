"""The tensor columns of a shard set (arrays, images, texts), fitted on the train split.

Every :class:`~preprocessing.features.kind.TensorKind` of :data:`TENSOR_KINDS` contributes
its columns the same way (:func:`fit_tensors`): first each kind's own fit (the text columns'
tokenizers), then their statistics in one aggregation over the good train rows; the specs
come back in ``etl.schema`` order (the order of the shard columns), beside each kind's fitted
state, which :class:`FittedTensors` saves into the feature-model directory and applies to
the shard rows. :func:`tensor_inputs` are the kinds' additions to the ETL's fingerprint.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pyspark.sql import DataFrame

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig
from preprocessing.features.array import ARRAY
from preprocessing.features.image import IMAGE
from preprocessing.features.kind import TensorKind
from preprocessing.features.text import TEXT

__all__ = ["TENSOR_KINDS", "FittedTensors", "fit_tensors", "tensor_inputs"]

TENSOR_KINDS: tuple[TensorKind, ...] = (ARRAY, IMAGE, TEXT)
"""The tensor kinds."""


@dataclass(frozen=True)
class FittedTensors:
    """The tensor columns fitted on the train split: their specs and each kind's state."""

    specs: tuple[ColumnSpec, ...]
    """Every tensor column's spec (``normalize`` fitted), in ``etl.schema`` order."""
    fitted: dict[str, Any]
    """Each kind's fitted state (what its ``fit`` returned), by kind name."""

    def save(self, features_dir: str) -> None:
        """Write every kind's fitted state under ``features_dir`` (after the feature model)."""
        for kind in TENSOR_KINDS:
            kind.save(self.fitted[kind.name], features_dir)

    def with_normalize(self, entries: Mapping[str, dict[str, Any]]) -> FittedTensors:
        """The same, with the ``normalize`` of the columns of ``entries`` set (fitted later)."""
        specs = tuple(
            replace(s, normalize=entries[s.name]) if s.name in entries else s for s in self.specs
        )
        return FittedTensors(specs, self.fitted)

    def encode(self, rows: DataFrame) -> DataFrame:
        """The shard rows with every tensor column as the shards store it (text: token ids)."""
        for kind in TENSOR_KINDS:
            rows = kind.encode(rows, self.fitted[kind.name])
        return rows


def tensor_inputs(cfg: EtlConfig) -> dict[str, Any]:
    """The entries every tensor kind adds to the config fingerprint (none for most configs)."""
    out: dict[str, Any] = {}
    for kind in TENSOR_KINDS:
        out.update(kind.inputs(cfg))
    return out


def fit_tensors(train: DataFrame, cfg: EtlConfig, later: Collection[str] = ()) -> FittedTensors:
    """Fit every tensor kind: its state, then each column's spec with its ``normalize``.

    ``train`` holds the good rows of the train split, as validation made them. The columns
    of ``later`` get no ``normalize`` here: their statistics come afterwards (the images the
    shard writers decode, :meth:`FittedTensors.with_normalize`).
    """
    fitted = {kind.name: kind.fit(train, cfg) for kind in TENSOR_KINDS}
    planned = [(kind, c) for kind in TENSOR_KINDS for c in kind.columns(cfg)]
    aggs = [[] if c in later else kind.aggregates(cfg, c) for kind, c in planned]
    flat = [a for per_column in aggs for a in per_column]
    row = train.agg(*flat).collect()[0] if flat else []
    specs: dict[str, ColumnSpec] = {}
    first = 0
    for (kind, c), per_column in zip(planned, aggs, strict=True):
        values = list(row[first : first + len(per_column)])
        first += len(per_column)
        normalize = kind.normalize(cfg, c, values) if per_column else None
        specs[c] = replace(kind.spec(cfg, c, fitted[kind.name]), normalize=normalize)
    return FittedTensors(tuple(specs[c] for c in cfg.tensor_columns), fitted)
