"""Batch scoring: make-data → ETL → a short DDP run → score, through the API, the CLI and spark-submit.

The reference for every prediction is the bundle's network run in this process on the
feature vectors the ETL wrote into the shard set: scoring must featurize raw rows exactly as
the ETL did (no training/serving skew), and flag exactly the rows the ETL quarantined for a
feature reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline import score
from pipeline.data.shardset import SPLITS, ShardSet
from pipeline.launch.fit import fit
from pipeline.serve.score import OUTPUT_COLUMNS, cached_bundle, score_table
from pipeline.train.bundle import BundleError, load_bundle, read_spec, write_bundle
from pipeline.train.config import TrainConfig
from pipeline.train.models import mlp
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from preprocessing.make_data import COLUMNS, demo_etl_section, make_data
from preprocessing.read import SchemaMismatchError
from preprocessing.read.reasons import REASONS
from tests.conftest import spark_submit
from tests.shards import tensor_values

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]

ROWS = 3000
# Quarantine reasons that concern features: scoring flags these rows. The others (key and
# label checks) do not apply to scoring input, so those rows get a prediction.
FEATURE_REASONS = {r.code for r in REASONS if r.scored}


@dataclass(frozen=True)
class Built:
    raw: str
    shards: str
    bundle: str


@pytest.fixture(scope="module")
def built(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("score")
    raw, shards, bundle = str(root / "raw"), str(root / "shards"), str(root / "model")
    make_data(spark, ROWS, raw, seed=11, dirty_fraction=0.05)
    etl = demo_etl_section(raw, shards)
    etl["num_shards"] = 2
    run_etl(spark, EtlConfig.from_mapping(etl))
    train = {
        "dataset": shards,
        "model": {"args": {"hidden": [16]}},
        "num_workers": 2,
        "epochs": 1,
        "batch_size": 256,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "checkpoint": {"dir": str(root / "ckpt"), "every_steps": 100},
        "output": bundle,
        "timeout_s": 120,
        "max_attempts": 1,
    }
    fit(TrainConfig.from_mapping(train), spark)
    return Built(raw, shards, bundle)


def _reference(built: Built) -> tuple[np.ndarray, np.ndarray]:
    """Keys and in-process class probabilities for every row the ETL wrote into the shard set."""
    ss = ShardSet.open(built.shards)
    tables = [
        pq.read_table(ss.shard_path(sh), filesystem=ss.fs)
        for s in SPLITS
        for sh in ss.split(s).shards
    ]
    table = pa.concat_tables(tables)
    keys = table.column("key").to_numpy()
    feats = tensor_values(table.column("features"), np.dtype(np.float32), (ss.feature_dim,))
    with torch.inference_mode():
        probs = torch.softmax(load_bundle(built.bundle).model(torch.from_numpy(feats)), dim=1)
    return keys, probs.numpy()


def _quarantine(built: Built) -> dict[str, Any]:
    m = json.loads((Path(built.shards) / "manifest.json").read_text())
    q = pq.read_table(Path(built.shards) / m["quarantine"]["path"]).to_pandas()
    return {"manifest": m, "rows": q}


def test_scores_equal_the_model_on_the_etl_features(
    spark: Any, built: Built, tmp_path: Path
) -> None:
    out = tmp_path / "scored"
    res = score_table(spark, built.bundle, built.raw, str(out))
    df = pq.read_table(out).to_pandas()
    assert list(df.columns) == [*COLUMNS, *OUTPUT_COLUMNS]

    # every record the ETL counted is in the output, scored or flagged
    q = _quarantine(built)
    assert len(df) == res.rows == q["manifest"]["reconciliation"]["rows_in"]
    by_reason = q["manifest"]["quarantine"]["by_reason"]
    assert res.errors == {r: n for r, n in by_reason.items() if r in FEATURE_REASONS}
    assert set(res.errors) >= {"malformed_record", "value_invalid", "value_out_of_range"}
    assert 1 <= res.model_loads <= 2  # local[2]: at most one load per Python worker

    # the ETL's good rows: same probabilities as the network on the shard set's features
    keys, probs = _reference(built)
    good = df[df["score_error"].isna()].copy()
    good = good[good["id"].notna()]
    good.index = good["id"].astype(np.int64)
    assert len(keys) == q["manifest"]["reconciliation"]["rows_ok"] and set(keys) <= set(good.index)
    got = np.stack(good.loc[keys, "probability"].to_numpy()).astype(np.float32)
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-5)
    classes = np.array(read_spec(built.bundle)["classes"])
    assert (good.loc[keys, "prediction"].to_numpy() == classes[probs.argmax(axis=1)]).all()
    assert str(pq.read_table(out).schema.field("prediction").type) == "int32"  # label: int

    # the ETL's quarantine: same reason and column for feature reasons, a prediction otherwise
    rows = q["rows"]
    flagged = rows[rows["reason"].isin(FEATURE_REASONS) & rows["id"].notna()]
    scored = df[df["id"].notna()].set_index("id")
    for _, r in flagged.iterrows():
        s = scored.loc[r["id"]]
        assert s["score_error"] == r["reason"] and s["score_error_column"] == r["reason_column"]
        assert s["prediction"] is None or np.isnan(s["prediction"])
        assert s["probability"] is None
    label_only = rows[rows["reason"].str.startswith("label_")]
    assert len(label_only) > 0
    assert scored.loc[label_only["id"], "score_error"].isna().all()
    assert scored.loc[label_only["id"], "probability"].notna().all()


def _good_rows(spark: Any, built: Built, n: int = 8) -> Any:
    """``n`` raw rows the ETL accepted, as strings (the way a CSV arrives), without the label."""
    ok_keys = [int(k) for k in _reference(built)[0][:n]]
    raw = spark.read.option("header", "true").csv(built.raw)
    return raw.filter(raw["id"].isin(ok_keys)).drop("label").orderBy("id")


def test_bad_rows_get_a_reason_and_good_rows_are_unaffected(spark: Any, built: Built) -> None:
    from pyspark.sql import functions as F

    good = _good_rows(spark, built).withColumn("note", F.lit("keep me"))
    # three more rows: copies of good ones under new ids, each then spoilt in one value
    bad = good.limit(3).withColumn("id", (F.col("id") + F.lit(100_000)).cast("string"))
    ids = sorted(r["id"] for r in bad.collect())
    spoiled = {
        ids[0]: ("f3", "abc", "value_invalid"),
        ids[1]: ("f5", "1e308", "value_out_of_range"),
        ids[2]: ("c0", None, None),  # a null category is not an error: it maps to "unknown"
    }
    for i, (col, value, _) in spoiled.items():
        bad = bad.withColumn(
            col, F.when(F.col("id") == F.lit(i), F.lit(value)).otherwise(F.col(col))
        )
    header = spark.createDataFrame([tuple(good.columns)], good.schema)  # a header line as data
    mixed = good.unionByName(bad).unionByName(header)

    alone = {r["id"]: r for r in score(spark, good, built.bundle).collect()}
    scored = score(spark, mixed, built.bundle)
    assert scored.columns == [*mixed.columns, *OUTPUT_COLUMNS]
    together = {r["id"]: r for r in scored.collect()}
    assert set(together) == set(alone) | set(ids) | {"id"}
    assert together["id"]["score_error"] == "repeated_header"
    assert together["id"]["prediction"] is None
    for i, r in alone.items():
        assert r["score_error"] is None and r["note"] == "keep me"
        assert together[i]["prediction"] == r["prediction"]
        np.testing.assert_allclose(together[i]["probability"], r["probability"], atol=1e-6)
    for i, (col, value, reason) in spoiled.items():
        r = together[i]
        assert r[col] == value  # the input value comes back as it was
        assert r["score_error"] == reason
        if reason is None:
            assert r["prediction"] in (0, 1) and len(r["probability"]) == 2
        else:
            assert r["prediction"] is None and r["probability"] is None
            assert r["score_error_column"] == col

    # typed input (doubles instead of strings) is featurized the same way
    typed = good.select(
        *[F.col(c).cast("double") if c.startswith("f") else F.col(c) for c in good.columns]
    )
    for r in score(spark, typed, built.bundle).collect():
        np.testing.assert_allclose(r["probability"], alone[r["id"]]["probability"], atol=1e-6)

    with pytest.raises(SchemaMismatchError, match=r"no column\(s\) \['f3'\]"):
        score(spark, good.drop("f3"), built.bundle)
    with pytest.raises(ValueError, match="prediction"):
        score(spark, good.withColumn("prediction", F.lit(1)), built.bundle)


def test_model_is_loaded_once_per_python_worker(spark: Any, built: Built, tmp_path: Path) -> None:
    bundle = str(tmp_path / "model")  # a URI no worker has cached yet
    shutil.copytree(built.bundle, bundle)
    df = _good_rows(spark, built, n=400).repartition(6)
    loads = spark.sparkContext.accumulator(0)
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    spark.conf.set(key, "25")  # ~67 rows per task: 3 Arrow batches each
    try:
        for _ in range(2):
            scored = score(spark, df, bundle, load_counter=loads)
            # (a filter on the output also guards against the optimizer blow-up that
            # pipeline.serve.score._constraint_barrier prevents: without it this never finishes)
            assert scored.filter(scored["prediction"].isNotNull()).count() == 400
    finally:
        spark.conf.unset(key)
    # 2 runs x 6 tasks x 3 batches on local[2]: one load per reused Python worker at most
    assert df.rdd.getNumPartitions() == 6 and 1 <= loads.value <= 2, loads.value


def test_cache_is_keyed_by_uri_and_weights(built: Built, tmp_path: Path) -> None:
    from pipeline.core.storage import resolve, sha256_file

    class Counter:
        n = 0

        def add(self, term: int) -> None:
            self.n += term

    copy = tmp_path / "model"
    shutil.copytree(built.bundle, copy)
    sha, _ = sha256_file(*resolve(str(copy / "model.safetensors")))
    counter = Counter()
    first = cached_bundle(str(copy), sha, counter)
    assert cached_bundle(str(copy), sha, counter) is first and counter.n == 1

    spec = read_spec(str(copy))
    model = load_bundle(str(copy)).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    write_bundle(str(copy), model=model, spec=spec, metrics={}, config={})
    with pytest.raises(BundleError, match="changed"):
        cached_bundle(str(copy), "0" * 64, counter)
    new_sha, _ = sha256_file(*resolve(str(copy / "model.safetensors")))
    second = cached_bundle(str(copy), new_sha, counter)
    assert second is not first and counter.n == 2
    x = torch.randn(3, int(spec["input_shape"][0]))
    assert not torch.equal(first.model(x), second.model(x))


def test_regression_bundle_predicts_the_value(spark: Any, built: Built, tmp_path: Path) -> None:
    spec = read_spec(built.bundle)
    dim = int(spec["input_shape"][0])
    spec = {**spec, "task": "regression", "num_outputs": 1, "classes": [], "args": {"hidden": [8]}}
    torch.manual_seed(0)
    net = mlp(input_shape=(dim,), num_outputs=1, hidden=[8]).eval()
    uri = str(tmp_path / "reg")
    write_bundle(
        uri, model=net, spec=spec, metrics={}, config={}, features_uri=f"{built.bundle}/features"
    )
    rows = score(spark, _good_rows(spark, built), uri).collect()
    assert "probability" not in rows[0].__fields__
    keys, _ = _reference(built)
    ss = ShardSet.open(built.shards)
    table = pa.concat_tables(
        [pq.read_table(ss.shard_path(sh)) for s in SPLITS for sh in ss.split(s).shards]
    )
    values = tensor_values(table.column("features"), np.dtype(np.float32), (ss.feature_dim,))
    feats = dict(zip(keys.tolist(), values.tolist(), strict=True))
    x = torch.tensor([feats[int(r["id"])] for r in rows])
    with torch.inference_mode():
        want = net(x).reshape(-1).numpy()
    got = np.array([r["prediction"] for r in rows])
    assert isinstance(rows[0]["prediction"], float)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_cli_score_formats_and_errors(
    spark: Any, built: Built, tmp_path: Path, capsys: Any
) -> None:
    def cli(*argv: str) -> tuple[int, str, str]:
        rc = main(["score", "--model", built.bundle, *argv])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err.strip()

    out = tmp_path / "scored"
    pq_in = tmp_path / "in-parquet"
    _good_rows(spark, built).write.parquet(str(pq_in))  # no label column
    rc, text, _ = cli("--input", str(pq_in), "--output", str(out), "--format", "parquet")
    assert rc == 0 and "scored 8 rows" in text and "8 predicted" in text
    assert "model loaded" in text
    first = pq.read_table(out).sort_by("id")
    assert first.num_rows == 8 and "label" not in first.column_names

    def same_scores(table: pa.Table) -> None:
        assert table.num_rows == 8 and table.column("score_error").null_count == 8
        np.testing.assert_allclose(
            np.stack(table.sort_by("id").column("probability").to_numpy(zero_copy_only=False)),
            np.stack(first.column("probability").to_numpy(zero_copy_only=False)),
            atol=1e-6,
        )

    js_in = tmp_path / "in-json"
    _good_rows(spark, built).write.json(str(js_in))
    argv = ("--input", str(js_in), "--output", f"file://{out}", "--format", "json")
    assert cli(*argv, "--batch-size", "3")[0] == 0  # replaces the previous output
    same_scores(pq.read_table(out))
    _good_rows(spark, built).createOrReplaceTempView("to_score")
    assert cli("--input", "to_score", "--output", str(tmp_path / "t"), "--format", "table")[0] == 0
    same_scores(pq.read_table(tmp_path / "t"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    rc, _, err = cli("--input", built.raw, "--output", str(out), "--model", str(tmp_path / "no"))
    assert rc == 2 and "'--model'" in err and str(tmp_path / "no") in err
    assert len(err.splitlines()) == 1
    rc, _, err = cli("--input", str(tmp_path / "none"), "--output", str(out))
    assert rc == 2 and "'--input'" in err and str(tmp_path / "none") in err
    rc, _, err = cli("--input", "no_such_view", "--output", str(out), "--format", "table")
    assert rc == 2 and "'--input'" in err and "no_such_view" in err
    rc, _, err = cli("--input", str(pq_in), "--output", str(pq_in))
    assert rc == 2 and "'--output'" in err
    no_f3 = tmp_path / "no-f3"
    _good_rows(spark, built).drop("f3").write.option("header", "true").csv(str(no_f3))
    rc, _, err = cli("--input", str(no_f3), "--output", str(out))
    assert rc == 1 and "['f3']" in err and str(no_f3) in err
    assert pq.read_table(out).num_rows == 8  # a failed run leaves the previous output whole


def test_bundle_without_etl_section_or_features(spark: Any, built: Built, tmp_path: Path) -> None:
    old = tmp_path / "old"  # as written before model.json recorded the etl section
    shutil.copytree(built.bundle, old)
    spec = json.loads((old / "model.json").read_text())
    del spec["etl"]
    (old / "model.json").write_text(json.dumps(spec))
    rows = score(spark, _good_rows(spark, built), str(old)).collect()  # etl from the manifest
    assert len(rows) == 8 and all(r["score_error"] is None for r in rows)

    spec["shardset"]["uri"] = str(tmp_path / "gone")
    (old / "model.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="no etl section"):
        score(spark, _good_rows(spark, built), str(old))
    shutil.rmtree(old / "features")
    with pytest.raises(BundleError, match="has no features/"):
        score(spark, _good_rows(spark, built), str(old))


@pytest.mark.slow
def test_spark_submit_scores_the_raw_table(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "scored"
    proc = spark_submit(
        "local[2]",
        "score",
        "--model",
        built.bundle,
        "--input",
        built.raw,
        "--output",
        str(out),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((Path(built.shards) / "manifest.json").read_text())
    rows_in = m["reconciliation"]["rows_in"]
    assert f"scored {rows_in} rows" in proc.stdout
    assert pq.read_table(out).num_rows == rows_in
