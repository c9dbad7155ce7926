"""The tensor columns of a shard set (arrays, images, texts), fitted on the train split.

Text columns come fitted (their tokenizers: :func:`preprocessing.features.text.fit_texts`).
Every :class:`~preprocessing.features.kind.TensorKind` of :data:`TENSOR_KINDS` contributes
its columns; their statistics are computed in one aggregation over the good train rows, and
the specs come back in ``etl.schema`` order (the order of the shard columns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pyspark.sql import DataFrame

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig
from preprocessing.features.array import ARRAY
from preprocessing.features.image import IMAGE
from preprocessing.features.kind import TensorKind

__all__ = ["TENSOR_KINDS", "fit_tensors"]

TENSOR_KINDS: tuple[TensorKind, ...] = (ARRAY, IMAGE)
"""The tensor kinds."""


def fit_tensors(
    train: DataFrame, cfg: EtlConfig, texts: Mapping[str, ColumnSpec] | None = None
) -> tuple[ColumnSpec, ...]:
    """The spec of every tensor column: arrays / images with their fitted ``normalize``.

    ``train`` holds the good rows of the train split, as validation made them; ``texts`` are
    the text columns' specs, by column.
    """
    planned = [(kind, c) for kind in TENSOR_KINDS for c in kind.columns(cfg)]
    aggs = [kind.aggregates(cfg, c) for kind, c in planned]
    flat = [a for per_column in aggs for a in per_column]
    row = train.agg(*flat).collect()[0] if flat else []
    specs: dict[str, ColumnSpec] = dict(texts or {})
    first = 0
    for (kind, c), per_column in zip(planned, aggs, strict=True):
        values = list(row[first : first + len(per_column)])
        first += len(per_column)
        normalize = kind.normalize(cfg, c, values) if per_column else None
        specs[c] = replace(kind.spec(cfg, c), normalize=normalize)
    return tuple(specs[c] for c in cfg.tensor_columns)
