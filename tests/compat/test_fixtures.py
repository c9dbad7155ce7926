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
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core import compat

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").is_file())
MODELS = ("mlp", "cnn")
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
    """``spark-train train --resume`` with the release's config file, unchanged, in a copy of
    its directory: the run continues from the release's checkpoint for one more epoch."""
    from jobs.cli import main

    recorded = _record(release)
    work = tmp_path / release
    shutil.copytree(FIXTURES / release, work)
    monkeypatch.chdir(work)
    epochs = len(recorded["checkpoint"]["metrics"]["epochs"])
    # The config file is the release's, unchanged; its relative paths are given absolute
    # because the session's Spark workers do not run in this directory.
    where = [f"train.{k}={work / v}" for k, v in _paths(work / "mlp.yaml").items()]
    args = ["train", "--config", "mlp.yaml", "--resume", "--set", f"train.epochs={epochs + 1}"]
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        code = main([*args, *(a for w in where for a in ("--set", w))])
    assert code == 0
    metrics = json.loads((work / "mlp" / "metrics.json").read_text())
    step = int(recorded["checkpoint"]["dir"].removeprefix("step-"))
    assert metrics["resumed_from"] == step
    assert metrics["steps"] > step
    history = metrics["epochs"]
    assert len(history) == epochs + 1
    old = recorded["checkpoint"]["metrics"]["epochs"]
    for got, want in zip(history[:epochs], old, strict=True):  # restored, not retrained
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=TOL)
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=TOL)
    assert math.isfinite(history[-1]["train_loss"])
    builder = recorded["builders"]["mlp"]
    expected = 1 if builder.startswith("pipeline.models:") else 0  # one line per renamed key
    assert len([m for m in _deprecations(caplog) if "train.model.builder" in m]) == expected
    assert len(_deprecations(caplog)) == expected
