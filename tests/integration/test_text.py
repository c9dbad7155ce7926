"""Text columns end to end on the session's ``local[2]``: ETL → shards → 2-worker training →
bundle → evaluate → score, real Spark, real ``tokenizers``.

* make-data's ``review`` column with a WordPiece tokenizer trained in the ETL, plus the
  tabular vector, through the embedding-bag ``text`` model: the test accuracy clearly beats
  the majority class; scoring's token ids equal the shards' for every row; per-batch and
  fixed padding give the same ids;
* a JSON corpus with hostile texts (null, empty, blank, 1 MB, invalid UTF-8, mixed scripts
  and emoji, a number; invalid UTF-8 in CSV, read as U+FFFD, is in the first set) and a ``tokenizer.json`` the user provides, through the Transformer
  ``text`` model: the ETL reconciles exactly with the expected reasons, scoring gives the
  same reasons, and a categorical column of unique strings draws the warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from pipeline.data.reader import ShardReader
from pipeline.data.shardset import SPLITS, ShardSet
from pipeline.launch.fit import TrainResult, fit
from pipeline.serve import score as scoring
from pipeline.serve.evaluate import evaluate_bundle
from pipeline.serve.inspect import describe, render
from pipeline.train.config import TrainConfig
from preprocessing.config import EtlConfig
from preprocessing.etl import EtlResult, run_etl
from preprocessing.make_data import demo_etl_section, make_data, text_words
from preprocessing.read import read_raw, validate_features
from tests.shards import tensor_values

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]

ROWS = 1500
MAX_LENGTH = 24


def _train_cfg(tmp: Path, dataset: str, args: dict[str, Any], epochs: int) -> TrainConfig:
    return TrainConfig.from_mapping(
        {
            "dataset": dataset,
            "model": {"builder": "pipeline.train.models:text", "args": args},
            "num_workers": 2,
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0, "keep": 1},
            "output": str(tmp / "model"),
            "timeout_s": 300,
            "max_attempts": 1,
        }
    )


def _shard_table(shards: str) -> pa.Table:
    ss = ShardSet.open(shards)
    paths = [ss.shard_path(sh) for s in SPLITS for sh in ss.split(s).shards]
    return pa.concat_tables([pq.read_table(p, filesystem=ss.fs) for p in paths])


def _ids_by_key(table: pa.Table, key: str, column: str) -> dict[Any, list[int]]:
    col = table.column(column)
    if pa.types.is_fixed_size_binary(col.type):  # format_version 2: int32 little-endian bytes
        ids = tensor_values(col, np.dtype(np.int32), (col.type.byte_width // 4,)).tolist()
    else:
        ids = col.to_pylist()
    return dict(zip(table.column(key).to_pylist(), ids, strict=True))


def _beats_majority(bundle: str, shards: str, what: str) -> float:
    labels = _shard_table(shards).column("label").to_numpy()
    test = ShardSet.open(shards).split("test").rows
    result = evaluate_bundle(bundle, split="test")
    majority = max(np.mean(labels == 0), np.mean(labels == 1))
    print(f"{what}: test accuracy {result['accuracy']:.3f} ({test} rows), majority {majority:.3f}")
    assert result["rows"] == test
    assert result["accuracy"] >= majority + 0.12, (result["accuracy"], majority)
    return float(result["accuracy"])


@dataclass(frozen=True)
class Built:
    etl: EtlConfig
    result: EtlResult
    train: TrainConfig
    fitted: TrainResult
    tmp: Path


@pytest.fixture(scope="module")
def trained(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """make-data with text → ETL (trained WordPiece) → the embedding-bag model on 2 workers."""
    tmp = tmp_path_factory.mktemp("text-trained")
    raw = tmp / "raw"
    make_data(spark, ROWS, str(raw), seed=5, text=True, dirty_fraction=0.0)
    section = demo_etl_section(str(raw), str(tmp / "shards"), text=True)
    columns = list(section["schema"])
    values = {"id": "", "review": "", "label": "1"} | {c: "0.5" for c in section["numeric"]}
    values |= {c: f"{c}_level" for c in section["categorical"]}
    lines = [",".join(values[c] if c != "id" else str(10**7 + i) for c in columns) for i in (0, 1)]
    lines = [lines[0], lines[1].replace(",,", ",   ,"), lines[1].replace(",,", ",ok \udcff,")]
    lines[2] = lines[2].replace(str(10**7 + 1), str(10**7 + 2))
    # the empty review, a blank one, and one with an invalid UTF-8 byte (quarantined)
    data = "\n".join([",".join(columns), *lines]) + "\n"
    (raw / "extra.csv").write_bytes(data.encode("utf-8", "surrogateescape"))
    section.update(num_shards=2, categorical=["c0", "c3"], onehot=["c0", "c3"])
    section["texts"] = {"review": {"max_length": MAX_LENGTH, "vocab_size": 2000}}
    etl = EtlConfig.from_mapping(section)
    result = run_etl(spark, etl)
    cfg = _train_cfg(tmp, etl.output, {"dim": 32, "hidden": [32]}, epochs=5)
    return Built(etl, result, cfg, fit(cfg, spark), tmp)


def test_trained_tokenizer_etl_train_evaluate_score(spark: Any, trained: Built) -> None:
    m = trained.result.manifest
    assert m["reconciliation"] == {"rows_in": ROWS + 3, "rows_ok": ROWS + 2, "rows_quarantined": 1}
    assert m["quarantine"]["by_reason"] == {"text_invalid": 1}
    (review,) = [e for e in m["schema"] if e["name"] == "review"]
    assert review["dtype"] == "int32" and review["shape"] == [MAX_LENGTH]
    assert review["kind"] == "text" and review["text"]["pad_id"] == 0
    truncated = m["text"]["review"]["truncated"]
    assert set(truncated) == set(SPLITS) and 0 < truncated["train"] < m["splits"]["train"]["rows"]
    shown = render(describe(trained.etl.output))
    assert f"review text vocab={review['text']['vocab_size']} pad_id=0 truncated" in shown
    table = _shard_table(trained.etl.output)
    ids = _ids_by_key(table, "key", "review")
    assert ids[10**7] == ids[10**7 + 1] == [0] * MAX_LENGTH  # empty: keep → an empty sequence
    cut = sum(1 for row in ids.values() if row[-1] != 0)
    assert cut >= sum(truncated.values())  # every cut row is full; a full one may fit exactly
    bundle = trained.train.output
    copied = Path(bundle) / "features" / "text" / "review.json"
    features_dir = Path(ShardSet.open(trained.etl.output).features_model_uri)
    assert copied.read_bytes() == (features_dir / "text" / "review.json").read_bytes()
    _beats_majority(bundle, trained.etl.output, "make-data review + tabular, embedding bag")

    # scoring tokenizes with the bundle's tokenizer: the same ids as the ETL, row for row
    opened = scoring._open_bundle(bundle)
    raw = read_raw(spark, opened.etl, for_scoring=True)
    checked = validate_features(raw, opened.etl, keep=["id"], keep_prefix="_in_")
    featurized = scoring._featurized(spark, opened, checked).select("_in_id", "review")
    scored = {int(r["_in_id"]): list(r["review"]) for r in featurized.collect()}
    assert len(scored) == len(ids) + 1 and 10**7 + 2 not in ids  # + the quarantined row
    assert {k: v for k, v in scored.items() if k in ids} == ids

    result = scoring.score_table(spark, bundle, trained.etl.input.path, str(trained.tmp / "out"))
    assert result.rows == ROWS + 3 and result.errors == {"text_invalid": 1}


def test_per_batch_padding_cuts_only_padding(trained: Built) -> None:
    def batches(padding: Any) -> list[np.ndarray]:
        with ShardReader(
            trained.etl.output, "val", rank=0, world_size=1, batch_size=2, shuffle=False,
            text_padding=padding,
        ) as reader:  # fmt: skip
            return [b.inputs["review"].numpy() for b in reader]

    fixed, cut = batches("fixed"), batches("batch")
    assert len(fixed) == len(cut) > 1
    assert any(c.shape[1] < MAX_LENGTH for c in cut)
    for f, c in zip(fixed, cut, strict=True):
        length = c.shape[1]
        assert (
            f.shape[1] == MAX_LENGTH and (f[:, :length] == c).all() and (f[:, length:] == 0).all()
        )


def _provided_tokenizer(path: Path) -> int:
    """A word-level tokenizer.json over make-data's words, ``<pad>`` at id 1; its pad id."""
    filler, positive, negative = text_words()
    words = ["<unk>", "<pad>", *filler.tolist(), *positive.tolist(), *negative.tolist()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True)
    tok.save(str(path))
    return 1


HOSTILE = {  # id → (review as JSON text, expected reason)
    9001: ("null", "text_missing"),
    9002: ('""', "text_missing"),
    9003: ('" \\t  "', "text_missing"),
    9004: (json.dumps("word " * 200_000), "text_too_long"),  # 1 MB
    9005: (None, "malformed_record"),  # invalid UTF-8 bytes: Spark's JSON parser rejects them
    9006: (json.dumps("Привет мир 世界 مرحبا 👍🏽 café"), None),
    9007: ("12345", None),  # a number where text is expected: its digits are the text
}


def _hostile_corpus(path: Path, rows: int) -> None:
    rng = np.random.default_rng(11)
    filler, positive, negative = text_words()
    lines = []
    for i in range(rows):
        y = int(rng.integers(0, 2))
        words = list(rng.choice(filler, size=int(rng.integers(3, 10))))
        for _ in range(2):
            agrees = rng.random() < 0.85
            words.append(str(rng.choice(positive if (y == 1) == agrees else negative)))
        rng.shuffle(words)
        row = {"id": i, "title": f"t{i}", "review": " ".join(words), "label": y}
        lines.append(json.dumps(row).encode())
    for key, (text, _) in HOSTILE.items():
        review = b'"bad \xff\xfe bytes"' if text is None else text.encode()
        lines.append(b'{"id": %d, "title": "h%d", "review": %s, "label": 1}' % (key, key, review))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_provided_tokenizer_and_hostile_corpus(
    spark: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = 800
    _hostile_corpus(tmp_path / "raw" / "data.json", rows)
    pad = _provided_tokenizer(tmp_path / "tok" / "tokenizer.json")
    etl = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "raw"), "format": "json"},
            "schema": {"id": "long", "title": "string", "review": "string", "label": "int"},
            "key": "id",
            "label": "label",
            "categorical": ["title"],
            "texts": {
                "review": {
                    "tokenizer": str(tmp_path / "tok" / "tokenizer.json"),
                    "max_length": 16,
                    "empty": "quarantine",
                }
            },
            "classes": [0, 1],
            "output": str(tmp_path / "shards"),
            "num_shards": 2,
        }
    )
    with caplog.at_level(logging.WARNING, logger="preprocessing.etl"):
        result = run_etl(spark, etl)
    assert any(
        "'title'" in r.getMessage() and "etl.texts" in r.getMessage() for r in caplog.records
    )
    m = result.manifest
    expected = {r: 0 for _, r in HOSTILE.values() if r}
    for _, reason in HOSTILE.values():
        if reason:
            expected[reason] += 1
    assert m["quarantine"]["by_reason"] == dict(sorted(expected.items()))
    assert m["quarantine"]["by_column"] == {"review": sum(expected.values()) - 1}
    bad = sum(expected.values())
    total = rows + len(HOSTILE)
    assert m["reconciliation"] == {
        "rows_in": total,
        "rows_ok": total - bad,
        "rows_quarantined": bad,
    }
    (review,) = [e for e in m["schema"] if e["name"] == "review"]
    assert review["text"]["pad_id"] == pad
    ids = _ids_by_key(_shard_table(etl.output), "key", "review")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    for key, text in ((9006, json.loads(HOSTILE[9006][0])), (9007, "12345")):
        want = tok.encode(text).ids  # <unk> for the unknown scripts, emoji and digits
        assert 0 < len(want) < 16 and ids[key] == want + [pad] * (16 - len(want)), key

    tmp = tmp_path / "train"
    args = {"encoder": "transformer", "dim": 32, "layers": 1, "heads": 2, "hidden": [32]}
    cfg = _train_cfg(tmp, etl.output, args, epochs=12)
    fit(cfg, spark)
    _beats_majority(cfg.output, etl.output, "hostile corpus, provided tokenizer, transformer")

    scored = scoring.score_table(spark, cfg.output, str(tmp_path / "raw"), str(tmp_path / "scored"))
    assert scored.rows == total and scored.errors == dict(sorted(expected.items()))


def test_text_model_defaults_reach_tfidf_logistic_regression(
    spark: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The built-in ``text`` model, its args and the optimizer left at their defaults, is
    within 3 points of TF-IDF + logistic regression (scikit-learn) on the same splits.

    Measured over ``train.seed`` 0–3 (20 epochs): 0.893–0.899 against 0.904, 0.5–1.2 points
    below (seeds 4–7: 0.891–0.916; without the bag's token dropout, seeds 0–3: 0.867–0.883;
    the 0.1.0 defaults: 0.686). The bound leaves 1.7 points for another seed's order.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from pipeline.train.bundle import CONFIG
    from tests.texttask import write_text_task

    tmp = tmp_path_factory.mktemp("text-defaults")
    rows = write_text_task(tmp / "raw", docs=3000)
    etl = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp / "raw")},
            "schema": {"id": "long", "text": "string", "label": "int"},
            "key": "id",
            "label": "label",
            "texts": {"text": {"max_length": 48}},
            "split": {"val": 0.1, "test": 0.2},
            "output": str(tmp / "shards"),
            "num_shards": 2,
        }
    )
    run_etl(spark, etl)
    cfg = TrainConfig.from_mapping(
        {
            "dataset": etl.output,
            "model": {"builder": "pipeline.train.models:text"},
            "num_workers": 2,
            "epochs": 20,
            "batch_size": 32,
            "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0, "keep": 1},
            "output": str(tmp / "model"),
            "timeout_s": 300,
            "max_attempts": 1,
        }
    )
    assert cfg.optimizer.lr is None
    fit(cfg, spark)
    recorded = yaml.safe_load((tmp / "model" / CONFIG).read_text())["train"]
    assert recorded["optimizer"]["lr"] == 0.01  # the text model's recommended rate, recorded
    accuracy = evaluate_bundle(cfg.output, split="test")["accuracy"]

    ss = ShardSet.open(etl.output)
    keys = {
        s: [k for sh in ss.split(s).shards for k in pq.read_table(ss.shard_path(sh))["key"].to_pylist()]
        for s in ("train", "test")
    }  # fmt: skip
    text = {i: t for i, t, _ in rows}
    label = {i: y for i, _, y in rows}
    tfidf = TfidfVectorizer()
    x_train = tfidf.fit_transform([text[k] for k in keys["train"]])
    linear = LogisticRegression(max_iter=2000).fit(x_train, [label[k] for k in keys["train"]])
    predicted = linear.predict(tfidf.transform([text[k] for k in keys["test"]]))
    baseline = float(np.mean(predicted == np.array([label[k] for k in keys["test"]])))
    print(f"text defaults: test accuracy {accuracy:.3f}, TF-IDF + LR {baseline:.3f}")
    assert accuracy >= baseline - 0.03, (accuracy, baseline)
