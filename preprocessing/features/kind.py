"""What one kind of feature column contributes to the shard set.

Two contracts, one module per kind in :mod:`preprocessing.features`:

* a :class:`FeatureKind` (tabular) fills slots of the ``features`` vector, listed in
  :data:`preprocessing.features.assemble.KINDS`: its Spark ML stages turn its columns into
  numeric or vector columns, which the assembler concatenates (kinds in ``KINDS`` order) and
  standardizes with the train mean / std;
* a :class:`TensorKind` (array, image) makes each of its columns a tensor column of its own,
  listed in :data:`preprocessing.features.tensors.TENSOR_KINDS`: it says the column's
  :class:`~pipeline.data.columns.ColumnSpec` and how its ``normalize`` is fitted — aggregate
  expressions over the train split (all kinds in one Spark job) and the entry made from
  their values. Validation gives the shard value (:mod:`preprocessing.read.validation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig

__all__ = ["Describe", "FeatureKind", "TensorKind"]

Describe = Callable[
    [Sequence[Any], EtlConfig, Sequence[float], Sequence[float]], tuple[list[str], dict[str, Any]]
]
"""``(fitted stages, cfg, mean, std) -> (names, stats)``: see :attr:`FeatureKind.describe`."""


@dataclass(frozen=True)
class FeatureKind:
    """How the columns of one kind are fitted, named and described."""

    name: str
    stages: Callable[[EtlConfig], list[Any]]
    """The Spark ML stages (estimators or transformers) for the config's columns of this
    kind, in order; none when the config has no such column."""
    outputs: Callable[[EtlConfig], list[str]]
    """The columns those stages produce that go into the feature vector, in vector order."""
    describe: Describe
    """From this kind's fitted stages and the train ``mean`` / ``std`` of the vector starting
    at its first slot: one name per slot it fills, and its entries of the manifest's
    ``feature_stats``."""
    intermediate_prefixes: tuple[str, ...]
    """Prefixes of the intermediate columns its stages add (dropped after the transform)."""


@dataclass(frozen=True)
class TensorKind:
    """How the columns of one tensor kind are described and their normalization fitted."""

    name: str
    """The manifest's ``kind`` of its columns."""
    columns: Callable[[EtlConfig], list[str]]
    """This kind's columns in the config."""
    spec: Callable[[EtlConfig, str], ColumnSpec]
    """A column's dtype and row shape (``kind`` set, ``normalize`` not yet)."""
    aggregates: Callable[[EtlConfig, str], list[Column]]
    """Aggregate expressions over the good train rows that its ``normalize`` needs (none: the
    column is not normalized)."""
    normalize: Callable[[EtlConfig, str, list[Any]], dict[str, Any] | None]
    """The column's ``normalize`` from the values of its aggregates (in order)."""
