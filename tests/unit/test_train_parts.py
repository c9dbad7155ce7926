"""Unit tests of the training loop's small parts: LR schedule, fault spec, bundle round trip."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from pipeline.data.shardset import ShardSet
from pipeline.runtime.distenv import current
from pipeline.runtime.faults import Fault, InjectedFault, parse_fault
from pipeline.train import bundle
from pipeline.train.config import LRScheduleConfig, OptimizerConfig, TrainConfig
from pipeline.train.models import mlp
from pipeline.train.optim import LRFactor, build_optimizer, build_scheduler


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_factor_warmup_then_shape(name: str) -> None:
    f = LRFactor(name, warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    tail = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in itertools.pairwise(tail))
    assert f(20) == pytest.approx(1.0 if name == "constant" else 0.0)
    assert f(10) == pytest.approx(
        {"cosine": 0.6913, "linear": 0.625, "constant": 1.0}[name], abs=1e-3
    )


def test_scheduler_state_dict_is_plain_data() -> None:
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
    sched = build_scheduler(opt, LRScheduleConfig(name="linear", warmup_steps=2), total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # no closures in it
    assert state["lr_lambdas"][0]["total_steps"] == 10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * LRFactor("linear", 2, 10)(3))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_build_optimizer(name: str) -> None:
    opt = build_optimizer(torch.nn.Linear(2, 1).parameters(), OptimizerConfig(name=name, lr=0.5))  # type: ignore[arg-type]
    assert opt.param_groups[0]["lr"] == 0.5


def test_fault_spec_parsing() -> None:
    assert parse_fault("") is None
    assert parse_fault("rank=1,step=3") == Fault(rank=1, step=3, attempt=0, kind="raise")
    assert parse_fault("rank=0, step=7, attempt=1, kind=exit") == Fault(0, 7, 1, "exit")
    for bad in (
        "rank=1",
        "rank=a,step=1",
        "rank=1,step=2,kind=boom",
        "rank=1,step=2,when=now",
        "oops",
    ):
        with pytest.raises(ValueError, match="SPARK_TRAIN_FAULT"):
            parse_fault(bad)


def test_fault_fires_only_where_asked() -> None:
    fault = Fault(rank=1, step=3, attempt=0)
    fault.maybe_fire(rank=0, step=3, attempt=0)
    fault.maybe_fire(rank=1, step=3, attempt=1)
    with pytest.raises(InjectedFault, match="rank 1 at optimizer step 3"):
        fault.maybe_fire(rank=1, step=3, attempt=0)


def test_current_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_TRAIN_ATTEMPT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert current().attempt == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert current().attempt == 2
    monkeypatch.setenv("SPARK_TRAIN_ATTEMPT", "1")
    assert current().attempt == 1


def _shardset(root: Path, *, features: bool) -> ShardSet:
    manifest = {
        "format_version": 1,
        "schema": [{"name": "features", "dtype": "float32", "shape": [6]}],
        "label": {"task": "classification", "classes": ["a", "b", "c"]},
        "feature_names": [f"f{i}" for i in range(6)],
        "splits": {"train": {"rows": 0, "shards": []}},
        "fingerprint": {"combined": "abc123"},
    }
    if features:
        (root / "features" / "stages").mkdir(parents=True)
        (root / "features" / "metadata").write_text("{}")
        (root / "features" / "stages" / "0").write_text("x")
        manifest["features_model"] = "features"
    return ShardSet(str(root), manifest)


@pytest.mark.parametrize("with_features", [True, False])
def test_bundle_round_trip(
    tmp_path: Path, with_features: bool, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "shards").mkdir()
    shards = _shardset(tmp_path / "shards", features=with_features)
    cfg = TrainConfig.from_mapping({"model": {"args": {"hidden": [5], "dropout": 0.2}}})
    torch.manual_seed(0)
    model = mlp(input_shape=(6,), num_outputs=3, hidden=[5], dropout=0.2)
    spec = bundle.model_spec(cfg, shards, input_shape=(6,), num_outputs=3)
    out = str(tmp_path / "model")
    metrics = {"epochs": [{"epoch": 0, "train_loss": 1.0}]}
    for _ in range(2):  # the second write replaces the first
        bundle.write_bundle(
            out,
            model=model,
            spec=spec,
            metrics=metrics,
            config={"train": {}},
            features_uri=bundle.features_source(shards),
        )
    names = sorted(p.name for p in Path(out).iterdir())
    expected = ["config.yaml", "metrics.json", "model.json", "model.safetensors"]
    assert names == sorted(expected + (["features"] if with_features else []))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    if not with_features:
        assert "no features model" in caplog.text
    loaded = bundle.load_bundle(out)
    assert not loaded.model.training
    assert loaded.spec["classes"] == ["a", "b", "c"]
    assert loaded.spec["shardset"]["fingerprint"] == "abc123"
    assert loaded.metrics == metrics
    assert (loaded.features_uri is not None) == with_features
    model.eval()
    x = torch.randn(7, 6)
    assert torch.equal(loaded.model(x), model(x))


def test_load_bundle_refuses_non_bundles(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match=r"model\.json is missing"):
        bundle.load_bundle(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(bundle.BundleError, match="format_version 99"):
        bundle.load_bundle(str(tmp_path))


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_worker_exits_2_naming_the_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.worker import main

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 0\n")
    assert main(["--config", str(config)]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_training_side_imports_without_pyspark() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pipeline.worker, pipeline.train.loop, pipeline.train.bundle, pipeline.launch.fit; "
        "sys.exit('pyspark' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_register_mode_replacing_a_taken_name_needs_replace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.train import registry

    class Shadow(registry.BarrierMode):
        name = "ddp"

    shadow = Shadow()
    with caplog.at_level("WARNING", logger="spark_train.deprecation"):
        with registry.registered(shadow):  # the 0.1.0 call: still replaces, says so once
            assert registry.get_mode("ddp") is shadow
    assert [r.getMessage() for r in caplog.records if "register_mode('ddp')" in r.getMessage()]
    assert registry.get_mode("ddp") is not shadow and registry.get_mode("ddp").name == "ddp"

    class Extra(registry.BarrierMode):
        name = "extra-unit-test"

    first, second = Extra(), Extra()
    caplog.clear()
    with caplog.at_level("WARNING", logger="spark_train.deprecation"):
        with registry.registered(first):
            assert registry.register_mode(first) is first  # the same object again: no-op
            with registry.registered(second, replace=True):
                assert registry.get_mode("extra-unit-test") is second
            assert registry.get_mode("extra-unit-test") is first
    assert not caplog.records
    assert "extra-unit-test" not in registry.mode_names()


def test_evaluate_runs_the_split_in_eval_mode_restores_the_mode_and_reduces_once(
    tmp_path: Path,
) -> None:
    from pipeline.data.reader import ShardReader
    from pipeline.train.inputs import ModelInputs
    from pipeline.train.metrics import EvalSums, evaluate
    from tests.shards import make_shardset

    uri = make_shardset(tmp_path / "set", rows_per_shard={"train": [8], "val": [37, 0, 20]})
    shards = ShardSet.open(uri)
    inputs = ModelInputs.from_shards(shards)
    torch.manual_seed(0)
    model = mlp(input_shape=(8,), num_outputs=2, hidden=(16,), dropout=0.5)
    expected = EvalSums("classification")
    with ShardReader(shards, "val", rank=0, world_size=1, batch_size=16, shuffle=False) as reader:
        model.eval()
        with torch.no_grad():
            for batch in reader:  # dropout off: eval mode, whatever the model came in
                expected.add(model(batch.features), batch.labels)
        reduced: list[torch.Tensor] = []
        for training, inference in ((True, False), (False, True)):
            model.train(training)
            sums = evaluate(
                model, reader, inputs, "classification", reduce=reduced.append, inference=inference
            )
            assert model.training is training and not sums.values.requires_grad
            assert torch.equal(sums.values, expected.values) and sums.values[2] == 57
            assert reduced[-1] is sums.values
        assert len(reduced) == 2
    empty = evaluate(model, None, inputs, "regression", reduce=reduced.append)
    assert empty.result(prefix="val_") == {"val_loss": None, "val_rmse": None}
    assert len(reduced) == 2  # no split, nothing to reduce
