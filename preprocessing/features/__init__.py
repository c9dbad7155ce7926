"""Featurization with Spark ML, fitted on the train split only: one module per feature kind.

:mod:`~preprocessing.features.tabular` (numeric + categorical columns) fills the ``features``
vector, which :mod:`~preprocessing.features.assemble` concatenates and standardizes;
:mod:`~preprocessing.features.array`, :mod:`~preprocessing.features.image` and
:mod:`~preprocessing.features.text` (tokenized) are tensor kinds: columns of their own, which
:mod:`~preprocessing.features.tensors` fits, saves and encodes alike
(:mod:`~preprocessing.features.kind` says what each sort of kind provides).
"""

from preprocessing.features.assemble import FittedFeatures, apply_features, fit_features
from preprocessing.features.tensors import (
    TENSOR_KINDS,
    FittedTensors,
    fit_tensors,
    tensor_inputs,
)
from preprocessing.features.text import (
    FittedText,
    encode_texts,
    fit_texts,
    load_texts,
    save_texts,
)

__all__ = [
    "TENSOR_KINDS",
    "FittedFeatures",
    "FittedTensors",
    "FittedText",
    "apply_features",
    "encode_texts",
    "fit_features",
    "fit_tensors",
    "fit_texts",
    "load_texts",
    "save_texts",
    "tensor_inputs",
]
