"""Security: no unpickling, no YAML objects, no writes outside outputs, no strays, no secrets."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from jobs.cli import main
from pipeline.core import storage
from pipeline.data.shardset import ShardSet
from pipeline.launch.launcher import run_distributed
from pipeline.runtime import distenv, logchannel
from pipeline.train.checkpoint import CheckpointError, CheckpointManager
from tests import corpus
from tests.reliability.helpers import bundle_for, train_config_file
from tests.shards import make_shardset

pytestmark = [pytest.mark.timeout(300)]


class _Bomb:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _one_line(capsys: Any) -> str:
    err: str = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _plant_checkpoint_bomb(ckpt: Path, step: int, marker: Path) -> Path:
    """A checkpoint whose files match its meta.json, so only the unpickling stands in the way."""
    directory = ckpt / f"step-{step:012d}"
    directory.mkdir(parents=True)
    state = directory / "state.pt"
    torch.save({"model": _Bomb(marker), "step": step}, state)
    digest, size = storage.sha256_file(storage.resolve(str(state))[0], str(state))
    meta = {
        "format_version": 1,
        "step": step,
        "keys": ["model", "step"],
        "files": {"state.pt": {"bytes": size, "sha256": digest}},
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return state


def _train_config(tmp: Path, dataset: str, **over: Any) -> Path:
    return train_config_file(tmp, dataset, epochs=1, batch_size=32, **over)


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    return make_shardset(tmp_path / "set", rows_per_shard={"train": [40, 40], "val": [16]})


# -- pickle ---------------------------------------------------------------------------------
def test_checkpoint_pickle_bomb_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _plant_checkpoint_bomb(tmp_path / "ckpt", 7, marker)
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    assert manager.latest_step() == 7  # intact files: only weights_only stops it
    for step in (7, None):
        with pytest.raises(
            CheckpointError, match=r"state\.pt needs objects .* refusing to unpickle"
        ):
            manager.load(step)
    assert not marker.exists()


@pytest.mark.spark
def test_resume_from_a_pickle_bomb_fails_without_running_it(
    spark: Any, tmp_path: Path, dataset: str, capsys: Any
) -> None:
    marker = tmp_path / "marker"
    state = _plant_checkpoint_bomb(tmp_path / "ckpt", 7, marker)
    cfg = _train_config(tmp_path, dataset)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--resume"]) == 1
    err = _one_line(capsys)
    assert "refusing to unpickle" in err and str(state) in err, err
    assert not marker.exists(), "a rank unpickled the checkpoint"
    assert not (tmp_path / "model").exists()


def test_bundle_loads_safetensors_only(tmp_path: Path, dataset: str, capsys: Any) -> None:
    marker = tmp_path / "marker"
    bundle = bundle_for(dataset, tmp_path / "bundle")
    torch.save({"w": _Bomb(marker)}, bundle / "model.pt")  # a pickle beside the weights
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--dataset", dataset, "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] > 0
    torch.save({"w": _Bomb(marker)}, bundle / "model.safetensors")  # a pickle as the weights
    assert main(["evaluate", "--model", str(bundle), "--dataset", dataset]) == 1
    err = _one_line(capsys)
    assert "model.safetensors is not a safetensors file" in err, err
    assert not marker.exists()


# -- YAML -------------------------------------------------------------------------------------
def test_yaml_python_tags_are_refused(tmp_path: Path, capsys: Any) -> None:
    marker = tmp_path / "marker"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"spark: {{master: 'local[2]'}}\ntrain: {payload}\n")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--config", str(cfg)]) == 2
    err = _one_line(capsys)
    assert "'--config'" in err and str(cfg) in err and "python/object/apply" in err, err
    assert main(["inspect", str(tmp_path), "--set", f"train.epochs={payload}"]) == 2
    err = _one_line(capsys)
    assert "'train.epochs'" in err and "python/object/apply" in err, err
    assert not marker.exists()


# -- output paths ---------------------------------------------------------------------------
def _precious(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    keep = directory / "precious.txt"
    keep.write_text("do not delete")
    return keep


def _etl_config(tmp: Path, raw: Path, output: str) -> Path:
    path = tmp / "etl.yaml"
    etl = corpus.etl_section(str(raw), output)
    path.write_text(yaml.safe_dump({"spark": {"master": "local[2]"}, "etl": etl}))
    return path


@pytest.mark.spark
@pytest.mark.parametrize(
    "case",
    [
        "etl_output_dotdot",
        "etl_output_symlink",
        "etl_output_foreign_dir",
        "etl_output_inside_input",
        "train_output_dotdot",
        "checkpoint_dir_dotdot",
        "train_output_foreign_dir",
        "train_output_is_dataset",
        "checkpoint_dir_holds_symlink",
        "score_output_foreign_dir",
    ],
)
def test_outputs_stay_where_configured(
    spark: Any, tmp_path: Path, dataset: str, capsys: Any, case: str
) -> None:
    """Each is refused (exit 2, one line naming the key) before any file is touched."""
    raw = tmp_path / "raw"
    corpus.write_corpus(raw / "d.csv", good=20, copies=0)
    elsewhere = tmp_path / "elsewhere"
    keep = _precious(elsewhere)
    if case.startswith("etl"):
        key = "etl.output"
        output = {
            "etl_output_dotdot": f"{tmp_path}/a/../out",
            "etl_output_symlink": str(tmp_path / "link"),
            "etl_output_foreign_dir": str(elsewhere),
            "etl_output_inside_input": str(raw / "shards"),
        }[case]
        if case == "etl_output_symlink":
            (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
        argv = ["etl", "--config", str(_etl_config(tmp_path, raw, output))]
    elif case.startswith("score"):
        key = "--output"
        bundle = bundle_for(dataset, tmp_path / "bundle")
        argv = ["score", "--model", str(bundle), "--input", str(raw), "--output", str(elsewhere)]
    else:
        key = "train.checkpoint.dir" if case.startswith("checkpoint") else "train.output"
        overrides: dict[str, dict[str, Any]] = {
            "train_output_dotdot": {"output": f"{tmp_path}/x/../model"},
            "checkpoint_dir_dotdot": {"checkpoint": {"dir": f"{tmp_path}/x/../ckpt"}},
            "train_output_foreign_dir": {"output": str(elsewhere)},
            "train_output_is_dataset": {"output": dataset},
            "checkpoint_dir_holds_symlink": {"checkpoint": {"dir": str(tmp_path / "ckpt")}},
        }
        over = overrides[case]
        if case == "checkpoint_dir_holds_symlink":
            (tmp_path / "ckpt").mkdir()
            (tmp_path / "ckpt" / "step-000000000001").symlink_to(elsewhere)
        argv = ["train", "--config", str(_train_config(tmp_path, dataset, **over))]
    before = sorted(p.name for p in elsewhere.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line(capsys)
    assert f"'{key}'" in err, err
    assert keep.read_text() == "do not delete"
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert ShardSet.open(dataset).splits["train"].rows == 80


# -- the run token ----------------------------------------------------------------------------
_STRAY = r"""
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
sock = socket.create_connection((host, int(port)), timeout=20)
messages = [
    {"token": "0" * 32, "rank": 0},
    {"t": "rendezvous", "part": json.dumps({"host": "10.6.6.6", "gpus": [], "port": 6666})},
    {"t": "log", "msg": "INJECTED-BY-STRAY", "level": 40},
    {"t": "failure", "type": "RuntimeError", "message": "INJECTED-BY-STRAY", "tail": []},
]
try:
    for msg in messages:
        sock.sendall((json.dumps(msg) + "\n").encode())
    data = sock.recv(65536)
except (BrokenPipeError, ConnectionResetError):
    data = b""  # the driver already hung up
print("closed" if data == b"" else "answered: " + data.decode(errors="replace"))
"""


def _rank_with_stray() -> str:
    """A rank's target: rank 0 runs a stray process against the driver's channel first."""
    rank = int(os.environ["RANK"])
    outcome = ""
    if rank == 0:
        address = os.environ[distenv.LOG_ADDR]
        proc = subprocess.run(
            [sys.executable, "-c", _STRAY, address],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outcome = proc.stdout.strip()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    try:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)  # the real ranks still form their group
        return f"{outcome}|{t.item():g}"
    finally:
        dist.destroy_process_group()


@pytest.mark.spark
def test_a_stray_process_cannot_join_the_run(spark: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    results = run_distributed(_rank_with_stray, num_workers=2, spark=spark, timeout_s=240)
    assert results == ["closed|3", "|3"], results
    assert "rejected a connection without the run token" in caplog.text
    assert "INJECTED-BY-STRAY" not in caplog.text


def test_a_silent_connection_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logchannel, "_HELLO_TIMEOUT_S", 0.5)
    got: list[tuple[int, dict[str, Any]]] = []
    with logchannel.ChannelServer("127.0.0.1", "t" * 32, lambda r, m: got.append((r, m))) as srv:
        host, port = srv.address.rsplit(":", 1)
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            assert silent.recv(1) == b""  # the server hung up on it
        assert time.monotonic() - started < 5
        client = logchannel.ChannelClient(srv.address, "t" * 32, rank=1)
        client.send({"t": "log", "msg": "real"})
        client.close()
        assert srv.wait_finished(ranks=1, timeout_s=10)
    assert got == [(1, {"t": "log", "msg": "real"})]


# -- secrets in logs -------------------------------------------------------------------------
def test_effective_config_log_redacts_credentials(
    tmp_path: Path, dataset: str, capsys: Any, caplog: Any
) -> None:
    secrets = ["AKIAFAKEKEY", "S3cr3tValue", "hunter2", "kspw", "tok-123"]
    data = {
        "spark": {
            "master": "local[2]",
            "conf": {
                "spark.sql.shuffle.partitions": "8",
                "spark.hadoop.fs.s3a.access.key": secrets[0],
                "spark.hadoop.fs.s3a.secret.key": secrets[1],
                "spark.ssl.keyStorePassword": secrets[3],
                "spark.hadoop.fs.azure.sas.token": secrets[4],
            },
        },
        "etl": corpus.etl_section(f"s3a://reader:{secrets[2]}@bucket/raw", str(tmp_path / "out")),
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    caplog.set_level(logging.INFO)
    assert main(["inspect", dataset, "--config", str(cfg)]) == 0
    logged = [r.getMessage() for r in caplog.records if "effective config" in r.getMessage()]
    assert len(logged) == 1
    line = logged[0]
    assert '"spark.sql.shuffle.partitions": "8"' in line and '"key": "id"' in line
    assert "s3a://reader:***@bucket/raw" in line and line.count('"***"') == 4
    out = capsys.readouterr()
    for secret in secrets:
        assert secret not in caplog.text + out.out + out.err, secret


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("../out", True),  # run from a subdirectory: names a place
        ("./../../shared/out", True),
        ("out/model", True),
        ("/data/a/../out", False),  # climbs out of a directory it named
        ("x/../../y", False),
        ("s3a://bucket/../other", False),
        ("file:///srv/a/../b", False),
    ],
)
def test_only_climbing_dotdot_is_refused(uri: str, allowed: bool) -> None:
    from pipeline.core.configbase import ConfigError
    from pipeline.core.outputs import check_output_uri

    if allowed:
        check_output_uri("train.output", uri)
    else:
        with pytest.raises(ConfigError, match=r"train\.output.*climbs out"):
            check_output_uri("train.output", uri)
