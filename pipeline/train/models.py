"""Built-in model builders and the resolver for ``train.model.builder``.

A builder is any callable ``f(*, input_shape, num_outputs, **args) -> nn.Module``; one that
also has an ``inputs`` parameter receives the model's input spec, ``{column: (dtype,
shape)}`` (model-facing, in manifest order; :mod:`pipeline.train.inputs`). A model is called
with one tensor ``[B, *input_shape]`` when the shard set has one input column, and with a
dict ``{column: tensor}`` when it has several (only builders with ``inputs`` can build those).
``input_shape`` is the shape a row is viewed as: ``(D,)`` for the ``features`` vector,
``(C, H, W)`` for an image (already channels-first and float on the device), or what
``train.model.args.input_shape`` says for a feature vector that holds e.g. ``(C, L)`` data —
models reshape flat rows themselves, so the reader and the loop never need their layout.

Built in:

* :func:`mlp` — tabular rows or arrays (several input columns are flattened and
  concatenated);
* :func:`cnn` — one image (or a ``(C, L)`` / ``(C, H, W)`` view of a vector): convolutions
  at full resolution, pooling only while the maps stay ≥ 4 wide, a linear head on the
  flattened maps; no normalization layers (nothing depends on the batch, so DDP ranks and
  model averaging stay deterministic). Its defaults reach ≥ 0.97 val accuracy on
  scikit-learn's 8×8 digits within 20 epochs (tests/integration/test_tensor_training.py);
* :func:`cnn_v1` — the ``cnn`` of 0.1.0 (global average pooling head), which bundles of
  that release are loaded with;
* :func:`fusion` — image column(s) through :func:`cnn`'s convolutions plus the other
  columns (the tabular vector) flattened, concatenated, then an MLP head;
* :func:`text` — token-id column(s) through an embedding bag (the mean of the non-pad
  tokens' embeddings, half of them left out at random in training: a fast baseline) or a
  small Transformer encoder (masked mean of its outputs), plus the other columns (the
  tabular vector) flattened, then an MLP head. Text columns need a builder with a ``vocab``
  parameter (``{column: (vocab_size, pad_id)}``), since the ids are indices, not numbers,
  and their width may change per batch.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.compat import canonical_builder

__all__ = [
    "DEFAULT_LR",
    "BuilderError",
    "build_model",
    "cnn",
    "cnn_v1",
    "fusion",
    "mlp",
    "recommended_lr",
    "resolve_builder",
    "text",
]

_KEY = "train.model.builder"
_MIN_POOLED = 4  # pooling stops before a feature map would get narrower than this

InputSpec = Mapping[str, tuple[str, Sequence[int]]]
Vocab = Mapping[str, tuple[int, int]]


class BuilderError(ValueError):
    """``train.model.builder`` cannot be resolved, or its result is not a usable module."""


class _Reshape(nn.Module):
    """View flat ``[B, prod(shape)]`` rows as ``[B, *shape]``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class _Columns(nn.Module):
    """Several input columns → one ``[B, N]`` float row: each through its own part, concatenated.

    ``parts[i]`` turns column ``names[i]`` into ``[B, n_i]`` (a flatten, or a conv trunk). A
    single tensor stands for the first column (a model built for one input column).
    """

    def __init__(self, names: Sequence[str], parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = {self.names[0]: x}
        outs = [part(x[name]).float() for name, part in zip(self.names, self.parts, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _check_shape(input_shape: Sequence[int], ranks: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in ranks or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must have {' or '.join(map(str, ranks))} positive dimensions, "
            f"got {tuple(input_shape)}"
        )
    return shape


def _check_outputs(num_outputs: int) -> None:
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")


def _dense(width: int, hidden: Sequence[int], dropout: float) -> tuple[list[nn.Module], int]:
    """``Linear → ReLU (→ Dropout)`` per hidden width; the layers and the last width."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for h in hidden:
        if int(h) < 1:
            raise ValueError(f"hidden widths must be >= 1, got {list(hidden)}")
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    return layers, width


def mlp(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
    inputs: InputSpec | None = None,
) -> nn.Module:
    """A multilayer perceptron: ``Linear → ReLU (→ Dropout)`` per hidden width, then a head.

    Args:
        input_shape: shape of one row's features; flattened, so any rank works.
        num_outputs: logits per row (classes) or 1 (regression).
        hidden: widths of the hidden layers (empty: a linear model).
        dropout: dropout probability after each hidden activation.
        inputs: the input spec; with several columns, each is flattened and they are
            concatenated (in spec order) into one row.
    """
    _check_outputs(num_outputs)
    width = math.prod(_check_shape(input_shape, (1, 2, 3)))
    first: list[nn.Module] = [nn.Flatten()]
    if inputs is not None and len(inputs) > 1:
        names = list(inputs)
        first = [_Columns(names, [nn.Flatten() for _ in names])]
        width = sum(math.prod(shape) for _, shape in inputs.values())
    layers, width = _dense(width, hidden, dropout)
    return nn.Sequential(*first, *layers, nn.Linear(width, num_outputs))


def _conv_kinds(
    shape: Sequence[int], channels: Sequence[int]
) -> tuple[type[nn.Conv1d | nn.Conv2d], type[nn.MaxPool1d | nn.MaxPool2d]]:
    """The convolution and pooling layer types for a ``(C, L)`` or ``(C, H, W)`` row."""
    if len(channels) < 1 or any(int(c) < 1 for c in channels):
        raise ValueError(
            f"channels must be a non-empty list of positive ints, got {list(channels)}"
        )
    if len(shape) == 3:
        return nn.Conv2d, nn.MaxPool2d
    return nn.Conv1d, nn.MaxPool1d


def _conv_trunk(shape: tuple[int, ...], channels: Sequence[int]) -> tuple[list[nn.Module], int]:
    """Convolution stages over a ``(C, L)`` or ``(C, H, W)`` row; the layers and output width.

    Each stage is ``Conv(k=3, pad=1) → ReLU``; every stage but the first ends with
    ``MaxPool(2)`` while that leaves maps at least :data:`_MIN_POOLED` wide. The maps are
    flattened at the end.
    """
    conv, pool = _conv_kinds(shape, channels)
    layers: list[nn.Module] = [_Reshape(shape)]
    in_ch, sizes = shape[0], list(shape[1:])
    for i, c in enumerate(channels):
        layers += [conv(in_ch, int(c), kernel_size=3, padding=1), nn.ReLU()]
        if i > 0 and min(sizes) // 2 >= _MIN_POOLED:
            layers.append(pool(2))
            sizes = [s // 2 for s in sizes]
        in_ch = int(c)
    layers.append(nn.Flatten())
    return layers, in_ch * math.prod(sizes)


def cnn(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (32, 64),
) -> nn.Module:
    """A small CNN for one image (``(C, H, W)``) or a vector viewed as ``(C, L)`` / ``(C, H, W)``.

    ``(C, L)`` uses 1-d convolutions, ``(C, H, W)`` 2-d ones, and a bare ``(L,)`` is treated
    as ``(1, L)``; flat rows are reshaped. Stages ``Conv(k=3, pad=1) → ReLU`` per entry of
    ``channels``, ``MaxPool(2)`` after every stage but the first while maps stay
    ≥ 4 wide (an 8×8 image is pooled once, to 4×4), then a linear head on the flattened maps.
    """
    _check_outputs(num_outputs)
    shape = _check_shape(input_shape, (1, 2, 3))
    if len(shape) == 1:
        shape = (1, shape[0])
    layers, width = _conv_trunk(shape, channels)
    return nn.Sequential(*layers, nn.Linear(width, num_outputs))


def cnn_v1(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (16, 32),
) -> nn.Module:
    """The ``cnn`` of 0.1.0 (before git 7d6e640): kept so that its bundles keep loading.

    Stages ``Conv(k=3, pad=1) → ReLU → MaxPool(2)`` (pooling while the size allows), then
    global average pooling and a linear head. A bundle whose ``model.json`` names the
    built-in ``cnn`` but records no ``inputs`` (every bundle written before the input spec
    was, in the same change that replaced this architecture) is built with this function.
    """
    _check_outputs(num_outputs)
    shape = _check_shape(input_shape, (1, 2, 3))
    if len(shape) == 1:
        shape = (1, shape[0])
    conv, pool = _conv_kinds(shape, channels)
    layers: list[nn.Module] = [_Reshape(shape)]
    in_ch, size = shape[0], min(shape[1:])
    for c in channels:
        layers += [conv(in_ch, int(c), kernel_size=3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(pool(2))
            size //= 2
        in_ch = int(c)
    layers += [
        nn.AdaptiveAvgPool2d(1) if len(shape) == 3 else nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(in_ch, num_outputs),
    ]
    return nn.Sequential(*layers)


def fusion(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    inputs: InputSpec | None = None,
    channels: Sequence[int] = (32, 64),
    hidden: Sequence[int] = (128,),
    dropout: float = 0.0,
) -> nn.Module:
    """Images plus the tabular vector: conv trunks and flattened columns → an MLP head.

    Every ``(C, H, W)`` input column goes through its own :func:`cnn` trunk (``channels``),
    every other column is flattened; the results are concatenated and go through ``hidden``
    layers (``dropout`` after each) to ``num_outputs`` logits. Without ``inputs`` the model
    takes one tensor of ``input_shape``.
    """
    _check_outputs(num_outputs)
    spec = dict(inputs or {"input": ("float32", tuple(input_shape))})
    parts: list[nn.Module] = []
    width = 0
    for _, shape in spec.values():
        dims = _check_shape(shape, (1, 2, 3))
        if len(dims) == 3:
            trunk, n = _conv_trunk(dims, channels)
            parts.append(nn.Sequential(*trunk))
        else:
            parts.append(nn.Flatten())
            n = math.prod(dims)
        width += n
    layers, width = _dense(width, hidden, dropout)
    return nn.Sequential(_Columns(list(spec), parts), *layers, nn.Linear(width, num_outputs))


def _small_init(weight: torch.Tensor, pad_id: int) -> None:
    """Token embeddings drawn from N(0, 1 / dim), the pad row zero.

    PyTorch's N(0, 1) makes the mean of a text's rare-word vectors (never or seldom
    trained) noise as large as the signal; at 1 / dim the bag reached TF-IDF + logistic
    regression on a 7-class generated task (0.91 vs 0.92; 0.86 with N(0, 1)).
    """
    with torch.no_grad():
        nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
        weight[pad_id].zero_()


class _TextEncoder(nn.Module):
    """``[B, L]`` token ids → ``[B, dim]``: an embedding bag or a Transformer encoder.

    Pad positions never contribute: the bag excludes ``pad_id`` from its mean, the encoder
    masks them in attention and in its mean pooling. ``L`` may be anything up to
    ``max_length`` (per-batch padding). In training, each token is treated as padding with
    probability ``token_dropout`` (a text that would lose every token keeps them all).
    """

    def __init__(
        self,
        vocab: tuple[int, int],
        max_length: int,
        *,
        encoder: str,
        dim: int,
        layers: int,
        heads: int,
        dropout: float,
        token_dropout: float,
    ) -> None:
        super().__init__()
        size, self.pad_id = vocab
        self.encoder = encoder
        self.token_dropout = token_dropout
        if encoder == "bag":
            self.bag = nn.EmbeddingBag(size, dim, mode="mean", padding_idx=self.pad_id)
            _small_init(self.bag.weight, self.pad_id)
            return
        self.embed = nn.Embedding(size, dim, padding_idx=self.pad_id)
        _small_init(self.embed.weight, self.pad_id)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def _drop_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids != self.pad_id
        drop = real & (torch.rand(ids.shape, device=ids.device) < self.token_dropout)
        drop &= (real & ~drop).any(dim=1, keepdim=True)  # never empty a text
        return ids.masked_fill(drop, self.pad_id)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        if self.training and self.token_dropout > 0:
            ids = self._drop_tokens(ids)
        if self.encoder == "bag":
            out: torch.Tensor = self.bag(ids)
            return out
        pad = ids == self.pad_id
        pad[:, 0] = False  # an all-pad row (empty text) still attends to something
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.layers(self.embed(ids) + self.position(positions), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def text(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    inputs: InputSpec | None = None,
    vocab: Vocab | None = None,
    encoder: Literal["bag", "transformer"] = "bag",
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    hidden: Sequence[int] = (64,),
    dropout: float = 0.0,
    token_dropout: float | None = None,
) -> nn.Module:
    """Text columns (token ids) plus any other columns: encoders → concatenation → MLP head.

    Args:
        input_shape: shape of the first input column (used when ``inputs`` is absent).
        num_outputs: logits per row (classes) or 1 (regression).
        inputs: the input spec; every column named in ``vocab`` is text, the others (the
            tabular ``features`` vector, arrays) are flattened.
        vocab: ``{text column: (vocab_size, pad_id)}``, given by the training code.
        encoder: ``bag`` (mean of token embeddings) or ``transformer`` (encoder layers with
            learned positions, masked mean pooling).
        dim: embedding width.
        layers: Transformer encoder layers.
        heads: attention heads per layer (``dim`` must be divisible by it).
        hidden: widths of the head's hidden layers.
        dropout: dropout after each hidden layer (and in the Transformer).
        token_dropout: in training, the probability that a token is left out of its text
            (treated as padding), a regularizer that costs nothing at inference. Unset:
            0.5 for the bag (test accuracy on the 7-class task of
            tests/integration/test_text.py: 0.86–0.88 without, 0.89–0.90 with, TF-IDF +
            logistic regression 0.90), 0 for the Transformer.
    """
    _check_outputs(num_outputs)
    if not vocab:
        raise ValueError("the text model needs text columns (the shard set has none)")
    if encoder not in ("bag", "transformer"):
        raise ValueError(f"encoder must be 'bag' or 'transformer', got {encoder!r}")
    if dim < 1 or layers < 1 or heads < 1 or dim % heads:
        raise ValueError(f"need dim, layers, heads >= 1 and dim divisible by heads, got {dim}")
    if token_dropout is None:
        token_dropout = 0.5 if encoder == "bag" else 0.0
    if not 0.0 <= token_dropout < 1.0:
        raise ValueError(f"token_dropout must be in [0, 1), got {token_dropout}")
    spec = dict(inputs or {next(iter(vocab)): ("int32", tuple(input_shape))})
    parts: list[nn.Module] = []
    width = 0
    for name, (_, shape) in spec.items():
        dims = _check_shape(shape, (1, 2, 3))
        if name in vocab:
            parts.append(
                _TextEncoder(
                    vocab[name],
                    dims[0],
                    encoder=encoder,
                    dim=dim,
                    layers=layers,
                    heads=heads,
                    dropout=dropout,
                    token_dropout=token_dropout,
                )
            )
            width += dim
        else:
            parts.append(nn.Flatten())
            width += math.prod(dims)
    head, width = _dense(width, hidden, dropout)
    return nn.Sequential(_Columns(list(spec), parts), *head, nn.Linear(width, num_outputs))


def _text_lr(args: Mapping[str, Any]) -> float:
    """``text``'s recommended learning rate: 0.01 for the embedding bag, 0.001 otherwise.

    At 0.001 the bag underfits (0.61 vs 0.82 test accuracy at 0.01 on an 8-class corpus of
    1,300 documents, 30 epochs); the Transformer encoder keeps 0.001.
    """
    return 1e-2 if args.get("encoder", "bag") == "bag" else 1e-3


text.recommended_lr = _text_lr  # type: ignore[attr-defined]

DEFAULT_LR = 1e-3
"""``train.optimizer.lr`` for a builder that recommends none (``mlp``, ``cnn``, ``fusion``)."""


def recommended_lr(spec: str, args: Mapping[str, Any] | None = None) -> float:
    """The learning rate the builder ``spec`` recommends for ``args``, else :data:`DEFAULT_LR`.

    A builder recommends one with a ``recommended_lr`` attribute: a number, or a function of
    its keyword arguments (``train.model.args``) returning one.
    """
    rec = getattr(resolve_builder(spec), "recommended_lr", None)
    if rec is None:
        return DEFAULT_LR
    value = rec(dict(args or {})) if callable(rec) else rec
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BuilderError(
            f"{_KEY}: {spec!r} recommends the learning rate {value!r}, not a number > 0"
        )
    return float(value)


def resolve_builder(spec: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:function"``; errors name ``train.model.builder``.

    An earlier release's module path (``pipeline.models:mlp``, as bundles of 0.1.0 record
    it) resolves to today's, with one deprecation line. ``torchvision:…``, ``timm:…`` and
    ``hf:…`` name models of those libraries (:mod:`pipeline.train.ecosystem`).
    """
    from pipeline.train.ecosystem import EcosystemError, ecosystem_builder

    try:
        ecosystem = ecosystem_builder(spec)
    except EcosystemError as e:
        raise BuilderError(f"{_KEY}: {e}") from e
    if ecosystem is not None:
        return ecosystem
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BuilderError(f"{_KEY}: expected 'package.module:function', got {spec!r}")
    module_name = canonical_builder(spec).partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BuilderError(f"{_KEY}: cannot import module {module_name!r} of {spec!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BuilderError(f"{_KEY}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BuilderError(f"{_KEY}: {spec!r} is a {type(obj).__name__}, not callable")
    return obj


def build_model(
    spec: str,
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    args: dict[str, Any] | None = None,
    inputs: InputSpec | None = None,
    vocab: Vocab | None = None,
) -> nn.Module:
    """Resolve ``spec`` and call it; the result must be an ``nn.Module``.

    ``inputs`` (the input spec) is passed to builders with an ``inputs`` parameter; a spec
    of several columns needs one. ``vocab`` (the text columns) goes to builders with a
    ``vocab`` parameter; text columns need one.
    """
    builder = resolve_builder(spec)
    kwargs = dict(args or {})
    if vocab:
        if not _takes(builder, "vocab"):
            raise BuilderError(
                f"{_KEY}: {spec!r} has no 'vocab' parameter, but the shard set has text "
                f"column(s) {', '.join(vocab)} (token ids): use pipeline.train.models:text"
            )
        kwargs["vocab"] = dict(vocab)
    if inputs is not None and _takes(builder, "inputs"):
        kwargs["inputs"] = {k: (d, tuple(s)) for k, (d, s) in inputs.items()}
    elif inputs is not None and len(inputs) > 1:
        raise BuilderError(
            f"{_KEY}: {spec!r} takes one input tensor (it has no 'inputs' parameter), but the "
            f"shard set has {len(inputs)} input columns ({', '.join(inputs)}): use a builder "
            "that takes several, e.g. pipeline.train.models:fusion or :mlp"
        )
    try:
        model = builder(input_shape=tuple(input_shape), num_outputs=num_outputs, **kwargs)
    except (TypeError, ValueError) as e:
        raise BuilderError(
            f"{_KEY}: {spec!r} rejected its arguments (train.model.args): {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise BuilderError(
            f"{_KEY}: {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _takes(builder: Callable[..., Any], parameter: str) -> bool:
    try:
        return parameter in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
