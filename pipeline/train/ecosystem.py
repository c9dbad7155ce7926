"""Builders that name a model of the ecosystem: ``torchvision:``, ``timm:``, ``hf:``.

``train.model.builder`` may name, instead of ``module:function``:

* ``torchvision:<constructor>`` — a ``torchvision.models`` constructor (``resnet18``,
  ``efficientnet_b0``…), called with ``weights=None`` and ``num_classes`` = the number of
  outputs (a new head); ``train.model.args`` are its other keyword arguments. The image's
  channels must be what the model's first convolution takes.
* ``timm:<model name>`` — ``timm.create_model(name, pretrained=False, num_classes=…,
  in_chans=C, **args)``.
* ``hf:<AutoModelFor… class>`` — a Hugging Face ``transformers`` auto class
  (``AutoModelForSequenceClassification``, ``AutoModelForImageClassification``) built from a
  configuration: ``args.model_dir`` (a directory with ``config.json``, any storage URI) or
  ``args.config`` (its contents as a mapping); other args override configuration
  attributes. ``num_labels`` is the number of outputs. A text model is called with
  ``input_ids`` (the ETL's token ids) and ``attention_mask`` (ids that are not the ETL
  tokenizer's pad id); the tokenizer's ids must fit the model's ``vocab_size`` and
  ``pad_token_id`` becomes the tokenizer's. An image model gets ``pixel_values`` (the
  normalized ``[B, C, H, W]`` images). The model returns its ``logits``.

None of these loads pretrained weights (nothing is downloaded): ``train.init`` does, from
a file or directory. The libraries come with the extras ``spark-train[vision]``
(torchvision, timm) and ``spark-train[hf]`` (transformers) and are imported only when a
builder names them; a missing one is an error naming the extra (``train.model.builder``,
exit 2). The bundle records an ``hf:`` model's configuration itself (``args.config``), so
scoring needs no model directory.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["PREFIXES", "EcosystemError", "ecosystem_builder", "portable_args"]

PREFIXES = {"torchvision": "vision", "timm": "vision", "hf": "hf"}
"""Builder prefix → the extra that provides it."""

_LIBRARY = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}


class EcosystemError(ValueError):
    """The library is missing, the name unknown, or the model does not fit the shard set.

    :func:`pipeline.train.models.resolve_builder` and ``build_model`` turn it into a
    ``BuilderError`` naming ``train.model.builder``.
    """


def _import(prefix: str, spec: str) -> Any:
    library = _LIBRARY[prefix]
    try:
        return importlib.import_module(library)
    except Exception as e:  # ImportError, or a broken install (torchvision's C ops)
        raise EcosystemError(
            f"{spec!r} needs {library}, which does not import ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): install the extra: "
            f"pip install 'spark-train[{PREFIXES[prefix]}]'"
        ) from e


def ecosystem_builder(spec: str) -> Callable[..., nn.Module] | None:
    """The builder for ``torchvision:`` / ``timm:`` / ``hf:`` names; None for other specs."""
    prefix, sep, name = spec.partition(":")
    if not sep or prefix not in PREFIXES:
        return None
    if not name:
        raise EcosystemError(f"{spec!r} names no model after '{prefix}:'")
    lib = _import(prefix, spec)
    if prefix == "torchvision":
        models = importlib.import_module("torchvision.models")
        if name.startswith("_") or not callable(getattr(models, name, None)):
            raise EcosystemError(f"torchvision.models has no constructor {name!r}")
        return _torchvision(getattr(models, name), spec)
    if prefix == "timm":
        if not lib.is_model(name):
            raise EcosystemError(f"timm knows no model {name!r} (timm.list_models())")
        return _timm(lib, name, spec)
    if not name.startswith("AutoModelFor") or not hasattr(lib, name):
        raise EcosystemError(
            f"{spec!r}: name a transformers AutoModelFor… class, e.g. "
            "hf:AutoModelForSequenceClassification"
        )
    return _hf(lib, getattr(lib, name), spec)


def _image_shape(spec: str, input_shape: Sequence[int], inputs: Any, vocab: Any) -> tuple[int, ...]:
    if vocab:
        raise EcosystemError(
            f"{spec} takes images, but the shard set has text column(s) {list(vocab)}"
        )
    if inputs is not None and len(inputs) > 1:
        raise EcosystemError(f"{spec} takes one image column, the shard set has {list(inputs)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise EcosystemError(
            f"{spec} takes images [C, H, W], the shard set's input is {list(shape)} "
            "(declare the column under etl.images)"
        )
    return shape


def _refuse_weights(spec: str, args: Mapping[str, Any]) -> None:
    for key in ("weights", "pretrained", "pretrained_cfg", "checkpoint_path"):
        if key in args:
            raise EcosystemError(
                f"{spec}: args.{key} would download or read weights; load them with train.init"
            )


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def _torchvision(constructor: Callable[..., nn.Module], spec: str) -> Callable[..., nn.Module]:
    def build(
        *,
        input_shape: Sequence[int],
        num_outputs: int,
        inputs: Any = None,
        vocab: Any = None,
        **args: Any,
    ) -> nn.Module:
        shape = _image_shape(spec, input_shape, inputs, vocab)
        _refuse_weights(spec, args)
        model = constructor(weights=None, num_classes=num_outputs, **args)
        channels = _first_conv_channels(model)
        if channels is not None and channels != shape[0]:
            raise EcosystemError(
                f"{spec} takes {channels}-channel images, the shard set's have {shape[0]} "
                f"(etl.images.<column>.channels: {'RGB' if channels == 3 else 'L'})"
            )
        return model

    return build


def _timm(timm: Any, name: str, spec: str) -> Callable[..., nn.Module]:
    def build(
        *,
        input_shape: Sequence[int],
        num_outputs: int,
        inputs: Any = None,
        vocab: Any = None,
        **args: Any,
    ) -> nn.Module:
        shape = _image_shape(spec, input_shape, inputs, vocab)
        _refuse_weights(spec, args)
        model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=num_outputs, in_chans=shape[0], **args
        )
        return model

    return build


def _hf_config(transformers: Any, spec: str, args: dict[str, Any]) -> Any:
    """The model configuration from ``model_dir`` or ``config``, with the other args applied."""
    from pipeline.core import storage

    model_dir, config = args.pop("model_dir", None), args.pop("config", None)
    if (model_dir is None) == (config is None):
        raise EcosystemError(f"{spec} needs exactly one of args.model_dir or args.config")
    if model_dir is not None:
        fs, path = storage.resolve(str(model_dir))
        where = storage.join(path, "config.json")
        if not storage.exists(fs, where):
            raise EcosystemError(f"{spec}: args.model_dir {model_dir} has no config.json")
        config = json.loads(storage.read_bytes(fs, where))
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise EcosystemError(f"{spec}: the configuration has no model_type")
    data = {**dict(config), **args}
    return transformers.AutoConfig.for_model(**data)


def _hf(transformers: Any, auto: Any, spec: str) -> Callable[..., nn.Module]:
    def build(
        *,
        input_shape: Sequence[int],
        num_outputs: int,
        inputs: Any = None,
        vocab: Mapping[str, tuple[int, int]] | None = None,
        **args: Any,
    ) -> nn.Module:
        config = _hf_config(transformers, spec, dict(args))
        config.num_labels = num_outputs
        if inputs is not None and len(inputs) > 1:
            raise EcosystemError(f"{spec} takes one input column, the shard set has {list(inputs)}")
        if vocab:
            (column, (size, pad_id)), *_ = vocab.items()
            model_vocab = getattr(config, "vocab_size", None)
            if model_vocab is not None and size > model_vocab:
                raise EcosystemError(
                    f"{spec}: the tokenizer of etl.texts.{column} has {size} ids, the model's "
                    f"vocab_size is {model_vocab} (use the model's tokenizer.json)"
                )
            positions = getattr(config, "max_position_embeddings", None)
            length = int(input_shape[-1])
            if positions is not None and length > positions:
                raise EcosystemError(
                    f"{spec}: etl.texts.{column}.max_length {length} exceeds the model's "
                    f"max_position_embeddings {positions}"
                )
            config.pad_token_id = pad_id
            return _adapt(auto.from_config(config), _text_forward(pad_id))
        shape = _image_shape(spec, input_shape, inputs, vocab)
        channels = getattr(config, "num_channels", None)
        if channels is not None and channels != shape[0]:
            raise EcosystemError(
                f"{spec} takes {channels}-channel images, the shard set's have {shape[0]}"
            )
        return _adapt(auto.from_config(config), _image_forward)

    return build


def _text_forward(pad_id: int) -> Callable[..., Any]:
    def forward(model: nn.Module, x: Any) -> Any:
        ids = x.long()
        return model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits

    return forward


def _image_forward(model: nn.Module, x: Any) -> Any:
    return model(pixel_values=x).logits


def _adapt(model: nn.Module, call: Callable[..., Any]) -> nn.Module:
    """``model`` whose ``forward(x)`` is ``call(original forward, x)``; state dict unchanged.

    The class is swapped for a subclass (no wrapper module), so parameter names stay the
    Hugging Face ones: ``train.init`` loads its ``model.safetensors`` as it is, and
    ``train.freeze.patterns`` name what its documentation names.
    """
    base = type(model)

    def forward(self: nn.Module, x: Any) -> Any:
        return call(lambda **kw: base.forward(self, **kw), x)

    model.__class__ = type(base.__name__, (base,), {"forward": forward})
    return model


def portable_args(builder: str, args: dict[str, Any]) -> dict[str, Any]:
    """``train.model.args`` as the bundle records them.

    An ``hf:`` model's ``model_dir`` becomes its ``config``: the bundle does not depend on
    the directory.
    """
    prefix, _, _ = builder.partition(":")
    if prefix != "hf" or "model_dir" not in args:
        return args
    from pipeline.core import storage

    out = dict(args)
    fs, path = storage.resolve(str(out.pop("model_dir")))
    out["config"] = json.loads(storage.read_bytes(fs, storage.join(path, "config.json")))
    return out
