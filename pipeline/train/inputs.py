"""What a model takes as input, and the one function that puts a batch on the device.

A shard set's input columns (:func:`pipeline.data.arrays.input_columns`: every column but key
and label) reach the model as follows:

* The reader yields them in their stored dtype and shape (``Batch.inputs``, name →
  ``[B, *shape]``): uint8 images stay uint8 across the host → device copy, a quarter of the
  bytes of float32.
* :meth:`ModelInputs.prepare` (the only place this happens; the barrier loop, model averaging's
  tasks and driver, and ``spark-train evaluate`` call it through
  :func:`pipeline.train.engine.to_model`) copies the batch to the device, then per column:
  a column with ``normalize`` or of kind ``image`` becomes float32; ``normalize`` computes
  ``(x / scale - mean) / std`` in float32 (``mean``, ``std`` broadcast to the stored row
  shape); an image ``[B, H, W, C]`` becomes channels-first ``[B, C, H, W]`` (contiguous).
  Anything else (the ``features`` vector, text token ids) passes through untouched, so
  tabular training is bitwise what it was.
* The model is called with one tensor when the set has one input column (``model(x)``, as
  every builder always was), and with the dict ``{name: tensor}`` when it has several.

Builders keep ``builder(*, input_shape, num_outputs, **args)``. ``input_shape`` is the
model-facing shape of the single input column (``[C, H, W]`` for an image; for the
``features`` vector, ``train.model.args.input_shape`` may override it with any shape of as
many elements: the model reshapes the flat rows itself), or of the first input column when
there are several. A builder with an ``inputs`` parameter also receives the whole spec:
``{name: (dtype, shape)}``, model-facing, in manifest order (:meth:`ModelInputs.spec`).
A builder with a ``vocab`` parameter receives ``{text column: (vocab_size, pad_id)}``
(:meth:`ModelInputs.vocab`), to size its embeddings and mask the padding.
``model.json`` records the input columns (:meth:`ModelInputs.to_json`) so that evaluation and
scoring use the training normalization and can check a shard set's columns against them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.arrays import InputColumn, Normalize, input_columns
from pipeline.data.batch import Batch
from pipeline.data.columns import ColumnSpec
from pipeline.data.shardset import FEATURES_COLUMN, ShardSet

__all__ = ["InputSpec", "ModelInput", "ModelInputs"]

InputSpec = dict[str, tuple[str, tuple[int, ...]]]
"""What a builder's ``inputs`` parameter receives: name → (dtype, model-facing shape)."""


@dataclass(frozen=True)
class ModelInput:
    """One input column: as stored (:attr:`column`) and as the model sees it."""

    column: InputColumn
    shape: tuple[int, ...]
    """The model-facing shape of one row (images channels-first)."""
    _consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, column: InputColumn) -> ModelInput:
        """The model-facing view of a stored column."""
        shape = column.spec.shape
        if column.kind == "image":
            h, w, c = shape
            shape = (c, h, w)
        return cls(column, shape)

    @property
    def name(self) -> str:
        """The column's name."""
        return self.column.name

    @property
    def is_image(self) -> bool:
        """A ``[H, W, C]`` image column (made channels-first on the device)."""
        return self.column.kind == "image"

    @property
    def dtype(self) -> str:
        """The model-facing dtype: float32 once normalized or an image, else as stored."""
        if self.is_image or self.column.normalize is not None:
            return "float32"
        return self.column.spec.dtype

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *stored shape]`` on the device → the model's ``[B, *shape]`` (see the module)."""
        norm = self.column.normalize
        if self.is_image or norm is not None:
            x = x.float()
        if norm is not None:
            mean, std = self._constants(norm, x.device)
            x = (x / norm.scale - mean) / std
        if self.is_image:
            x = x.permute(0, 3, 1, 2).contiguous()
        return x

    def _constants(
        self, norm: Normalize, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            self._consts[device] = (
                torch.from_numpy(norm.mean.astype("float32")).to(device),
                torch.from_numpy(norm.std.astype("float32")).to(device),
            )
        return self._consts[device]

    def to_json(self) -> dict[str, Any]:
        """The ``model.json`` entry: the stored column, its kind, normalize and model shape."""
        return {**self.column.to_manifest(), "model_shape": list(self.shape)}


class ModelInputs:
    """The input columns of a model (see the module docstring), in manifest order."""

    def __init__(self, columns: Sequence[InputColumn], input_shape: Sequence[int] | None = None):
        self.columns = tuple(ModelInput.of(c) for c in columns)
        if not self.columns:
            raise ValueError("a model needs at least one input column")
        self.names = tuple(c.name for c in self.columns)
        first = self.columns[0]
        self.input_shape: tuple[int, ...] = first.shape
        """The builder's ``input_shape``."""
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(self.columns) > 1:
                raise ValueError(
                    f"train.model.args.input_shape {list(shape)} overrides the shape of a single "
                    f"input column, but the shard set has {len(self.columns)}: "
                    f"{', '.join(self.names)}"
                )
            if math.prod(shape) != math.prod(first.shape):
                what = "feature vectors" if first.name == FEATURES_COLUMN else repr(first.name)
                raise ValueError(
                    f"train.model.args.input_shape {list(shape)} has {math.prod(shape)} elements "
                    f"but the shard set's {what} have {math.prod(first.shape)}"
                )
            self.input_shape = shape

    @classmethod
    def from_shards(cls, shards: ShardSet, input_shape: Sequence[int] | None = None) -> ModelInputs:
        """The input columns of ``shards`` (``input_shape``: ``train.model.args.input_shape``)."""
        return cls(input_columns(shards), input_shape)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ModelInputs:
        """The inputs a bundle's ``model.json`` records.

        A bundle written before inputs were recorded had the ``features`` vector only, viewed
        as its ``input_shape``.
        """
        entries = spec.get("inputs")
        if entries is None:
            shape = tuple(int(d) for d in spec["input_shape"])
            column = InputColumn(ColumnSpec(FEATURES_COLUMN, "float32", (math.prod(shape),)))
            return cls([column], shape)
        columns = [InputColumn.from_manifest(e) for e in entries]
        return cls(columns, spec["input_shape"] if len(columns) == 1 else None)

    def spec(self) -> InputSpec:
        """``{name: (dtype, shape)}`` as the model sees them (a builder's ``inputs``)."""
        if len(self.columns) == 1:
            only = self.columns[0]
            return {only.name: (only.dtype, self.input_shape)}
        return {c.name: (c.dtype, c.shape) for c in self.columns}

    def vocab(self) -> dict[str, tuple[int, int]]:
        """``{text column: (vocab_size, pad_id)}`` (empty without text columns)."""
        out = {}
        for c in self.columns:
            text = c.column.spec.text
            if c.column.kind == "text" and text is not None:
                out[c.name] = (int(text["vocab_size"]), int(text["pad_id"]))
        return out

    def to_json(self) -> list[dict[str, Any]]:
        """The ``inputs`` list of ``model.json``."""
        return [c.to_json() for c in self.columns]

    def prepare(
        self, batch: Batch, device: torch.device, *, non_blocking: bool = True
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        """``(x, y)`` on ``device``: ``x`` the model's argument (a tensor, or a dict of them).

        On CPU nothing is copied (``Tensor.to`` costs ~50 us even as a no-op).
        """
        copy = device.type != "cpu"
        y = batch.labels.to(device, non_blocking=non_blocking) if copy else batch.labels
        xs = {}
        for c in self.columns:
            x = batch.inputs[c.name]
            if copy:
                x = x.to(device, non_blocking=non_blocking)
            xs[c.name] = c.transform(x)
        if len(xs) == 1:
            return xs[self.names[0]], y
        return xs, y

    def mismatch(self, shards: ShardSet) -> str | None:
        """Why ``shards`` cannot feed this model (columns missing or of another dtype / shape)."""
        have = {c.name: c.spec for c in input_columns(shards)}
        problems = []
        for c in self.columns:
            want, got = c.column.spec, have.get(c.name)
            if got is None:
                problems.append(f"no column {c.name!r}")
            elif (got.dtype, got.size) != (want.dtype, want.size) or (
                c.is_image and got.shape != want.shape
            ):
                problems.append(
                    f"column {c.name!r} is {got.dtype} {list(got.shape)}, the model was trained "
                    f"on {want.dtype} {list(want.shape)}"
                )
        return "; ".join(problems) or None
