"""Every user error of every subcommand is one line naming the key, path or row; --debug shows why."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import main
from pipeline.core.configbase import ConfigError
from pipeline.data.shardset import ShardSetError
from tests import corpus
from tests.reliability.helpers import bundle_for
from tests.shards import make_shardset

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

SPARK_TRAIN = Path(sys.executable).parent / "spark-train"


@dataclass
class Env:
    """Files the cases point at: a valid config, a shard set, and paths that do not exist."""

    tmp: Path
    config: Path
    dataset: str
    missing: Path

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def config_with(self, **sections: Any) -> Path:
        data = yaml.safe_load(self.config.read_text())
        data.update(sections)
        return self.write("other.yaml", yaml.safe_dump(data))


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    raw = tmp_path / "raw"
    corpus.write_corpus(raw / "d.csv", good=20, copies=0)
    dataset = make_shardset(tmp_path / "set", rows_per_shard={"train": [20, 20], "val": [8]})
    etl = corpus.etl_section(str(raw), str(tmp_path / "shards"))
    train = {
        "dataset": str(tmp_path / "shards"),
        "model": {"args": {"hidden": [8]}},
        "num_workers": 2,
        "epochs": 1,
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "output": str(tmp_path / "model"),
        "max_attempts": 1,
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"spark": {"master": "local[2]"}, "etl": etl, "train": train}))
    return Env(tmp_path, config, dataset, tmp_path / "does-not-exist")


Case = Callable[[Env], tuple[list[str], int, str]]
"""``env → (argv, exit code, text the error must contain)``."""

CASES: dict[str, Case] = {
    "no_command": lambda e: ([], 2, "COMMAND"),
    "unknown_command": lambda e: (["trian"], 2, "'trian'"),
    "make_data_rows_not_int": lambda e: (
        ["make-data", "--rows", "ten", "--output", str(e.missing)],
        2,
        "--rows",
    ),
    "make_data_rows_zero": lambda e: (
        ["make-data", "--rows", "0", "--output", str(e.missing)],
        2,
        "--rows",
    ),
    "make_data_no_output": lambda e: (["make-data", "--rows", "5"], 2, "--output"),
    "config_missing": lambda e: (["etl", "--config", str(e.missing)], 2, str(e.missing)),
    "config_not_yaml": lambda e: (
        ["etl", "--config", str(e.write("bad.yaml", "etl: [unclosed\n  x: {"))],
        2,
        "bad.yaml",
    ),
    "config_not_a_mapping": lambda e: (
        ["train", "--config", str(e.write("list.yaml", "- 1\n- 2\n"))],
        2,
        "list.yaml",
    ),
    "unknown_section": lambda e: (
        ["etl", "--config", str(e.config), "--set", "trian.x=1"],
        2,
        "trian",
    ),
    "set_without_value": lambda e: (
        ["etl", "--config", str(e.config), "--set", "etl.num_shards"],
        2,
        "etl.num_shards",
    ),
    "etl_bad_value": lambda e: (
        ["etl", "--config", str(e.config), "--set", "etl.num_shards=0"],
        2,
        "'etl.num_shards'",
    ),
    "etl_unknown_key": lambda e: (
        ["etl", "--config", str(e.config), "--set", "etl.shards=4"],
        2,
        "'etl.shards'",
    ),
    "etl_no_section": lambda e: (
        ["etl", "--config", str(e.write("t.yaml", "train: {epochs: 1}\n"))],
        2,
        "'etl'",
    ),
    "etl_input_missing": lambda e: (
        ["etl", "--config", str(e.config), "--set", f"etl.input.path={e.missing}"],
        2,
        "'etl.input.path'",
    ),
    "etl_csv_lacks_column": lambda e: (
        [
            "etl",
            "--config",
            str(e.config),
            "--set",
            f"etl.input.path={e.write('nof1.csv', 'id,f0,city,label' + chr(10) + '1,2.0,x,1' + chr(10))}",
        ],
        1,
        "['f1']",
    ),
    "train_dataset_missing": lambda e: (
        ["train", "--config", str(e.config), "--set", f"train.dataset={e.missing}"],
        1,
        str(e.missing),
    ),
    "train_bad_value": lambda e: (
        ["train", "--config", str(e.config), "--set", "train.epochs=zero"],
        2,
        "'train.epochs'",
    ),
    "train_too_many_workers": lambda e: (
        [
            "train",
            "--config",
            str(e.config),
            "--set",
            f"train.dataset={e.dataset}",
            "--set",
            "train.num_workers=41",
        ],
        2,
        "'train.num_workers'",
    ),
    "train_fewer_slots_than_min": lambda e: (  # elastic: waits wait_s, then a runtime error
        [
            "train",
            "--config",
            str(e.config),
            "--set",
            f"train.dataset={e.dataset}",
            "--set",
            "train.num_workers={min: 3, max: 4, wait_s: 1}",
        ],
        1,
        "needs at least 4 ranks (the world sizes it allows: 4), but the cluster has 2 barrier",
    ),
    "evaluate_no_model": lambda e: (
        ["evaluate", "--config", str(e.write("s.yaml", "spark: {master: 'local[2]'}\n"))],
        2,
        "--model",
    ),
    "evaluate_model_missing": lambda e: (
        ["evaluate", "--model", str(e.missing)],
        2,
        str(e.missing),
    ),
    "evaluate_bad_split": lambda e: (["evaluate", "--split", "dev"], 2, "--split"),
    "score_no_input": lambda e: (["score", "--output", str(e.missing)], 2, "--input"),
    "run_dataset_mismatch": lambda e: (
        ["run", "--config", str(e.config), "--set", f"train.dataset={e.dataset}"],
        2,
        "'train.dataset'",
    ),
    "demo_bad_override": lambda e: (["demo", "--set", "train.epochs=zero"], 2, "'train.epochs'"),
    "inspect_missing": lambda e: (["inspect", str(e.missing)], 1, str(e.missing)),
    "inspect_not_ours": lambda e: (["inspect", str(e.tmp / "raw")], 1, str(e.tmp / "raw")),
    "inspect_manifest_not_json": lambda e: (
        ["inspect", str(e.write("manifest.json", "{").parent)],
        1,
        "manifest.json",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line(spark: Any, env: Env, capsys: Any, name: str) -> None:
    argv, code, named = CASES[name](env)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spark-train") and ": error: " in lines[0], err
    assert named in lines[0], err


def test_debug_raises_the_original_error(spark: Any, env: Env) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        main(["train", "--config", str(env.config), "--set", "train.epochs=zero", "--debug"])
    with pytest.raises(ShardSetError, match="not a committed shard set"):
        main(
            [
                "train",
                "--config",
                str(env.config),
                "--set",
                f"train.dataset={env.missing}",
                "--debug",
            ]
        )


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) ")


def test_real_process_shows_a_traceback_only_with_debug(
    env: Env, subprocess_env: dict[str, str]
) -> None:
    """The console script: one error line (besides log records), a traceback with --debug."""
    shard = next((Path(env.dataset) / "val").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    bundle = bundle_for(env.dataset, env.tmp / "bundle")
    argv = [str(SPARK_TRAIN), "evaluate", "--model", str(bundle), "--dataset", env.dataset]
    argv += ["--split", "val"]
    plain = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert plain.returncode == 1, plain.stderr
    assert "Traceback" not in plain.stderr
    others = [ln for ln in plain.stderr.splitlines() if not _LOG_LINE.match(ln)]
    assert len(others) == 1 and others[0].startswith("spark-train evaluate: error: "), others
    assert shard.name in others[0] and "bytes, the manifest says" in others[0]
    debug = subprocess.run(
        [*argv, "--debug"], capture_output=True, text=True, env=subprocess_env, timeout=120
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
