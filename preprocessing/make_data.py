"""Synthetic raw table for demos, tests and benchmarks (``spark-train make-data``).

20 numeric columns ``f0..f19``, 5 categorical ``c0..c4`` (``c2`` and ``c4`` high-cardinality,
Zipf-distributed), a key ``id`` and a binary ``label`` drawn from a non-linear logit (a
sine, a product, a threshold, a square, and category effects), so a model has something
real to learn. With ``text=True`` a free-text column ``review`` is added before the label
(:data:`TEXT_COLUMN`): 5–40 pseudo-words, a few of them cue words drawn from a positive or a
negative list with odds set by the label, so a text model can predict the label from the
words (and the other columns stay as they are without it). About ``dirty_fraction`` of the rows are spoilt in one of several ways (see
``DIRT_KINDS``), as real exports are. Generation is split into fixed-size chunks, each
seeded by ``(seed, chunk)`` and produced by one Spark task with numpy + Arrow, so the output
is identical for a given seed and row count whatever the cluster, and 10 M rows take
minutes on two cores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import SparkSession

__all__ = [
    "DIRT_KINDS",
    "SCHEMA",
    "TEXT_COLUMN",
    "demo_etl_section",
    "make_data",
    "schema_ddl",
    "text_words",
]

NUM_NUMERIC = 20
CATEGORICAL_LEVELS = {"c0": 5, "c1": 20, "c2": 5000, "c3": 3, "c4": 20000}
CHUNK_ROWS = 250_000
NUMERIC = [f"f{i}" for i in range(NUM_NUMERIC)]
CATEGORICAL = list(CATEGORICAL_LEVELS)
COLUMNS = ["id", *NUMERIC, *CATEGORICAL, "label"]
SCHEMA: dict[str, str] = {
    "id": "long",
    **dict.fromkeys(NUMERIC, "double"),
    **dict.fromkeys(CATEGORICAL, "string"),
    "label": "int",
}
# Kinds of dirt for CSV output (text-level); Parquet output gets the value-level ones.
DIRT_KINDS = (
    "text_in_numeric",
    "nan",
    "inf",
    "huge",
    "label_missing",
    "label_out_of_range",
    "label_not_integer",
    "too_few_fields",
    "too_many_fields",
    "key_missing",
)
_VALUE_DIRT = ("nan", "inf", "label_missing", "label_out_of_range")
TEXT_COLUMN = "review"
_TEXT_FILLER = 400  # neutral pseudo-words
_TEXT_CUES = 24  # cue words per polarity
_CUE_AGREES = 0.8  # a cue word matches the row's label with this probability


def text_words() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pseudo-words of the text column: (filler, positive cues, negative cues)."""
    rng = np.random.default_rng(20261203)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: list[str] = []
    while len(words) < _TEXT_FILLER + 2 * _TEXT_CUES:
        word = "".join(rng.choice(syllables, size=int(rng.integers(2, 4))))
        if word not in words:
            words.append(word)
    w = np.array(words)
    cues = _TEXT_FILLER + _TEXT_CUES
    return w[:_TEXT_FILLER], w[_TEXT_FILLER:cues], w[cues:]


def _text_column(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """One review per row: filler words (Zipf) with 1–4 cue words agreeing with the label."""
    filler, positive, negative = text_words()
    p = _zipf_probabilities(len(filler))
    out = []
    for y in label.tolist():
        words = list(rng.choice(filler, size=int(rng.integers(4, 37)), p=p))
        for _ in range(int(rng.integers(1, 5))):
            agrees = rng.random() < _CUE_AGREES
            cues = positive if (y == 1) == agrees else negative
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(cues)))
        out.append(" ".join(words))
    return np.array(out)


def _zipf_probabilities(levels: int, exponent: float = 1.1) -> np.ndarray:
    """Truncated Zipf: level i has probability ∝ (i + 1) ** -exponent."""
    w = np.arange(1, levels + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _chunk_columns(rng: np.random.Generator, start: int, n: int) -> dict[str, np.ndarray]:
    x = rng.standard_normal((n, NUM_NUMERIC)).astype(np.float64)
    x[:, 5] = np.abs(x[:, 5]) * 3.0  # a skewed, positive column
    x[:, 6] = np.round(x[:, 6] * 2.0)  # a discrete-looking one
    cats = {
        c: rng.choice(k, size=n, p=_zipf_probabilities(k)) for c, k in CATEGORICAL_LEVELS.items()
    }
    cat_effect = 0.8 * (cats["c0"] == 0) - 0.6 * (cats["c0"] == 2) + 0.7 * (cats["c3"] == 1)
    cat_effect += 0.5 * (cats["c1"] < 3) - 0.4 * (cats["c2"] < 10)
    logit = (
        1.6 * np.sin(1.5 * x[:, 0])
        + 1.2 * x[:, 1] * x[:, 2]
        + 1.0 * (x[:, 3] > 0.5)
        - 0.5 * x[:, 4] ** 2
        + 0.6 * x[:, 7]
        + cat_effect
        + 0.3
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-2.0 * logit))).astype(np.int64)
    cols: dict[str, np.ndarray] = {"id": np.arange(start, start + n, dtype=np.int64)}
    for i, name in enumerate(NUMERIC):
        cols[name] = np.round(x[:, i], 5)
    prefixes = {"c0": "region", "c1": "channel", "c2": "merchant", "c3": "tier", "c4": "sku"}
    for c, codes in cats.items():
        cols[c] = np.char.add(f"{prefixes[c]}_", codes.astype(str))
    cols["label"] = label
    return cols


def _dirty_rows(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    return np.flatnonzero(rng.random(n) < fraction)


def _columns(text: bool) -> list[str]:
    return [*COLUMNS[:-1], TEXT_COLUMN, COLUMNS[-1]] if text else COLUMNS


def _csv_lines(cols: dict[str, np.ndarray], dirty: np.ndarray, kinds: np.ndarray) -> pa.Array:
    arrays = []
    names = _columns(TEXT_COLUMN in cols)
    for name in names:
        v = cols[name]
        arrays.append(pc.cast(pa.array(v), pa.string()))
    lines = pc.binary_join_element_wise(*arrays, ",").to_pylist()
    for i, kind in zip(dirty.tolist(), kinds.tolist(), strict=True):
        lines[i] = _spoil_line(lines[i].split(","), str(kind), i, names)
    return pa.array(lines, pa.string())


def _spoil_line(fields: list[str], kind: str, i: int, names: list[str]) -> str:
    pos = {c: j for j, c in enumerate(names)}
    f = 1 + i % NUM_NUMERIC
    if kind == "text_in_numeric":
        fields[f] = "n/a"
    elif kind == "nan":
        fields[f] = "NaN"
    elif kind == "inf":
        fields[f] = "-inf" if i % 2 else "Infinity"
    elif kind == "huge":
        fields[f] = "1e308"
    elif kind == "label_missing":
        fields[pos["label"]] = ""
    elif kind == "label_out_of_range":
        fields[pos["label"]] = "2"
    elif kind == "label_not_integer":
        fields[pos["label"]] = "0.5"
    elif kind == "too_few_fields":
        fields = fields[:-3]
    elif kind == "too_many_fields":
        fields = [*fields, "extra"]
    elif kind == "key_missing":
        fields[pos["id"]] = ""
    return ",".join(fields)


def _chunk_table(
    seed: int, chunk: int, rows: int, fmt: str, dirty_fraction: float, text: bool = False
) -> pa.RecordBatch:
    rng = np.random.default_rng([seed, chunk])
    start = chunk * CHUNK_ROWS
    n = min(CHUNK_ROWS, rows - start)
    cols = _chunk_columns(rng, start, n)
    if text:  # its own stream: the other columns are the same with or without it
        label = cols.pop("label")
        cols[TEXT_COLUMN] = _text_column(np.random.default_rng([seed, chunk, 1]), label)
        cols["label"] = label
    dirty = _dirty_rows(rng, n, dirty_fraction)
    if fmt == "csv":
        kinds = rng.choice(np.array(DIRT_KINDS), size=len(dirty))
        header = ",".join(_columns(text))
        lines = pa.concat_arrays([pa.array([header]), _csv_lines(cols, dirty, kinds)])
        return pa.RecordBatch.from_arrays([lines], names=["value"])
    kinds = rng.choice(np.array(_VALUE_DIRT), size=len(dirty))
    label = cols["label"].astype(np.float64)
    for i, kind in zip(dirty.tolist(), kinds.tolist(), strict=True):
        if kind in ("nan", "inf"):
            cols[NUMERIC[i % NUM_NUMERIC]][i] = np.nan if kind == "nan" else np.inf
        elif kind == "label_missing":
            label[i] = np.nan
        else:
            label[i] = 2
    arrays: dict[str, Any] = {k: pa.array(v) for k, v in cols.items() if k != "label"}
    arrays["label"] = pa.array(label, mask=np.isnan(label)).cast(pa.int32())
    return pa.RecordBatch.from_pydict(arrays)


def _schema(text: bool) -> dict[str, str]:
    return {c: SCHEMA.get(c, "string") for c in _columns(text)}


def schema_ddl(text: bool = False) -> str:
    """Spark DDL of the generated table (``SCHEMA`` in column order, ``review`` with text)."""
    return ", ".join(f"`{c}` {t}" for c, t in _schema(text).items())


def make_data(
    spark: SparkSession,
    rows: int,
    output: str,
    *,
    seed: int = 0,
    fmt: str = "csv",
    dirty_fraction: float = 0.01,
    text: bool = False,
) -> int:
    """Write ``rows`` rows to ``output`` (overwritten) as CSV (one file per chunk) or Parquet.

    ``text`` adds the ``review`` column (see the module docstring).
    """
    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"--format must be csv or parquet, got {fmt!r}")
    chunks = math.ceil(rows / CHUNK_ROWS)

    def gen(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for chunk in b.column(0).to_pylist():
                yield _chunk_table(seed, int(chunk), rows, fmt, dirty_fraction, text)

    ids = spark.range(0, chunks, 1, numPartitions=chunks)
    if fmt == "csv":
        out = ids.mapInArrow(gen, "value string")
        out.write.mode("overwrite").option("compression", "none").text(output)
    else:
        out = ids.mapInArrow(gen, schema_ddl(text))
        out.write.mode("overwrite").parquet(output)
    return rows


def demo_etl_section(
    raw: str, output: str, fmt: str = "csv", *, text: bool = False
) -> dict[str, Any]:
    """An ``etl`` config section for data written by :func:`make_data` (``text``: with it)."""
    texts = {TEXT_COLUMN: {"max_length": 48}} if text else {}
    return {
        "input": {"path": raw, "format": fmt},
        "schema": _schema(text),
        "texts": texts,
        "label": "label",
        "key": "id",
        "numeric": list(NUMERIC),
        "categorical": list(CATEGORICAL),
        "onehot": ["c0", "c3"],
        "classes": [0, 1],
        "split": {"val": 0.1, "test": 0.1, "seed": 7},
        "output": output,
        "num_shards": 8,
    }
