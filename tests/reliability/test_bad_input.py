"""Bad input to the ETL on real Spark and real files: every row accounted for, none crashes it."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.shardset import ShardSet
from preprocessing.config import EtlConfig
from preprocessing.etl import EtlError, run_etl
from preprocessing.read import SchemaMismatchError, read_raw
from tests import corpus
from tests.reliability import hostile

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


def _cfg(raw: Path, out: Path, **kw: Any) -> EtlConfig:
    return EtlConfig.from_mapping(corpus.etl_section(str(raw), str(out), **kw))


@contextmanager
def _max_partition_bytes(spark: Any, value: int | None) -> Iterator[None]:
    key = "spark.sql.files.maxPartitionBytes"
    old = spark.conf.get(key, None)
    if value is not None:
        spark.conf.set(key, str(value))
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)


def _outcome(spark: Any, ss: ShardSet) -> tuple[dict[int, str], Counter[tuple[Any, ...]]]:
    """Every good key → its split, and every quarantined row as (raw id, reason, column, record)."""
    ok = {
        k: name
        for name, split in ss.splits.items()
        for s in split.shards
        for k in pq.read_table(ss.shard_path(s), columns=["key"])["key"].to_pylist()
    }
    q = spark.read.parquet(f"{ss.uri}/{ss.manifest['quarantine']['path']}")
    bad = Counter(
        (r["id"], r["reason"], r["reason_column"], r["raw_record"])
        for r in q.select("id", "reason", "reason_column", "raw_record").collect()
    )
    return ok, bad


@pytest.mark.slow
def test_hostile_csv_same_outcome_on_1_and_8_partitions(spark: Any, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "data.csv"
    exp = hostile.write_hostile(raw)
    assert exp.kinds >= 15
    results = {}
    for parts, limit in ((1, None), (8, math.ceil(raw.stat().st_size / 8))):
        cfg = _cfg(raw.parent, tmp_path / f"out{parts}", num_shards=2)
        with _max_partition_bytes(spark, limit):
            assert read_raw(spark, cfg).df.rdd.getNumPartitions() == parts
            result = run_etl(spark, cfg)
        ss = ShardSet.open(result.output)
        rec = ss.manifest["reconciliation"]
        # rows_in counts rows, not lines: the blank / whitespace-only lines are not rows
        assert rec == {
            "rows_in": exp.rows_in,
            "rows_ok": len(exp.good_ids),
            "rows_quarantined": exp.rows_in - len(exp.good_ids),
        }, (parts, rec, exp.not_rows)
        assert ss.manifest["quarantine"]["by_reason"] == dict(sorted(exp.by_reason.items()))
        ok, bad = _outcome(spark, ss)
        assert set(ok) == exp.good_ids
        assert sum(bad.values()) == rec["rows_quarantined"]
        assert all(reason for _, reason, _, _ in bad), "every quarantined row carries a reason"
        by_id = {rid: reason for rid, reason, _, _ in bad if rid in exp.reason_by_id}
        assert by_id == exp.reason_by_id
        results[parts] = (ok, bad)
    assert results[1] == results[8], "the same rows, the same outcome, on 1 and 8 partitions"
    # the BOM does not leak into the first column; U+FFFD and NUL stay in strings as read
    df = read_raw(spark, _cfg(raw.parent, tmp_path / "unused")).df
    assert df.columns[0] == "id"
    assert df.filter(df.city == "ly\ufffdon").count() == 2
    assert df.filter(df.city == "ni\x00ce").count() == 2


def _parquet(path: Path, columns: dict[str, pa.Array | list[Any]]) -> Path:
    path.mkdir(parents=True)
    pq.write_table(pa.table(columns), path / "part-0.parquet")
    return path


def _base(n: int) -> dict[str, list[Any]]:
    return {
        "id": list(range(n)),
        "f0": [i / 7 for i in range(n)],
        "f1": [1.0 + i % 3 for i in range(n)],
        "city": ["lyon", "nice"] * (n // 2),
        "label": [i % 2 for i in range(n)],
    }


def test_parquet_schema_policy(spark: Any, tmp_path: Path) -> None:
    """Missing column / uncastable type: an error naming it. Castable: cast value by value,
    lossy values quarantined. Extra columns: ignored."""
    n = 40
    missing = _parquet(tmp_path / "missing", {k: v for k, v in _base(n).items() if k != "f1"})
    fmt = {"format": "parquet"}
    with pytest.raises(SchemaMismatchError, match=r"no column\(s\) \['f1'\]"):
        run_etl(spark, _cfg(missing, tmp_path / "o1", input={"path": str(missing), **fmt}))
    nested = _parquet(tmp_path / "nested", {**_base(n), "f0": [{"x": 1.0}] * n})
    with pytest.raises(SchemaMismatchError, match=r"'f0' is stored as struct<x:double>.*double"):
        run_etl(spark, _cfg(nested, tmp_path / "o2", input={"path": str(nested), **fmt}))

    base = _base(n)
    cast = _parquet(
        tmp_path / "cast",
        {
            **base,
            "id": [float(i) + (0.5 if i == 3 else 0.0) for i in range(n)],  # 3.5: no integer key
            "f0": [str(v) if i != 5 else "five" for i, v in enumerate(base["f0"])],
            "city": list(range(n)),  # ints for a string column: cast to text
            "label": [0.5 if i == 7 else float(i % 2) for i in range(n)],  # 0.5: no class
            "extra": ["ignored"] * n,
        },
    )
    result = run_etl(spark, _cfg(cast, tmp_path / "o3", input={"path": str(cast), **fmt}))
    m = result.manifest
    assert m["quarantine"]["by_reason"] == {"label_invalid": 1, "value_invalid": 2}
    assert m["quarantine"]["by_column"] == {"f0": 1, "id": 1, "label": 1}
    assert m["reconciliation"]["rows_ok"] == n - 3
    assert m["feature_stats"]["categorical"]["city"]["levels"] > 2  # the ints became levels


def test_json_schema_policy(spark: Any, tmp_path: Path) -> None:
    """JSON is per record: a missing field is a null value, a wrong-typed one is quarantined,
    extra keys are ignored; a column absent from every record is an error naming it."""
    n = 40
    rows: list[dict[str, Any]] = [
        {"id": i, "f0": i / 7, "f1": 2.0, "city": "lyon", "label": i % 2, "extra": [1]}
        for i in range(n)
    ]
    rows[1]["f0"] = [1, 2]  # array for a number → value_invalid
    rows[2]["f1"] = {"a": 1}  # object for a number → value_invalid
    rows[3]["label"] = 1.5  # → label_invalid
    rows[4]["city"] = {"x": 1}  # an object for a string column is kept as its JSON text
    del rows[5]["label"]  # → label_missing
    del rows[6]["f1"]  # a missing number is imputed (missing: impute)
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "d.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    options = {"path": str(jdir), "format": "json", "options": {"secret_token": "hunter2"}}
    result = run_etl(spark, _cfg(jdir, tmp_path / "o1", input=options))
    m = result.manifest
    assert m["quarantine"]["by_reason"] == {
        "label_invalid": 1,
        "label_missing": 1,
        "value_invalid": 2,
    }
    assert m["reconciliation"] == {"rows_in": n, "rows_ok": n - 4, "rows_quarantined": 4}
    # credentials in the config do not reach the manifest (it is copied into bundles)
    assert "hunter2" not in (tmp_path / "o1" / "manifest.json").read_text()

    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "d.json").write_text(
        "\n".join(json.dumps({k: v for k, v in r.items() if k != "f1"}) for r in rows) + "\n"
    )
    with pytest.raises(EtlError, match=r"numeric column\(s\) \['f1'\].*no finite value"):
        run_etl(spark, _cfg(absent, tmp_path / "o2", input={"path": str(absent), "format": "json"}))
