"""What one kind of feature column contributes to the shard set.

Two contracts, one module per kind in :mod:`preprocessing.features`:

* a :class:`FeatureKind` (tabular) fills slots of the ``features`` vector, listed in
  :data:`preprocessing.features.assemble.KINDS`: fitted on the train split, it gives the
  Spark ML transformers its slots need and, per slot, a SQL expression with the train mean /
  std of its value; the assembler standardizes and concatenates the slots (kinds in
  ``KINDS`` order);
* a :class:`TensorKind` (array, image) makes each of its columns a tensor column of its own,
  listed in :data:`preprocessing.features.tensors.TENSOR_KINDS`: it says the column's
  :class:`~pipeline.data.columns.ColumnSpec` and how its ``normalize`` is fitted — aggregate
  expressions over the train split (all kinds in one Spark job) and the entry made from
  their values. Validation gives the shard value (:mod:`preprocessing.read.validation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig

__all__ = ["FeatureKind", "FittedKind", "Slot", "TensorKind"]


@dataclass(frozen=True)
class Slot:
    """One slot of the ``features`` vector.

    ``sql`` is its value before standardizing: a Spark SQL expression of type double over the
    kind's columns (and the columns its fitted stages add); ``mean`` / ``std`` are that
    value's train mean and sample standard deviation (``n - 1``), which standardize it.
    """

    name: str
    sql: str
    mean: float
    std: float


@dataclass(frozen=True)
class FittedKind:
    """A feature kind fitted on the train split."""

    stages: list[Any]
    """Fitted Spark ML transformers that run before the slots are computed (e.g. the
    ``StringIndexerModel`` whose indices the categorical slots read)."""
    slots: list[Slot]
    """The slots this kind fills, in vector order."""
    stats: dict[str, Any]
    """Its entries of the manifest's ``feature_stats``."""


@dataclass(frozen=True)
class FeatureKind:
    """How the columns of one kind are fitted into slots of the ``features`` vector."""

    name: str
    fit: Callable[[DataFrame, EtlConfig], FittedKind | None]
    """Fit on the good train rows (as validation typed them); None when the config has no
    column of this kind."""
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
