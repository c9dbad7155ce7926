"""Text columns (``etl.texts``): token ids from a Hugging Face ``tokenizers`` tokenizer.

Fitting (:func:`fit_texts`, on the driver): a column with ``tokenizer`` set loads that
``tokenizer.json`` (any storage URI); otherwise a BPE or WordPiece tokenizer is trained on a
bounded sample of the good train rows — the ``sample_rows`` rows with the smallest seeded hash
of the key (``etl.split.seed``), each cut to its first
:data:`~preprocessing.config.TEXT_SAMPLE_CHARS` characters, gathered to the driver in that
order, so the same input and config train the same tokenizer (byte for byte, same ids) on any
cluster and in any run. Either way (:func:`save_texts`) the tokenizer is saved as
``text/<column>.json`` in the shard set's feature-model directory (a bundle's ``features/``
copy carries it), and the column's spec records its vocabulary size, pad id and that path.

Encoding (:func:`encode_texts`, in the executors, the shard writer's map stage):
``mapInArrow`` batch-encodes each Arrow
batch (``Tokenizer.encode_batch``, the tokenizer's own special tokens added), keeps the first
``max_length`` ids and pads with the pad id; a null value (empty text kept by
``empty: keep``) is an all-pad row. With ``count=True`` every text column ``c`` also gets
``_trunc_<c>`` (1 where ids were cut), which the shard writer sums per shard. The ETL and
scoring call the same function with the same saved tokenizer, so they produce the same ids.

:data:`TEXT` is the text :class:`~preprocessing.features.kind.TensorKind`: it fits, saves and
encodes through these functions, and adds the provided tokenizers' digests
(:func:`tokenizer_digests`) to the ETL's fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from pipeline.core import storage
from pipeline.core.configbase import ConfigError
from pipeline.data.columns import ColumnSpec
from preprocessing.config import TEXT_SAMPLE_CHARS, EtlConfig, TextConfig
from preprocessing.features.kind import TensorKind
from preprocessing.shards import TRUNCATED_PREFIX

__all__ = [
    "PAD",
    "TEXT",
    "FittedText",
    "encode_ids",
    "encode_texts",
    "fit_texts",
    "load_texts",
    "save_texts",
    "tokenizer_digests",
]

PAD: Final = "[PAD]"
UNK: Final = "[UNK]"
_PAD_NAMES: Final = (PAD, "<pad>")


@dataclass(frozen=True)
class FittedText:
    """A text column's spec (int32 ``[max_length]``, kind ``text``) and its tokenizer JSON."""

    spec: ColumnSpec
    tokenizer_json: str

    @property
    def max_length(self) -> int:
        """Ids stored per row."""
        return self.spec.shape[0]

    @property
    def pad_id(self) -> int:
        """The id rows are padded with."""
        assert self.spec.text is not None, "a text spec has its text entry"
        return int(self.spec.text["pad_id"])


def _relpath(column: str) -> str:
    return f"text/{column}.json"


def _read_text(uri: str, key: str) -> str:
    """A provided ``tokenizer.json``'s text; ConfigError under ``key`` when unreadable."""
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        raise ConfigError(key, f"no tokenizer file at {uri!r}")
    try:
        return storage.read_bytes(fs, path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {uri!r}: {e}") from e


def tokenizer_digests(cfg: EtlConfig) -> dict[str, str]:
    """sha256 of every provided ``tokenizer.json`` (a change must rebuild the shard set)."""
    out = {}
    for column, text in cfg.texts.items():
        if text.tokenizer is not None:
            key = f"etl.texts.{column}.tokenizer"
            out[column] = hashlib.sha256(_read_text(text.tokenizer, key).encode()).hexdigest()
    return out


def _pad_id(tok: Tokenizer, key: str, uri: str) -> int:
    padding = tok.padding
    if padding is not None:
        return int(padding["pad_id"])
    for name in _PAD_NAMES:
        found = tok.token_to_id(name)
        if found is not None:
            return int(found)
    raise ConfigError(
        key, f"{uri!r} has no pad token (no padding settings, no {' or '.join(_PAD_NAMES)})"
    )


def _load(column: str, text: TextConfig) -> tuple[Tokenizer, int]:
    key = f"etl.texts.{column}.tokenizer"
    assert text.tokenizer is not None, "only for a provided tokenizer"
    try:
        tok = Tokenizer.from_str(_read_text(text.tokenizer, key))
    except Exception as e:  # the tokenizers library raises plain Exception for bad JSON
        raise ConfigError(key, f"{text.tokenizer!r} is not a tokenizer.json: {e}") from e
    return tok, _pad_id(tok, key, text.tokenizer)


def _untrained(text: TextConfig) -> Tokenizer:
    """An empty BPE / WordPiece tokenizer: NFKC (+ lowercase), split on whitespace/punctuation."""
    model = (
        models.BPE(unk_token=UNK) if text.algorithm == "bpe" else models.WordPiece(unk_token=UNK)
    )
    tok = Tokenizer(model)
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if text.lowercase:
        steps.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _continuations(texts: list[str], text: TextConfig) -> list[str]:
    """The ``##c`` tokens WordPiece training starts from (each char seen inside a word), sorted.

    A training run with no merges (vocabulary size 1) gives exactly that set.
    """
    tok = _untrained(text)
    trainer = trainers.WordPieceTrainer(
        vocab_size=1, special_tokens=[PAD, UNK], show_progress=False
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return sorted(t for t in tok.get_vocab() if t.startswith("##") and len(t) == 3)


def _train(texts: list[str], text: TextConfig) -> Tokenizer:
    """A BPE / WordPiece tokenizer trained on ``texts`` (``[PAD]`` = 0, ``[UNK]`` = 1).

    Deterministic: the same ``texts`` give the same JSON in any process. The WordPiece
    trainer numbers the ``##c`` tokens in hash-map order (random per process), and merges
    that tie on count go to the lower ids, so its vocabulary and ids would vary from run to
    run; here the ``##c`` tokens are given to it up front, sorted (:func:`_continuations`),
    as extra special tokens, which it keeps in the vocabulary with ids 2, 3, ... in that
    order. They are then dropped from the added (special) tokens, so ``##c`` in the input is
    not matched as one. The BPE trainer's ids are deterministic already.
    """
    special = [PAD, UNK]
    tok = _untrained(text)
    if text.algorithm == "bpe":
        bpe = trainers.BpeTrainer(
            vocab_size=text.vocab_size, special_tokens=special, show_progress=False
        )
        tok.train_from_iterator(texts, bpe, length=len(texts))
        return tok
    trainer = trainers.WordPieceTrainer(
        vocab_size=text.vocab_size,
        special_tokens=special + _continuations(texts, text),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    data = json.loads(tok.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in special]
    return Tokenizer.from_str(json.dumps(data))


def _sample(train: DataFrame, cfg: EtlConfig, column: str) -> list[str]:
    """The bounded, seeded training sample of ``column`` (see the module docstring)."""
    text = cfg.texts[column]
    order = F.xxhash64(F.lit(cfg.split.seed + 2), F.col(cfg.key))
    rows = (
        train.where(F.col(column).isNotNull())
        .select(order.alias("_h"), F.col(cfg.key).cast("string").alias("_k"), F.col(column))
        .orderBy("_h", "_k")
        .limit(text.sample_rows)
        .select(F.substring(F.col(column), 1, TEXT_SAMPLE_CHARS).alias("t"))
        .collect()
    )
    return [r["t"] for r in rows]


def fit_texts(train: DataFrame, cfg: EtlConfig) -> dict[str, FittedText]:
    """Load or train every text column's tokenizer (``train``: the good train rows)."""
    out = {}
    for column, text in cfg.texts.items():
        if text.tokenizer is not None:
            tok, pad = _load(column, text)
        else:
            tok, pad = _train(_sample(train, cfg, column), text), 0
            assert tok.token_to_id(PAD) == 0, "the first special token gets id 0"
        tok.no_padding()
        tok.no_truncation()
        entry = {
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "pad_id": pad,
            "tokenizer": _relpath(column),
        }
        spec = ColumnSpec(column, "int32", (text.max_length,), kind="text", text=entry)
        out[column] = FittedText(spec, tok.to_str())
    return out


def save_texts(texts: Mapping[str, FittedText], features_dir: str) -> None:
    """Write each tokenizer to its spec's path under ``features_dir``.

    Call after the feature model is saved there: its ``overwrite`` save would remove them.
    """
    fs, root = storage.resolve(features_dir)
    for fitted in texts.values():
        assert fitted.spec.text is not None, "a text spec has its text entry"
        path = storage.join(root, str(fitted.spec.text["tokenizer"]))
        fs.create_dir(storage.join(root, "text"), recursive=True)
        storage.atomic_write_bytes(fs, path, fitted.tokenizer_json.encode())


def load_texts(specs: Mapping[str, ColumnSpec], features_dir: str) -> dict[str, FittedText]:
    """The saved tokenizers of the text columns ``specs`` (by column), from ``features_dir``."""
    fs, root = storage.resolve(features_dir)
    out = {}
    for column, spec in specs.items():
        assert spec.text is not None, "a text spec has its text entry"
        path = storage.join(root, str(spec.text["tokenizer"]))
        out[column] = FittedText(spec, storage.read_bytes(fs, path).decode("utf-8"))
    return out


@functools.lru_cache(maxsize=8)
def _tokenizer(data: str) -> Tokenizer:
    """One parsed tokenizer per Python worker and JSON text."""
    return Tokenizer.from_str(data)


def encode_ids(
    tok: Tokenizer, values: list[str | None], max_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[n, max_length]`` int32 ids (cut, padded) and a bool per row: were ids cut."""
    encodings = tok.encode_batch([v or "" for v in values], add_special_tokens=True)
    ids = np.full((len(values), max_length), pad_id, dtype=np.int32)
    cut = np.zeros(len(values), dtype=bool)
    for i, (value, enc) in enumerate(zip(values, encodings, strict=True)):
        if value is None:
            continue
        row = enc.ids
        cut[i] = len(row) > max_length
        row = row[:max_length]
        ids[i, : len(row)] = row
    return ids, cut


def _encoder(
    texts: Mapping[str, tuple[str, int, int]], count: bool
) -> Any:  # the mapInArrow function
    def encode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            names, arrays = list(batch.schema.names), list(batch.columns)
            for column, (data, max_length, pad_id) in texts.items():
                i = names.index(column)
                ids, cut = encode_ids(_tokenizer(data), arrays[i].to_pylist(), max_length, pad_id)
                offsets = pa.array(np.arange(0, ids.size + 1, max_length, dtype=np.int32))
                arrays[i] = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1)))
                if count:
                    names.append(TRUNCATED_PREFIX + column)
                    arrays.append(pa.array(cut.astype(np.int8)))
            yield pa.RecordBatch.from_arrays(arrays, names=names)

    return encode


def encode_texts(
    df: DataFrame, texts: Mapping[str, FittedText], *, count: bool = False
) -> DataFrame:
    """``df`` with each text column (strings) replaced by its ids (``array<int>``).

    ``count`` adds ``_trunc_<column>`` (tinyint, 1 where ids were cut) per text column.
    """
    if not texts:
        return df
    fields = []
    for f in df.schema.fields:
        if f.name in texts:
            fields.append(T.StructField(f.name, T.ArrayType(T.IntegerType(), False), False))
        else:
            fields.append(f)
    if count:
        fields += [T.StructField(TRUNCATED_PREFIX + c, T.ByteType(), False) for c in texts]
    plain = {c: (t.tokenizer_json, t.max_length, t.pad_id) for c, t in texts.items()}
    return df.mapInArrow(_encoder(plain, count), T.StructType(fields))


def _spec(cfg: EtlConfig, column: str, fitted: Mapping[str, FittedText]) -> ColumnSpec:
    return fitted[column].spec


def _inputs(cfg: EtlConfig) -> dict[str, Any]:
    digests = tokenizer_digests(cfg)  # a provided tokenizer.json is an input too
    return {"_tokenizers": digests} if digests else {}


TEXT = TensorKind(
    name="text",
    columns=lambda cfg: [c for c in cfg.schema if c in cfg.texts],
    spec=_spec,
    aggregates=lambda cfg, column: [],  # not normalized: ids
    normalize=lambda cfg, column, values: None,
    fit=fit_texts,
    save=save_texts,
    encode=lambda df, fitted: encode_texts(df, fitted, count=True),
    inputs=_inputs,
)
"""The text kind (:data:`~preprocessing.features.tensors.TENSOR_KINDS`): its fitted state is
:func:`fit_texts`' ``{column: FittedText}``."""
