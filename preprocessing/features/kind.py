"""What one kind of feature column contributes to the shard set.

Two contracts, one module per kind in :mod:`preprocessing.features`:

* a :class:`FeatureKind` (tabular) fills slots of the ``features`` vector, listed in
  :data:`preprocessing.features.assemble.KINDS`: fitted on the train split, it gives the
  Spark ML transformers its slots need and, per slot, a SQL expression with the train mean /
  std of its value; the assembler standardizes and concatenates the slots (kinds in
  ``KINDS`` order);
* a :class:`TensorKind` (array, image, text) makes each of its columns a tensor column of its
  own, listed in :data:`preprocessing.features.tensors.TENSOR_KINDS`: it says the column's
  :class:`~pipeline.data.columns.ColumnSpec` and how its ``normalize`` is fitted — aggregate
  expressions over the train split (all kinds in one Spark job) and the entry made from
  their values. Validation gives the shard value (:mod:`preprocessing.read.validation`);
  a kind whose columns need more (text: a tokenizer) also fits a state on the train split,
  saves it into the shard set's feature-model directory and encodes its columns in the
  shard writer's map stage; these steps default to nothing (array, image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame

from pipeline.data.columns import ColumnSpec
from preprocessing.config import EtlConfig

__all__ = ["FeatureKind", "FittedKind", "Slot", "TensorKind"]


def _nothing_fitted(train: DataFrame, cfg: EtlConfig) -> None:
    return None


def _nothing_saved(fitted: Any, features_dir: str) -> None:
    return None


def _unchanged(df: DataFrame, fitted: Any) -> DataFrame:
    return df


def _no_inputs(cfg: EtlConfig) -> dict[str, Any]:
    return {}


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
    """How the columns of one tensor kind are fitted, described, saved and encoded."""

    name: str
    """The manifest's ``kind`` of its columns."""
    columns: Callable[[EtlConfig], list[str]]
    """This kind's columns in the config."""
    spec: Callable[[EtlConfig, str, Any], ColumnSpec]
    """A column's dtype and row shape (``kind`` set, ``normalize`` not yet), given what
    :attr:`fit` returned."""
    aggregates: Callable[[EtlConfig, str], list[Column]]
    """Aggregate expressions over the good train rows that its ``normalize`` needs (none: the
    column is not normalized)."""
    normalize: Callable[[EtlConfig, str, list[Any]], dict[str, Any] | None]
    """The column's ``normalize`` from the values of its aggregates (in order)."""
    fit: Callable[[DataFrame, EtlConfig], Any] = _nothing_fitted
    """Fit on the good train rows, before the specs are made: the kind's fitted state (e.g.
    the text columns' tokenizers), which :attr:`spec`, :attr:`save` and :attr:`encode` get.
    Default: nothing (None)."""
    save: Callable[[Any, str], None] = _nothing_saved
    """Write the fitted state under the shard set's feature-model directory (called after
    the Spark ML feature model is saved there: its ``overwrite`` save would remove it)."""
    encode: Callable[[DataFrame, Any], DataFrame] = _unchanged
    """The shard rows with this kind's columns as the shards store them, plus any
    ``_trunc_<column>`` flags for the shard writer to count (default: unchanged)."""
    inputs: Callable[[EtlConfig], dict[str, Any]] = _no_inputs
    """Entries added to the config fingerprint for files the kind reads besides the table
    (a provided ``tokenizer.json``): a change to one must rebuild the shard set."""
