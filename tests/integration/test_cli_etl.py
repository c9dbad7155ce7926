"""The spark-train CLI (make-data, etl, inspect): exit codes, --set overrides, messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import main
from tests import corpus

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


def _write_config(path: Path, etl: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"spark": {"master": "local[2]"}, "etl": etl}))
    return path


def test_etl_with_set_overrides_and_inspect(spark: Any, tmp_path: Path, capsys: Any) -> None:
    raw = tmp_path / "raw" / "data.csv"
    corpus.write_corpus(raw, good=120, copies=1)
    cfg = _write_config(
        tmp_path / "c.yaml", corpus.etl_section(str(raw.parent), str(tmp_path / "out"))
    )
    rc = main(
        ["etl", "--config", str(cfg), "--set", "etl.num_shards=3", "--set", "etl.split.val=0.2"],
        under_submit=False,
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "rows_in=" in out and "rows_quarantined=" in out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["num_shards"] == 3 and m["config"]["split"]["val"] == 0.2
    assert all(len(s["shards"]) == 3 for s in m["splits"].values())

    assert (
        main(
            ["etl", "--config", str(cfg), "--set", "etl.num_shards=3", "--set", "etl.split.val=0.2"]
        )
        == 0
    )
    assert "up to date" in capsys.readouterr().out

    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "shardset" and d["splits"]["train"]["skew"] <= 1
    assert d["reconciliation"]["rows_in"] == m["reconciliation"]["rows_in"]
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "reconciliation: rows_in=" in text and "quarantined" in text


def test_unknown_key_exits_2_naming_it(tmp_path: Path, capsys: Any) -> None:
    etl = corpus.etl_section("x", str(tmp_path / "out"))
    etl["shards_per_split"] = 4
    cfg = _write_config(tmp_path / "c.yaml", etl)
    assert main(["etl", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "etl.shards_per_split" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("etl.num_shards=0", "etl.num_shards"),
        ("etl.num_shards=four", "etl.num_shards"),
        ("etl.split.val=0.95", "etl.split"),
        ("etl.numeric=[nope]", "etl.numeric"),
        ("etl.missing=drop", "etl.missing"),
        ("train2.x=1", "train2"),
    ],
)
def test_bad_values_exit_2_naming_the_key(
    tmp_path: Path, capsys: Any, override: str, key: str
) -> None:
    cfg = _write_config(tmp_path / "c.yaml", corpus.etl_section("x", str(tmp_path / "out")))
    assert main(["etl", "--config", str(cfg), "--set", override]) == 2
    assert f"'{key}" in capsys.readouterr().err


def test_missing_input_names_the_path(spark: Any, tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "does-not-exist"
    cfg = _write_config(
        tmp_path / "c.yaml", corpus.etl_section(str(missing), str(tmp_path / "out"))
    )
    assert main(["etl", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "etl.input.path" in err and str(missing) in err


def test_missing_table_and_glob_name_the_key(spark: Any, tmp_path: Path, capsys: Any) -> None:
    """A ``table`` input naming no table, a glob matching no file: exit 2 naming the key."""
    out = str(tmp_path / "out")
    table = {"input": {"path": "no_such_table_xyz", "format": "table"}}
    cfg = _write_config(tmp_path / "t.yaml", corpus.etl_section("x", out, **table))
    assert main(["etl", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'etl.input.path'" in err and "no_such_table_xyz" in err and len(err.splitlines()) == 1
    (tmp_path / "in").mkdir()
    glob = tmp_path / "in" / "nothing-*.csv"
    cfg = _write_config(tmp_path / "g.yaml", corpus.etl_section(str(glob), out))
    assert main(["etl", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'etl.input.path'" in err and str(glob) in err


def test_missing_config_file_and_inspect_errors(tmp_path: Path, capsys: Any) -> None:
    assert main(["etl", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert "neither a shard set" in capsys.readouterr().err


def test_make_data_is_deterministic_and_dirty(spark: Any, tmp_path: Path, capsys: Any) -> None:
    from preprocessing.make_data import COLUMNS

    for name in ("a", "b"):
        assert (
            main(["make-data", "--rows", "3000", "--output", str(tmp_path / name), "--seed", "5"])
            == 0
        )
    files = sorted((tmp_path / "a").glob("part-*"))
    assert files and [f.read_bytes() for f in files] == [
        f.read_bytes() for f in sorted((tmp_path / "b").glob("part-*"))
    ]
    lines = [ln for f in files for ln in f.read_text().splitlines()]
    assert lines[0] == ",".join(COLUMNS)
    body = [ln for ln in lines if ln != lines[0]]
    assert len(body) == 3000
    bad = [
        ln
        for ln in body
        if ln.count(",") != len(COLUMNS) - 1
        or "n/a" in ln
        or ",," in ln
        or "NaN" in ln
        or "inf" in ln.lower()
        or "1e308" in ln
        or ln.startswith(",")
        or ln.endswith(",")
        or ln.endswith(",2")
        or ln.endswith(",0.5")
    ]
    assert 0.004 < len(bad) / len(body) < 0.02
    assert main(["make-data", "--rows", "0", "--output", str(tmp_path / "c")]) == 2


def test_demo_defaults_to_the_packaged_config(capsys: Any) -> None:
    from jobs.cli import DEMO_CONFIG
    from pipeline.config import load_config

    cfg = load_config(DEMO_CONFIG)
    assert cfg.etl.output == cfg.train.dataset  # the demo's stages chain
    # without --config, demo validates the packaged file (here: rejects a bad override)
    assert main(["demo", "--set", "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err
