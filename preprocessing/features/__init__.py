"""Featurization with Spark ML, fitted on the train split only: one module per feature kind.

:mod:`~preprocessing.features.tabular` (numeric + categorical columns) is the one kind today;
:mod:`~preprocessing.features.assemble` concatenates the kinds into one standardized vector
(:mod:`~preprocessing.features.kind` says what a kind provides).
"""

from preprocessing.features.assemble import FittedFeatures, apply_features, fit_features

__all__ = ["FittedFeatures", "apply_features", "fit_features"]
