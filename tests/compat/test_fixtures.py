"""Artifacts built by earlier releases load, evaluate, score and resume with today's code.

Each ``fixtures/COMMIT/`` was built by that commit's own code (``build_fixtures.py``): a
make-data table, its shard set, an ``mlp`` and a ``cnn`` bundle, the ``mlp`` run's last
checkpoint and run summary, the two configs as that release documented them, and
``fixture.json`` with what the release measured: each bundle's metrics on the val and test
splits and its predictions on ``sample.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core import compat

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").is_file())
MODELS = ("mlp", "cnn")
# model -> the fixture.json entry of its run's last checkpoint (in ckpt/, ckpt-cnn/)
CHECKPOINTS = {"mlp": "checkpoint", "cnn": "checkpoint_cnn"}
CNN_CHECKPOINTS = [r for r in RELEASES if (FIXTURES / r / "ckpt-cnn").is_dir()]
TOL = 1e-5


def _record(release: str) -> dict[str, Any]:
    return json.loads((FIXTURES / release / "fixture.json").read_text())


def _deprecations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == compat.DEPRECATION_LOGGER]


def _paths(config: Path) -> dict[str, str]:
    """The relative paths of a fixture's ``train`` section: dataset, checkpoint.dir, output."""
    train = yaml.safe_load(config.read_text())["train"]
    return {
        "dataset": train["dataset"],
        "checkpoint.dir": train["checkpoint"]["dir"],
        "output": train["output"],
    }


@pytest.fixture(autouse=True)
def _fresh_deprecations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the deprecation lines its own loads log (they are once per process)."""
    monkeypatch.setattr(compat, "_said", set())


def test_fixtures_of_two_earlier_releases_at_least() -> None:
    assert {"668cac7", "2d5aabd"} <= set(RELEASES)
    assert "668cac7" in CNN_CHECKPOINTS  # a checkpoint of 0.1.0's cnn
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 3 * 2**20, f"the fixtures grew to {total} bytes"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("release", RELEASES)
def test_evaluate_gives_the_recorded_metrics(
    release: str, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline import evaluate

    root = FIXTURES / release
    recorded = _record(release)
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        for split in ("val", "test"):
            got = evaluate(str(root / model), str(root / "shards"), split)
            want = recorded["evaluate"][model][split]
            assert got["rows"] == want["rows"] > 0
            for key in ("loss", "accuracy"):
                assert math.isclose(got[key], want[key], rel_tol=TOL, abs_tol=TOL), (split, key)
    builder = recorded["builders"][model]
    if builder.startswith("pipeline.models:"):  # 0.1.0's spelling: one line, naming the new
        assert _deprecations(caplog) == [
            f"DEPRECATED builder (train.model.builder) {builder!r}: use "
            f"{builder.replace('pipeline.models:', 'pipeline.train.models:')!r} (the old "
            "spelling keeps working for at least two more minor releases; see the README's "
            "Compatibility section)"
        ]
    else:
        assert _deprecations(caplog) == []


@pytest.mark.parametrize("release", RELEASES)
def test_the_old_cnn_is_loaded_as_it_was_trained(release: str) -> None:
    """A cnn bundle without ``inputs`` (before the cnn changed) is built with ``cnn_v1``."""
    from torch import nn

    from pipeline import load_bundle

    bundle = load_bundle(str(FIXTURES / release / "cnn"))
    pooled = any(isinstance(m, nn.AdaptiveAvgPool1d) for m in bundle.model.modules())
    assert pooled == ("inputs" not in bundle.spec)


@pytest.mark.spark
@pytest.mark.parametrize("release", RELEASES)
def test_score_gives_the_recorded_predictions(spark: Any, release: str) -> None:
    from pipeline import score

    root = FIXTURES / release
    recorded = _record(release)
    sample = spark.read.csv(str(root / "sample.csv"), header=True)
    for model in MODELS:
        rows = score(spark, sample, str(root / model)).orderBy("id").collect()
        want = recorded["predictions"][model]
        assert [str(r["id"]) for r in rows] == [str(w["id"]) for w in want]
        for r, w in zip(rows, want, strict=True):
            assert r["prediction"] == w["prediction"], (model, w["id"])
            assert r["probability"] == pytest.approx(w["probability"], abs=TOL), (model, w["id"])


def _resume(release: str, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``spark-train train --resume`` with the release's ``MODEL.yaml``, unchanged, in a copy of
    its directory, for one more epoch; checks that the run continued from the release's
    checkpoint (the restored epochs' losses are the recorded ones). Returns the copy."""
    from jobs.cli import main

    recorded = _record(release)[CHECKPOINTS[model]]
    work = tmp_path / release
    shutil.copytree(FIXTURES / release, work)
    monkeypatch.chdir(work)
    epochs = len(recorded["metrics"]["epochs"])
    # The config file is the release's, unchanged; its relative paths are given absolute
    # because the session's Spark workers do not run in this directory.
    where = [f"train.{k}={work / v}" for k, v in _paths(work / f"{model}.yaml").items()]
    args = ["train", "--config", f"{model}.yaml", "--resume", "--set", f"train.epochs={epochs + 1}"]
    assert main([*args, *(a for w in where for a in ("--set", w))]) == 0
    metrics = json.loads((work / model / "metrics.json").read_text())
    step = int(recorded["dir"].removeprefix("step-"))
    assert metrics["resumed_from"] == step
    assert metrics["steps"] > step
    history = metrics["epochs"]
    assert len(history) == epochs + 1
    old = recorded["metrics"]["epochs"]
    for got, want in zip(history[:epochs], old, strict=True):  # restored, not retrained
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=TOL)
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=TOL)
    assert math.isfinite(history[-1]["train_loss"])
    return work


def _config(work: Path, model: str, *, absolute: bool = True, **changes: Any) -> Any:
    """The ``train`` section of ``work/MODEL.yaml`` as this release reads it (paths made
    absolute, as ``_resume`` passes them, or left relative to ``work``)."""
    from pipeline.train.config import TrainConfig

    train = yaml.safe_load((work / f"{model}.yaml").read_text())["train"]
    if absolute:
        paths = _paths(work / f"{model}.yaml")
        train |= {"dataset": str(work / paths["dataset"]), "output": str(work / paths["output"])}
        train["checkpoint"] = {**train["checkpoint"], "dir": str(work / paths["checkpoint.dir"])}
    return TrainConfig.from_mapping({**train, **changes})


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("model", MODELS)
def test_an_old_bundle_is_current_for_its_unchanged_config(
    release: str, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``spark-train run`` does not retrain a bundle of an earlier release for the config it
    was trained with: its recorded config is read with today's defaults and spellings."""
    from pipeline.launch.fit import bundle_is_current

    monkeypatch.chdir(FIXTURES / release)  # the release's config, paths as it wrote them
    assert bundle_is_current(_config(FIXTURES / release, model, absolute=False))
    assert not bundle_is_current(_config(FIXTURES / release, model, absolute=False, seed=12345))


def _renamed(builder: str) -> list[str]:
    """The deprecation line of a builder spelled as 0.1.0 did, or none."""
    if not builder.startswith("pipeline.models:"):
        return []
    new = builder.replace("pipeline.models:", "pipeline.train.models:")
    return [
        f"DEPRECATED builder (train.model.builder) {builder!r}: use {new!r} (the old spelling "
        "keeps working for at least two more minor releases; see the README's Compatibility "
        "section)"
    ]


@pytest.mark.spark
@pytest.mark.timeout(600)
@pytest.mark.parametrize("release", RELEASES)
def test_the_old_config_resumes_the_old_checkpoint(
    spark: Any,
    release: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ``mlp`` run's checkpoint continues for one more epoch with the release's config."""
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        _resume(release, "mlp", tmp_path, monkeypatch)
    assert _deprecations(caplog) == _renamed(_record(release)["builders"]["mlp"])


@pytest.mark.spark
@pytest.mark.timeout(600)
@pytest.mark.parametrize("release", CNN_CHECKPOINTS)
def test_the_old_cnn_config_resumes_the_old_cnn_checkpoint(
    spark: Any,
    release: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint of 0.1.0's ``cnn`` resumes with the release's config, unchanged: the run
    builds ``cnn_v1`` (the architecture it was trained as) and says so in one line; a
    checkpoint of today's ``cnn`` resumes as ``cnn``, without that line."""
    from torch import nn

    from pipeline import load_bundle

    old_cnn = "inputs" not in json.loads((FIXTURES / release / "cnn" / "model.json").read_text())
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        work = _resume(release, "cnn", tmp_path, monkeypatch)
    step_dir = work / "ckpt-cnn" / _record(release)[CHECKPOINTS["cnn"]]["dir"]
    mapped = [
        "train.model.builder 'pipeline.train.models:cnn': checkpoint "
        f"{step_dir} was written by spark-train 0.1.0 for the 0.1.0 cnn architecture; resuming "
        "it with 'pipeline.train.models:cnn_v1' (set train.model.builder to "
        "'pipeline.train.models:cnn_v1' to silence this)"
    ]
    builder = _record(release)["builders"]["cnn"]
    assert _deprecations(caplog) == _renamed(builder) + (mapped if old_cnn else [])
    bundle = load_bundle(str(work / "cnn"))
    assert bundle.spec["builder"].endswith(":cnn_v1" if old_cnn else ":cnn")
    pooled = any(isinstance(m, nn.AdaptiveAvgPool1d) for m in bundle.model.modules())
    assert pooled == old_cnn
    # The bundle recorded cnn_v1 for a config naming cnn: the same config is still current.
    from pipeline.launch.fit import bundle_is_current

    epochs = len(_record(release)[CHECKPOINTS["cnn"]]["metrics"]["epochs"]) + 1
    assert bundle_is_current(_config(work, "cnn", epochs=epochs))


@pytest.mark.timeout(300)
def test_torchrun_resumes_the_0_1_0_cnn_checkpoint_deciding_on_rank_0(tmp_path: Path) -> None:
    """Under ``torchrun -m pipeline.worker`` (no driver) rank 0 reads the checkpoint and every
    rank builds ``cnn_v1``; the release's config file runs unchanged."""
    release = "668cac7"
    recorded = _record(release)["checkpoint_cnn"]
    work = tmp_path / release
    shutil.copytree(FIXTURES / release, work)
    epochs = len(recorded["metrics"]["epochs"])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "pipeline.worker", "--config", "cnn.yaml",
        "--set", "train.resume=true", "--set", f"train.epochs={epochs + 1}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if compat.DEPRECATION_LOGGER in ln]
    assert len(lines) == 2, lines  # the builder's old spelling, the checkpoint's architecture
    assert "'pipeline.models:cnn': use 'pipeline.train.models:cnn'" in lines[0]
    assert lines[1].endswith(
        f"checkpoint ckpt-cnn/{recorded['dir']} was written by spark-train 0.1.0 for the 0.1.0 "
        "cnn architecture; resuming it with 'pipeline.train.models:cnn_v1' (set "
        "train.model.builder to 'pipeline.train.models:cnn_v1' to silence this)"
    )
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert summary["resumed_from"] == int(recorded["dir"].removeprefix("step-"))
    history = summary["epochs"]
    assert len(history) == epochs + 1
    for got, want in zip(history[:epochs], recorded["metrics"]["epochs"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=TOL)
    assert json.loads((work / "cnn" / "model.json").read_text())["builder"].endswith(":cnn_v1")
