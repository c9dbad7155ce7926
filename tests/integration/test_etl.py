"""The ETL on real Spark (local[2]) and real files."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data.shardset import ShardSet
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from tests import corpus
from tests.shards import tensor_values

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


def assert_consistent(uri: str) -> ShardSet:
    """Every shard matches its manifest entry; balance, types and row groups as promised."""
    ss = ShardSet.open(uri)
    m = ss.manifest
    rg = m["row_group_rows"]
    for split in ss.splits.values():
        ss.verify_shards(split.shards, mode="full")
        rows = [s.rows for s in split.shards]
        assert len(rows) == m["config"]["num_shards"]
        assert max(rows) - min(rows) <= 1, (split.name, rows)
        assert sum(rows) == split.rows
        for shard in split.shards:
            f = pq.ParquetFile(ss.shard_path(shard))
            assert f.metadata.num_rows == shard.rows
            assert f.schema_arrow.field("features").type == pa.binary(4 * ss.feature_dim)
            sizes = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
            assert all(s <= rg for s in sizes) and all(s == rg for s in sizes[:-1]), sizes
    rec = m["reconciliation"]
    assert rec["rows_in"] == rec["rows_ok"] + rec["rows_quarantined"]
    assert rec["rows_ok"] == sum(s.rows for s in ss.splits.values())
    assert rec["rows_quarantined"] == sum(m["quarantine"]["by_reason"].values())
    return ss


def _cfg(raw: Path, out: Path, **kw: Any) -> EtlConfig:
    return EtlConfig.from_mapping(corpus.etl_section(str(raw), str(out), **kw))


def _keys_by_split(ss: ShardSet) -> dict[str, set[int]]:
    return {
        name: {
            k
            for s in split.shards
            for k in pq.read_table(ss.shard_path(s), columns=["key"])["key"].to_pylist()
        }
        for name, split in ss.splits.items()
    }


def test_hostile_csv_reconciles_exactly(spark: Any, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "data.csv"
    expected = corpus.write_corpus(raw)
    result = run_etl(spark, _cfg(raw.parent, tmp_path / "out"))
    ss = assert_consistent(result.output)
    rec = ss.manifest["reconciliation"]
    assert rec == {
        "rows_in": expected["rows_in"],
        "rows_ok": expected["good"],
        "rows_quarantined": sum(expected["by_reason"].values()),
    }
    assert ss.manifest["quarantine"]["by_reason"] == dict(sorted(expected["by_reason"].items()))
    q = spark.read.parquet(str(tmp_path / "out" / ss.manifest["quarantine"]["path"]))
    rows = q.collect()
    assert len(rows) == rec["rows_quarantined"]
    assert all(r["reason"] for r in rows), "every quarantined row carries a reason"
    assert Counter(r["reason"] for r in rows) == Counter(expected["by_reason"])
    # the offending column is named, and the raw value is kept as read
    invalid = [r for r in rows if r["reason"] == "value_invalid"]
    assert {r["reason_column"] for r in invalid} == {"f0", "id"}
    assert any(r["f0"] == "abc" for r in invalid)
    assert all(r["source_file"].endswith("data.csv") for r in rows)


def test_missing_policy_quarantine(spark: Any, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "data.csv"
    corpus.write_corpus(raw, good=50, copies=1)
    result = run_etl(spark, _cfg(raw.parent, tmp_path / "out", missing="quarantine"))
    by_reason = result.manifest["quarantine"]["by_reason"]
    # 1e400 and -Infinity and NaN are not finite; the empty f0 is missing
    assert by_reason["value_not_finite"] == 3
    assert by_reason["value_missing"] == 1
    assert_consistent(result.output)


def test_shard_balance_for_awkward_sizes(spark: Any, tmp_path: Path) -> None:
    """Splits of K+1, 1 and K-1 rows (K=4 shards), then a run with empty val/test splits."""
    from preprocessing.shards import assign_split

    cfg = _cfg(tmp_path / "raw", tmp_path / "out")
    ids = spark.range(0, 2000).withColumnRenamed("id", "id")
    split_of = {r["id"]: r["_split"] for r in assign_split(ids, cfg).collect()}
    want = {"train": 5, "val": 1, "test": 3}
    chosen: list[int] = []
    for split, n in want.items():
        chosen += [i for i, s in sorted(split_of.items()) if s == split][:n]
    rng = random.Random(1)
    lines = [corpus.HEADER] + [corpus.good_line(i, rng) for i in chosen]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "d.csv").write_text("\n".join(lines) + "\n")
    ss = assert_consistent(run_etl(spark, cfg).output)
    assert {n: s.rows for n, s in ss.splits.items()} == want
    assert sorted(s.rows for s in ss.splits["train"].shards) == [1, 1, 1, 2]
    assert sorted(s.rows for s in ss.splits["val"].shards) == [0, 0, 0, 1]
    assert sorted(s.rows for s in ss.splits["test"].shards) == [0, 1, 1, 1]

    cfg2 = _cfg(tmp_path / "raw", tmp_path / "out2", split={"val": 0.0, "test": 0.0, "seed": 7})
    ss2 = assert_consistent(run_etl(spark, cfg2).output)
    assert (
        ss2.splits["train"].rows == 9
        and ss2.splits["val"].rows == 0
        and ss2.splits["test"].rows == 0
    )
    for shard in ss2.splits["val"].shards:
        assert pq.ParquetFile(ss2.shard_path(shard)).metadata.num_rows == 0


def test_split_is_deterministic_across_partitionings(spark: Any, tmp_path: Path) -> None:
    raw = tmp_path / "one" / "data.csv"
    corpus.write_corpus(raw, good=600, copies=1, seed=3)
    lines = raw.read_text().splitlines()
    many = tmp_path / "many"
    many.mkdir()
    body = lines[1:]
    for k in range(7):  # the same rows spread over 7 files: more input partitions
        (many / f"part-{k}.csv").write_text("\n".join([lines[0], *body[k::7]]) + "\n")
    a = assert_consistent(run_etl(spark, _cfg(raw.parent, tmp_path / "a")).output)
    b = assert_consistent(run_etl(spark, _cfg(many, tmp_path / "b", num_shards=3)).output)
    assert _keys_by_split(a) == _keys_by_split(b)
    assert a.manifest["reconciliation"] == b.manifest["reconciliation"]


def test_rerun_is_a_noop_force_rebuilds_and_changes_rebuild(spark: Any, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "data.csv"
    corpus.write_corpus(raw, good=80, copies=1)
    cfg = _cfg(raw.parent, tmp_path / "out")
    first = run_etl(spark, cfg)
    # every phase is timed; the manifest holds those up to the commit
    phases = ["read_header_fingerprint", "read_validate_count", "quarantine", "fit_features"]
    phases += ["save_features", "write_shards", "commit", "cleanup"]
    assert list(first.timings_s) == phases
    assert list(first.manifest["timings_s"]) == phases[:-2]
    assert sum(first.timings_s.values()) <= first.seconds + 0.01  # each rounded to 1 ms
    manifest_path = tmp_path / "out" / "manifest.json"
    before = (manifest_path.stat().st_mtime_ns, manifest_path.read_bytes())
    again = run_etl(spark, cfg)
    assert again.status == "up_to_date"
    assert "up to date" in again.summary()
    assert (manifest_path.stat().st_mtime_ns, manifest_path.read_bytes()) == before

    forced = run_etl(spark, cfg, force=True)
    assert forced.status == "built"
    assert forced.manifest["generation"] != first.manifest["generation"]
    old_gen = first.manifest["generation"]
    leftovers = [p for p in (tmp_path / "out").rglob("*") if old_gen in p.name]
    assert leftovers == [], "old generation removed after the new commit"
    assert_consistent(forced.output)

    with raw.open("a") as f:  # a changed input is rebuilt
        f.write("999999,0.1,0.2,paris,1\n")
    changed = run_etl(spark, cfg)
    assert changed.status == "built"
    assert (
        changed.manifest["reconciliation"]["rows_in"]
        == first.manifest["reconciliation"]["rows_in"] + 1
    )
    assert_consistent(changed.output)


def test_features_model_and_manifest_contents(spark: Any, tmp_path: Path) -> None:
    from pyspark.ml import PipelineModel

    raw = tmp_path / "raw" / "data.csv"
    corpus.write_corpus(raw, good=200, copies=1)
    result = run_etl(spark, _cfg(raw.parent, tmp_path / "out", onehot=["city"]))
    ss = assert_consistent(result.output)
    m = ss.manifest
    for key in (
        "format_version",
        "created_by",
        "config",
        "fingerprint",
        "schema",
        "splits",
        "quarantine",
        "reconciliation",
        "feature_stats",
    ):
        assert key in m
    assert m["label"] == {"column": "label", "task": "classification", "classes": [0, 1]}
    # one-hot city: every level seen in train + the unknown slot, after f0 and f1
    levels = m["feature_stats"]["categorical"]["city"]["levels"]
    assert levels >= 4
    assert ss.feature_dim == 2 + levels + 1 and m["feature_names"][:2] == ["f0", "f1"]
    assert m["feature_names"][-1] == "city=__unknown__"
    model = PipelineModel.load(ss.features_model_uri)
    assert [type(s).__name__ for s in model.stages] == ["StringIndexerModel", "SQLTransformer"]
    # standardized on train: the train features have mean ~0, std ~1 for numeric columns
    import numpy as np

    feats = np.concatenate(
        [
            tensor_values(
                pq.read_table(ss.shard_path(s))["features"], np.dtype(np.float32), (ss.feature_dim,)
            )
            for s in ss.splits["train"].shards
        ]
    )
    assert np.allclose(feats[:, :2].mean(axis=0), 0.0, atol=1e-4)
    assert np.allclose(feats[:, :2].std(axis=0, ddof=1), 1.0, atol=1e-3)
    assert (
        json.loads((tmp_path / "out" / "manifest.json").read_text())["generation"]
        == m["generation"]
    )


def test_json_and_parquet_inputs(spark: Any, tmp_path: Path) -> None:
    from preprocessing.read import SchemaMismatchError

    rows = [
        {"id": i, "f0": float(i % 7) / 7, "f1": 1.0, "city": "lyon", "label": i % 2}
        for i in range(60)
    ]
    rows += [{"id": 900, "f0": "oops", "f1": 1.0, "city": "lyon", "label": 1}]
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "d.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    res = run_etl(spark, _cfg(jdir, tmp_path / "jout", input={"path": str(jdir), "format": "json"}))
    assert res.manifest["quarantine"]["by_reason"] == {"malformed_record": 1, "value_invalid": 1}
    assert_consistent(res.output)

    pdir = tmp_path / "pq"
    spark.createDataFrame([r for r in rows if r["id"] != 900]).drop("f1").write.parquet(str(pdir))
    with pytest.raises(SchemaMismatchError, match=r"no column\(s\) \['f1'\]"):
        run_etl(
            spark, _cfg(pdir, tmp_path / "pout", input={"path": str(pdir), "format": "parquet"})
        )


def test_csv_columns_match_by_header_name(spark: Any, tmp_path: Path) -> None:
    from preprocessing.read import SchemaMismatchError

    raw = tmp_path / "raw" / "data.csv"
    corpus.write_corpus(raw, good=60, copies=0)
    lines = raw.read_text().splitlines()
    # reorder the file's columns: label first, city before the numbers
    order = [4, 3, 0, 1, 2]
    reordered = [",".join(ln.split(",")[i] for i in order) if ln else ln for ln in lines]
    raw.write_text("\n".join(reordered) + "\n")
    res = run_etl(spark, _cfg(raw.parent, tmp_path / "out"))
    assert res.manifest["reconciliation"]["rows_quarantined"] == 0
    assert res.manifest["reconciliation"]["rows_ok"] == 60

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "d.csv").write_text("id,f0,city,label\n1,0.5,lyon,1\n")
    with pytest.raises(SchemaMismatchError, match=r"no column\(s\) \['f1'\]"):
        run_etl(spark, _cfg(tmp_path / "bad", tmp_path / "out2"))


def test_replaced_temp_view_is_rebuilt(spark: Any, tmp_path: Path) -> None:
    """A view over in-memory rows has no files: it is fingerprinted by its content."""
    rng = random.Random(3)
    rows = [(i, rng.gauss(0, 1), rng.gauss(0, 1), "lyon", i % 2) for i in range(60)]
    schema = "id long, f0 double, f1 double, city string, label int"
    spark.createDataFrame(rows, schema).createOrReplaceTempView("etl_fp_view")
    cfg = _cfg(tmp_path, tmp_path / "out", input={"path": "etl_fp_view", "format": "table"})
    first = run_etl(spark, cfg)
    assert run_etl(spark, cfg).status == "up_to_date"
    # the same rows in another order and partitioning are the same input
    spark.createDataFrame(rows[::-1], schema).repartition(3).createOrReplaceTempView("etl_fp_view")
    assert run_etl(spark, cfg).status == "up_to_date"
    # new data, same row count and keys: rebuilt from the new rows
    shifted = [(i, f0 + 1.0, f1, city, label) for i, f0, f1, city, label in rows]
    spark.createDataFrame(shifted, schema).createOrReplaceTempView("etl_fp_view")
    changed = run_etl(spark, cfg)
    assert changed.status == "built"
    assert changed.manifest["fingerprint"]["input"] != first.manifest["fingerprint"]["input"]
    assert changed.manifest["reconciliation"]["rows_in"] == 60
    assert changed.manifest["feature_stats"] != first.manifest["feature_stats"]
    assert changed.manifest["fingerprint"]["input_kind"] == "content"


def test_reader_options_from_yaml_take_booleans_and_numbers(spark: Any, tmp_path: Path) -> None:
    """``multiLine: true`` from YAML works as PySpark's ``.option("multiLine", True)`` does."""
    from pipeline.core.configbase import ConfigError
    from preprocessing.read import CORRUPT, read_raw

    records = [{"id": i, "f0": i / 4, "f1": 1.0, "city": f"line {i}\nnext", "label": i % 2}
               for i in range(4)]  # fmt: skip
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "d.json").write_text(json.dumps(records, indent=2))  # one JSON array
    (tmp_path / "csv").mkdir()
    lines = [f'{r["id"]},{r["f0"]},1.0,"{r["city"]}",{r["label"]}' for r in records]
    (tmp_path / "csv" / "d.csv").write_text("\n".join([corpus.HEADER, *lines]) + "\n")
    for fmt, number in (("json", "samplingRatio"), ("csv", "maxColumns")):
        text = (
            f"{{path: {tmp_path / fmt}, format: {fmt}, options: {{multiLine: true, {number}: 64}}}}"
        )
        cfg = _cfg(tmp_path / fmt, tmp_path / "unused", input=yaml.safe_load(text))
        assert dict(cfg.input.options) == {"multiLine": "true", number: "64"}
        rows = read_raw(spark, cfg).df.orderBy("id").collect()
        assert [(int(r["id"]), r["city"], r[CORRUPT]) for r in rows] == [
            (i, f"line {i}\nnext", None) for i in range(4)
        ], fmt
    for bad in ([1, 2], {"a": 1}, None):
        with pytest.raises(ConfigError) as e:
            _cfg(
                tmp_path / "csv", tmp_path / "unused", input={"path": "x", "options": {"sep": bad}}
            )
        assert e.value.key == "etl.input.options.sep" and "string, boolean or number" in str(
            e.value
        )
