"""Damaged shard sets are refused before training; degenerate ones train or fail fast, clearly."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import main
from pipeline.core.configbase import to_dict
from pipeline.launch.launcher import run_distributed
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_worker
from pipeline.train.preflight import check_training_inputs
from tests import corpus
from tests.reliability.helpers import train_config_file, train_section
from tests.shards import make_shardset

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

REFUSE_WITHIN_S = 30.0  # generous for a loaded 2-core machine; typically well under 5 s


def _cli(capsys: Any, *argv: str, within_s: float | None = REFUSE_WITHIN_S) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr) after checking stderr is one line."""
    capsys.readouterr()
    started = time.monotonic()
    rc = main(list(argv))
    err = capsys.readouterr().err
    if within_s is not None:
        assert time.monotonic() - started < within_s
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return rc, err


def _shards(tmp: Path, **kw: Any) -> str:
    kw.setdefault("rows_per_shard", {"train": [40, 40], "val": [10]})
    return make_shardset(tmp / "set", **kw)


def _manifest(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "manifest.json").read_text())
    return data


def _rewrite_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = _manifest(root)
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _first_train_shard(root: Path) -> Path:
    return root / _manifest(root)["splits"]["train"]["shards"][1]["path"]


def _bit_flip(root: Path) -> str:
    shard = _first_train_shard(root)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard.name


def _truncate(root: Path) -> str:
    shard = _first_train_shard(root)
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _delete(root: Path) -> str:
    shard = _first_train_shard(root)
    shard.unlink()
    return shard.name


def _rows_differ(root: Path) -> str:
    """The manifest claims one more row in a shard (size and sha256 still match)."""

    def change(m: dict[str, Any]) -> None:
        m["splits"]["train"]["shards"][1]["rows"] += 1
        m["splits"]["train"]["rows"] += 1

    _rewrite_manifest(root, change)
    return _first_train_shard(root).name


def _split_total_differs(root: Path) -> str:
    def change(m: dict[str, Any]) -> None:
        m["splits"]["val"]["rows"] += 5

    _rewrite_manifest(root, change)
    return "manifest.json"


def _path_escapes(root: Path) -> str:
    def change(m: dict[str, Any]) -> None:
        m["splits"]["train"]["shards"][0]["path"] = "../../etc/passwd"

    _rewrite_manifest(root, change)
    return "manifest.json"


def _not_json(root: Path) -> str:
    (root / "manifest.json").write_text('{"format_version": 1, "splits": {')
    return "manifest.json"


def _no_manifest(root: Path) -> str:
    (root / "manifest.json").unlink()
    return "manifest.json"


DAMAGE: dict[str, tuple[Callable[[Path], str], str]] = {
    "bit_flip": (_bit_flip, "is corrupt: sha256"),
    "truncated": (_truncate, "bytes, the manifest says"),
    "missing_shard": (_delete, "is missing"),
    "manifest_rows_differ": (_rows_differ, "rows in its Parquet footer, the manifest says"),
    "manifest_split_total": (_split_total_differs, "add up to"),
    "manifest_path_escapes": (_path_escapes, "outside the shard set"),
    "manifest_not_json": (_not_json, "is not valid JSON"),
    "manifest_missing": (_no_manifest, "not a committed shard set"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_set_is_refused_before_training(
    spark: Any, tmp_path: Path, capsys: Any, damage: str
) -> None:
    root = Path(_shards(tmp_path))
    damage_fn, phrase = DAMAGE[damage]
    named = damage_fn(root)
    rc, err = _cli(capsys, "train", "--config", str(train_config_file(tmp_path, str(root))))
    assert rc == 1, err
    assert err.startswith("spark-train train: error: ")
    assert named in err and phrase in err, err
    # refused before any rank ran: no checkpoint, no bundle
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("damage", ["bit_flip", "missing_shard", "manifest_path_escapes"])
def test_the_torchrun_worker_runs_the_same_preflight(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """``python -m pipeline.worker`` refuses what ``spark-train train`` refuses, the same way:
    one line naming the file, exit 1 (2 for a config error), before any process group."""
    from pipeline import worker

    root = Path(_shards(tmp_path))
    damage_fn, phrase = DAMAGE[damage]
    named = damage_fn(root)
    monkeypatch.setenv("RANK", "0")
    config = str(train_config_file(tmp_path, str(root)))
    capsys.readouterr()
    assert worker.main(["--config", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert named in err and phrase in err, err
    assert worker.main(["--config", config, "--set", "train.num_workers=0"]) == 2
    assert "train.num_workers" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model").exists()


def test_fewer_rows_than_workers_times_batch_trains_equal_steps(spark: Any, tmp_path: Path) -> None:
    """5 train rows, 2 ranks × batch 64, empty val split: 2 rows per rank, 1 step per epoch."""
    dataset = _shards(tmp_path, rows_per_shard={"train": [3, 2, 0], "val": [0]})
    cfg = TrainConfig.from_mapping(train_section(tmp_path, dataset))
    check_training_inputs(cfg)
    summaries = run_distributed(
        train_worker, to_dict(cfg), num_workers=2, spark=spark, timeout_s=240
    )
    assert [s["steps"] for s in summaries] == [2, 2]  # equal on every rank: nobody waits
    untimed = [
        [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in s["epochs"]]
        for s in summaries
    ]
    assert untimed[0] == untimed[1]  # the same metrics on every rank
    assert summaries[0]["epochs"][-1]["val_loss"] is None  # no val rows: no val metrics
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_one_row_trains_on_one_worker_and_is_refused_for_two(
    spark: Any, tmp_path: Path, capsys: Any
) -> None:
    dataset = _shards(tmp_path, rows_per_shard={"train": [1]})
    rc, err = _cli(capsys, "train", "--config", str(train_config_file(tmp_path, dataset)))
    assert rc == 2 and "'train.num_workers'" in err and "only 1 row(s)" in err, err
    capsys.readouterr()
    assert (
        main(["train", "--config", str(train_config_file(tmp_path, dataset, num_workers=1))]) == 0
    )
    out = capsys.readouterr().out
    assert "trained 2 epoch(s), 2 steps on 1 workers" in out, out


@pytest.mark.parametrize(
    ("rows", "classes", "code", "phrase"),
    [
        ({"train": [0, 0], "val": [5]}, 2, 2, "has no rows"),
        ({"train": [30, 30]}, 1, 1, "classification needs at least 2"),
    ],
    ids=["empty_train_split", "single_class"],
)
def test_unusable_shard_set_fails_fast_with_one_line(
    spark: Any,
    tmp_path: Path,
    capsys: Any,
    rows: dict[str, list[int]],
    classes: int,
    code: int,
    phrase: str,
) -> None:
    dataset = _shards(tmp_path, rows_per_shard=rows, num_classes=classes)
    rc, err = _cli(capsys, "train", "--config", str(train_config_file(tmp_path, dataset)))
    assert rc == code and phrase in err and dataset in err, err


def test_all_rows_bad_etl_fails_with_one_line(spark: Any, tmp_path: Path, capsys: Any) -> None:
    raw = tmp_path / "raw" / "d.csv"
    raw.parent.mkdir()
    bad = [t.format(id=i) for i, (t, r) in enumerate(corpus.CASES.values()) if r is not None]
    raw.write_text("\n".join([corpus.HEADER, *bad]) + "\n")
    cfg = tmp_path / "etl.yaml"
    etl = corpus.etl_section(str(raw.parent), str(tmp_path / "out"))
    cfg.write_text(yaml.safe_dump({"spark": {"master": "local[2]"}, "etl": etl}))
    rc, err = _cli(capsys, "etl", "--config", str(cfg), within_s=None)
    assert rc == 1 and "no valid rows in the train split" in err, err
    assert f"quarantined={len(bad)}" in err and "quarantine/" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
