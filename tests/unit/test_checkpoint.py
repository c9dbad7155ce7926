from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core import storage
from pipeline.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)


def draw() -> tuple[torch.Tensor, float, float, float, float]:
    return (
        torch.rand(4),
        float(np.random.rand()),
        float(np.random.randn()),
        random.random(),
        random.gauss(0, 1),
    )


def training_state(step: int) -> dict[str, object]:
    torch.manual_seed(step)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "epoch": 1,
        "step": step,
        "reader": {"epoch": 1, "batches_in_epoch": 7, "world_size": 2, "batch_size": 8, "seed": 0},
        "history": [{"epoch": 0, "val_loss": 0.5, "val_accuracy": None}],
        "extra": (torch.float16, torch.device("cpu"), torch.Size([2, 3]), b"raw", OrderedDict(a=1)),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_rng(tmp_path: Path) -> None:
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = {**training_state(5), "rng": capture_rng_state()}
    expected = draw()
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    path = mgr.save(5, state)
    assert path == str(tmp_path / "ckpt" / "step-000000000005")
    assert sorted(os.listdir(path)) == ["meta.json", "state.pt"]
    meta = json.loads((Path(path) / "meta.json").read_text())
    assert (
        meta["step"] == 5
        and meta["files"]["state.pt"]["bytes"] == (Path(path) / "state.pt").stat().st_size
    )
    torch.manual_seed(123)  # disturb every stream
    np.random.seed(1)
    random.seed(2)
    loaded = mgr.load()
    assert loaded is not None
    assert_same(state, loaded)
    restore_rng_state(loaded["rng"])
    assert_same(draw(), expected)


def test_rng_state_is_weights_only_loadable(tmp_path: Path) -> None:
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))


def test_latest_by_listing_and_keep(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path), keep=2)
    assert mgr.latest_step() is None and mgr.load() is None
    for step in (10, 30, 20):  # listing order, not save order, decides
        mgr.save(step, {"step": step})
    assert mgr.latest_step() == 30
    assert sorted(os.listdir(tmp_path)) == ["step-000000000020", "step-000000000030"]
    assert mgr.load()["step"] == 30  # type: ignore[index]
    assert mgr.load(20)["step"] == 20  # type: ignore[index]
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 10"):
        mgr.load(10)
    mgr.save(30, {"step": 31})  # saving a step again replaces it
    assert mgr.load(30)["step"] == 31  # type: ignore[index]
    assert sorted(os.listdir(tmp_path)) == ["step-000000000020", "step-000000000030"]


def test_half_written_checkpoints_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"step": 1})
    # A crash inside save(): the temporary directory is all there is.
    tmp = tmp_path / f"{storage.TMP_PREFIX}0123abcd-step-000000000002"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"\x00" * 10)
    # An object-store write interrupted before its meta.json marker.
    (tmp_path / "step-000000000003").mkdir()
    (tmp_path / "step-000000000003" / "state.pt").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert mgr.latest_step() == 1
        assert mgr.load() == {"step": 1}
    assert "unfinished checkpoint write" in caplog.text and "step-000000000003" in caplog.text


def test_crash_during_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"step": 1})

    def crash(*a: object, **k: object) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        mgr.save(2, {"step": 2})
    assert os.listdir(tmp_path) == ["step-000000000001"]
    assert mgr.load() == {"step": 1}


def test_corrupt_newest_falls_back_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"w": torch.ones(100)})
    mgr.save(2, {"w": torch.full((100,), 2.0)})
    state_file = tmp_path / "step-000000000002" / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[-200] ^= 0xFF  # same size: only the sha256 tells
    state_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert mgr.latest_step() == 1  # what a launcher broadcasts to every rank
        loaded = mgr.load()
    assert loaded is not None and torch.equal(loaded["w"], torch.ones(100))
    assert "step-000000000002 is corrupt" in caplog.text
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256"):
        mgr.load(2)
    # A truncated newest one is not even complete.
    state_file.write_bytes(bytes(data[:50]))
    assert mgr.latest_step() == 1
    # The next save of step 2 replaces the corrupt directory.
    mgr.save(2, {"w": torch.zeros(1)})
    assert mgr.latest_step() == 2


class Bomb:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(1, {"ok": True})
    # A checkpoint whose state.pt unpickles an object, with a consistent meta.json.
    path = tmp_path / "ckpt" / "step-000000000002"
    path.mkdir()
    torch.save({"x": Bomb()}, path / "state.pt")
    digest, size = storage.sha256_file(mgr.fs, str(path / "state.pt"))
    meta = {
        "format_version": 1,
        "step": 2,
        "files": {"state.pt": {"bytes": size, "sha256": digest}},
    }
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"step-000000000002/state.pt needs objects .* refusing"
    ):
        mgr.load()
    (path / "state.pt").write_bytes(pickle.dumps(Bomb()))  # a plain pickle, not torch's zip
    digest, size = storage.sha256_file(mgr.fs, str(path / "state.pt"))
    meta["files"] = {"state.pt": {"bytes": size, "sha256": digest}}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        mgr.load(2)
    assert not (tmp_path / "PWNED").exists()


def test_save_refuses_what_weights_only_cannot_load(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(ValueError, match=r"state\['opt'\]\['m'\] is a numpy.ndarray"):
        mgr.save(1, {"opt": {"m": np.zeros(2)}})
    with pytest.raises(ValueError, match=r"state\['x'\]\[0\] is a .*Bomb"):
        mgr.save(1, {"x": [Bomb()]})
    assert mgr.latest_step() is None and os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        CheckpointManager(str(tmp_path), keep=0)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        CheckpointManager(str(tmp_path)).save(-1, {})


def test_file_uri(tmp_path: Path) -> None:
    mgr = CheckpointManager(f"file://{tmp_path}/c")
    assert mgr.save(3, {"a": 1}) == f"file://{tmp_path}/c/step-000000000003"
    assert mgr.load() == {"a": 1}
