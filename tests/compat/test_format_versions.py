"""format_version on every artifact: older ones are read, a newer one is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import pipeline
from jobs.cli import main
from jobs.runsummary import SUMMARY_FORMAT_VERSION, SummaryTooNew, read_summary
from pipeline.core import compat, version
from pipeline.data.shardset import FORMAT_VERSION, ShardSet, ShardSetError, ShardSetTooNew
from pipeline.train.bundle import BUNDLE_FORMAT_VERSION, BundleError, BundleTooNew, load_bundle
from pipeline.train.checkpoint import FORMAT_VERSION as CKPT_VERSION
from pipeline.train.checkpoint import CheckpointError, CheckpointManager, CheckpointTooNew

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "2d5aabd"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    """A writable copy of one release's artifacts."""
    work = tmp_path / "art"
    shutil.copytree(FIXTURE, work, ignore=shutil.ignore_patterns("raw"))
    return work


def _bump(path: Path, version: int, **fields: Any) -> None:
    doc = json.loads(path.read_text())
    doc.update(format_version=version, **fields)
    path.write_text(json.dumps(doc))


def _newer(where: Path | str, writer: str, found: int, supported: int) -> str:
    return (
        f"{where}: written by spark-train {writer} (format_version {found}); this is "
        f"spark-train {pipeline.__version__} which reads up to {supported}: upgrade"
    )


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1, err
    return err[0]


def test_the_version_is_the_installed_distributions_and_pyproject_s() -> None:
    pyproject = version._from_pyproject(REPO / "pyproject.toml")
    assert pipeline.__version__ == metadata.version("spark-train") == pyproject == "0.2.0"
    assert version.version_tuple("0.2.0rc1") == (0, 2, 0)


def test_without_installed_metadata_the_checkout_s_pyproject_gives_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert version._version() == version._from_pyproject(REPO / "pyproject.toml")
    monkeypatch.setattr(version, "_PYPROJECT", REPO / "no-such-pyproject.toml")
    assert version._version() == "0+unknown"


def test_every_version_up_to_the_readers_is_read_and_a_newer_one_is_refused() -> None:
    kw: dict[str, Any] = {"where": "x.json", "writer": "9.0.0"}
    kw.update(newer=ShardSetTooNew, invalid=ShardSetError)
    assert [compat.check_format_version(v, 3, **kw) for v in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(ShardSetTooNew, match=r"reads up to 3: upgrade$"):
        compat.check_format_version(4, 3, **kw)
    for bad in (None, "1", 0, True):
        with pytest.raises(ShardSetError) as e:
            compat.check_format_version(bad, 3, **kw)
        assert not isinstance(e.value, compat.NewerFormatError)


def test_a_newer_shard_set_is_one_line_and_exit_2(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = artifacts / "shards"
    assert ShardSet.open(str(shards)).format_version == 1  # an old one is read
    _bump(
        shards / "manifest.json", FORMAT_VERSION + 1, created_by="spark-train 9.1.0 (pyspark 4.1.0)"
    )
    with pytest.raises(ShardSetTooNew) as e:
        ShardSet.open(str(shards))
    assert str(e.value) == _newer(
        shards / "manifest.json", "9.1.0", FORMAT_VERSION + 1, FORMAT_VERSION
    )
    assert main(["inspect", str(shards)]) == 2
    assert _one_error_line(capsys) == f"spark-train inspect: error: {e.value}"


def test_a_newer_bundle_is_one_line_and_exit_2(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, shards = artifacts / "mlp", artifacts / "shards"
    _bump(bundle / "model.json", BUNDLE_FORMAT_VERSION + 1, spark_train="9.1.0")
    with pytest.raises(BundleTooNew) as e:
        load_bundle(str(bundle))
    assert isinstance(e.value, BundleError)  # existing handlers still catch it
    assert str(e.value) == _newer(
        bundle / "model.json", "9.1.0", BUNDLE_FORMAT_VERSION + 1, BUNDLE_FORMAT_VERSION
    )
    args = ["evaluate", "--model", str(bundle), "--dataset", str(shards)]
    assert main(args) == 2
    assert _one_error_line(capsys) == f"spark-train evaluate: error: {e.value}"


def test_a_malformed_bundle_version_is_a_runtime_error_exit_1(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = artifacts / "mlp"
    _bump(bundle / "model.json", "one")  # type: ignore[arg-type]
    assert main(["evaluate", "--model", str(bundle), "--dataset", str(artifacts / "shards")]) == 1
    assert "format_version 'one' is not a format spark-train wrote" in _one_error_line(capsys)


def test_a_newer_checkpoint_is_never_passed_over(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = artifacts / "ckpt"
    manager = CheckpointManager(str(ckpt))
    step = manager.latest_step()
    assert step is not None and manager.load(step) is not None  # an old one is read
    (meta,) = ckpt.glob("step-*/meta.json")
    _bump(meta, CKPT_VERSION + 1, spark_train="9.1.0")
    with pytest.raises(CheckpointTooNew) as e:
        manager.latest_step()  # not skipped as "corrupt": that would restart training
    assert isinstance(e.value, CheckpointError)
    assert str(e.value) == _newer(meta, "9.1.0", CKPT_VERSION + 1, CKPT_VERSION)
    assert main(["inspect", str(ckpt)]) == 2
    assert _one_error_line(capsys) == f"spark-train inspect: error: {e.value}"
    # Training finds it on the driver, before any rank starts, whatever the model and
    # whether or not it resumes (a fresh run still looks for an unfinished one).
    from pipeline.train.config import TrainConfig
    from pipeline.train.preflight import resolve_checkpoint_model

    cfg = TrainConfig.from_mapping({
        "dataset": str(artifacts / "shards"), "checkpoint": {"dir": str(ckpt)},
        "model": {"builder": "pipeline.train.models:mlp"}, "output": str(artifacts / "out"),
    })  # fmt: skip
    with pytest.raises(CheckpointTooNew):
        resolve_checkpoint_model(cfg, ShardSet.open(cfg.dataset))


def test_run_summaries_old_and_newer(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = artifacts / "run-summary.json"
    assert read_summary(str(summary))["status"] == "succeeded"
    assert main(["inspect", str(summary), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "run-summary"
    doc = json.loads(summary.read_text())
    doc["versions"]["spark-train"] = "9.1.0"
    summary.write_text(json.dumps(doc))
    _bump(summary, SUMMARY_FORMAT_VERSION + 1)
    with pytest.raises(SummaryTooNew) as e:
        read_summary(str(summary))
    assert str(e.value) == _newer(
        summary, "9.1.0", SUMMARY_FORMAT_VERSION + 1, SUMMARY_FORMAT_VERSION
    )
    assert main(["inspect", str(summary)]) == 2
    assert _one_error_line(capsys) == f"spark-train inspect: error: {e.value}"


def test_what_today_writes_records_its_version(tmp_path: Path) -> None:
    import torch

    manager = CheckpointManager(str(tmp_path / "ck"))
    manager.save(3, {"w": torch.zeros(2)})
    meta = json.loads((tmp_path / "ck" / "step-000000000003" / "meta.json").read_text())
    assert (meta["format_version"], meta["spark_train"]) == (CKPT_VERSION, pipeline.__version__)
