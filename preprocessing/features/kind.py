"""What one kind of feature column contributes to the feature vector.

A kind (tabular today; array, image or text later) is a :class:`FeatureKind` value in its
own module of :mod:`preprocessing.features`, listed in
:data:`preprocessing.features.assemble.KINDS`: its Spark ML stages turn its columns into
numeric or vector columns, which the assembler concatenates (kinds in ``KINDS`` order) and
standardizes with the train mean / std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from preprocessing.config import EtlConfig

__all__ = ["Describe", "FeatureKind"]

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
