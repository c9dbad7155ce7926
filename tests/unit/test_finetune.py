"""train.init, train.freeze and train.optimizer.lr_multipliers without Spark.

* every bad ``train.init`` (missing file, wrong format, no key in common, a shape mismatch
  no skip covers, strict with leftovers) is a ``ConfigError`` naming the key from the
  driver's preflight, and ``spark-train run`` exits 2 on one before any Spark starts;
* the four source formats (safetensors, a weights-only torch state dict — nested too — a
  bundle, a Hugging Face style directory, sharded through its index) load the same tensors;
  rename and skip; the summary line's counts;
* freezing: requires_grad off, out of the optimizer, bitwise unchanged after training under
  ``torchrun`` (ddp) with a head that trained; lr multipliers make parameter groups.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import yaml

from pipeline.core.configbase import ConfigError
from pipeline.train import engine
from pipeline.train.bundle import load_bundle
from pipeline.train.config import TrainConfig
from pipeline.train.models import mlp
from pipeline.train.preflight import check_train_config, check_training_inputs
from tests.integration.test_training import _summary, _torchrun
from tests.shards import make_shardset

REPO = Path(__file__).resolve().parents[2]
MODEL = {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16]}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ft") / "set"
    return make_shardset(root, rows_per_shard={"train": [200, 200], "val": [100]}, seed=4)


def _cfg(tmp: Path, dataset: str, **over: Any) -> TrainConfig:
    data = {
        "dataset": dataset,
        "model": MODEL,
        "num_workers": 2,
        "epochs": 2,
        "batch_size": 50,
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0, "keep": 1},
        "output": str(tmp / "model"),
        "timeout_s": 120,
        "max_attempts": 1,
        **over,
    }
    return TrainConfig.from_mapping(data)


def _pretrained(num_outputs: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = mlp(input_shape=(8,), num_outputs=num_outputs, hidden=[16])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"init": {"uri": " "}}, "train.init.uri"),
        ({"init": {"skip": ["2.*"]}}, "train.init.uri"),
        ({"init": {"uri": "w.pt", "rename": {"(": "x"}}}, "train.init.rename.("),
        ({"init": {"uri": "w.pt", "rename": {"a(b)": "\\2"}}}, "train.init.rename.a(b)"),
        ({"init": {"uri": "w.pt", "format": "onnx"}}, "train.init.format"),
        ({"init": {"uri": "w.pt", "extra": 1}}, "train.init.extra"),
        ({"freeze": {"patterns": [""]}}, "train.freeze.patterns[0]"),
        ({"freeze": ["0.*"]}, "train.freeze"),
        ({"optimizer": {"lr_multipliers": {"0.*": 0}}}, "train.optimizer.lr_multipliers.0.*"),
        ({"optimizer": {"lr_multipliers": {"0.*": "x"}}}, "train.optimizer.lr_multipliers.0.*"),
    ],
)
def test_config_keys_are_validated(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_mapping(section)
    assert e.value.key == key, str(e.value)


# -- bad train.init: exit 2 in seconds, naming the key ------------------------------------------
def _bad_init(tmp: Path, shards: str, init: dict[str, Any]) -> ConfigError:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check_training_inputs(_cfg(tmp, shards, init=init))
    assert time.perf_counter() - started < 10
    return e.value


def test_missing_file_and_wrong_format(tmp_path: Path, shards: str) -> None:
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "nope.safetensors")})
    assert err.key == "train.init.uri" and "does not exist" in str(err)
    (tmp_path / "notes.pt").write_text("not a tensor file\n" * 10)
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "notes.pt")})
    assert err.key == "train.init.uri" and "weights_only" in str(err)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "broken.safetensors")})
    assert err.key == "train.init.uri" and "safetensors" in str(err)
    torch.save({"step": 3, "note": "no tensors"}, tmp_path / "ckpt.pt")
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "ckpt.pt")})
    assert err.key == "train.init.uri" and "not a state dict" in str(err)
    (tmp_path / "empty").mkdir()
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "empty")})
    assert err.key == "train.init.uri" and "model.json" in str(err)
    err = _bad_init(tmp_path, shards, {"uri": str(tmp_path / "empty"), "format": "torch"})
    assert err.key == "train.init.format"


def test_no_matching_key_shape_mismatch_and_strict(tmp_path: Path, shards: str) -> None:
    weights = _pretrained(num_outputs=5)  # another head
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({f"backbone.{k}": v for k, v in weights.items()}, path)
    err = _bad_init(tmp_path, shards, {"uri": str(path)})
    assert err.key == "train.init.uri" and "no tensor" in str(err) and "rename" in str(err)
    rename = {"^backbone\\.": ""}
    err = _bad_init(tmp_path, shards, {"uri": str(path), "rename": rename})
    assert err.key == "train.init.skip" and "3.weight [5, 16]" in str(err)
    err = _bad_init(
        tmp_path, shards, {"uri": str(path), "rename": rename, "skip": ["3.*"], "strict": True}
    )
    assert err.key == "train.init.strict" and "3.bias" in str(err)
    ok = _cfg(tmp_path, shards, init={"uri": str(path), "rename": rename, "skip": ["3.*"]})
    check_training_inputs(ok)  # the head keeps its initialisation


def test_run_exits_2_before_spark(tmp_path: Path) -> None:
    section = {
        "etl": {"input": {"path": str(tmp_path / "raw")}, "schema": {"id": "long", "x": "double", "y": "int"},
                "label": "y", "key": "id", "numeric": ["x"], "output": str(tmp_path / "s")},
        "train": {"dataset": str(tmp_path / "s"), "output": str(tmp_path / "m"),
                  "checkpoint": {"dir": str(tmp_path / "c")},
                  "init": {"uri": str(tmp_path / "gone.safetensors")}},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(section))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", "--config", str(tmp_path / "c.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "train.init.uri" in proc.stderr and "does not exist" in proc.stderr
    assert time.perf_counter() - started < 60


# -- sources ---------------------------------------------------------------------------------
def _loaded(tmp: Path, shards: str, init: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = _cfg(tmp, shards, init=init)
    from pipeline.data.shardset import ShardSet

    model, record = engine.initial_model(cfg, ShardSet.open(shards))
    assert record is not None
    return model, record


def test_every_source_format_loads_the_same(tmp_path: Path, shards: str, caplog: Any) -> None:
    weights = _pretrained()
    safetensors.torch.save_file(weights, tmp_path / "w.safetensors")
    torch.save(weights, tmp_path / "w.pt")
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "nested.pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    keys = sorted(weights)
    safetensors.torch.save_file({k: weights[k] for k in keys[:2]}, hf / "a.safetensors")
    safetensors.torch.save_file({k: weights[k] for k in keys[2:]}, hf / "b.safetensors")
    index = {"weight_map": {k: "a.safetensors" if k in keys[:2] else "b.safetensors" for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    formats = {}
    for name in ("w.safetensors", "w.pt", "nested.pth", "hf"):
        model, record = _loaded(tmp_path, shards, {"uri": str(tmp_path / name), "strict": True})
        formats[name] = record["format"]
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), (name, k)
        assert len(record["sha256"]) == 64
    assert formats == {
        "w.safetensors": "safetensors",
        "w.pt": "torch",
        "nested.pth": "torch",
        "hf": "huggingface",
    }
    # the driver's summary line
    caplog.set_level(logging.INFO, logger="pipeline.train.finetune")
    check_training_inputs(
        _cfg(tmp_path, shards, init={"uri": str(tmp_path / "w.pt"), "skip": ["3.*"]})
    )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.init:")]
    assert "4 tensors loaded" in line or "2 tensors loaded" in line, line
    assert ", 2 skipped, 2 missing, 0 unexpected" in line, line


# -- freezing and learning rates -------------------------------------------------------------
def test_freeze_and_lr_groups(tmp_path: Path, shards: str) -> None:
    from pipeline.data.shardset import ShardSet

    cfg = _cfg(
        tmp_path, shards,
        freeze={"patterns": ["1.*"]},
        optimizer={"lr": 0.01, "lr_multipliers": {"3.weight": 10.0}},
    )  # fmt: skip
    model = engine.new_model(cfg, ShardSet.open(shards))
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["1.weight", "1.bias"]
    opt = engine.new_optimizer(model, cfg)
    groups = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert groups == [(0.01, 1), (pytest.approx(0.1), 1)]
    with pytest.raises(ConfigError) as e:
        engine.new_model(
            _cfg(tmp_path, shards, freeze={"patterns": ["encoder.*"]}), ShardSet.open(shards)
        )
    assert e.value.key == "train.freeze.patterns[0]"
    with pytest.raises(ConfigError) as e:
        engine.new_model(_cfg(tmp_path, shards, freeze={"patterns": ["*"]}), ShardSet.open(shards))
    assert e.value.key == "train.freeze.patterns" and "nothing would train" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_training_inputs(_cfg(tmp_path, shards, optimizer={"lr_multipliers": {"head.*": 2}}))
    assert e.value.key == "train.optimizer.lr_multipliers.head.*"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_frozen_weights_are_bitwise_unchanged_under_torchrun(
    tmp_path: Path, shards: str, mode: str
) -> None:
    """2 ranks: the frozen first layer ends as loaded, the rest trained."""
    weights = _pretrained()
    init = tmp_path / "w.safetensors"
    safetensors.torch.save_file(weights, init)
    cfg = _cfg(
        tmp_path, shards, init={"uri": str(init), "strict": True},
        freeze={"patterns": ["1.*"]}, optimizer={"lr": 0.01, "lr_multipliers": {"3.*": 2.0}},
        mode=mode,
    )  # fmt: skip
    check_train_config(cfg)
    _summary(_torchrun(cfg, tmp_path, dict(os.environ, PYTHONPATH=str(REPO))))
    bundle = load_bundle(cfg.output)
    trained = bundle.model.state_dict()
    for k in ("1.weight", "1.bias"):
        assert torch.equal(trained[k], weights[k]), k
    for k in ("3.weight", "3.bias"):
        assert not torch.equal(trained[k], weights[k]), k
    assert bundle.spec["init"]["uri"] == str(init)
    assert bundle.spec["init"]["sha256"] == _sha256(init)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unfreeze_after_an_epoch_and_resume_exactly(tmp_path: Path, shards: str) -> None:
    """freeze.epochs=1: frozen through epoch 0, trained in epoch 1; a crash after the
    unfreeze resumes (optimizer groups and all) to the same bits."""
    from pipeline.runtime.faults import FAULT_ENV
    from pipeline.train.checkpoint import CheckpointManager

    weights = _pretrained()
    init = tmp_path / "w.safetensors"
    safetensors.torch.save_file(weights, init)

    def cfg(name: str) -> TrainConfig:
        return _cfg(
            tmp_path / name, shards, init={"uri": str(init)},
            freeze={"patterns": ["1.*"], "epochs": 1},
            optimizer={"lr": 0.01, "lr_multipliers": {"1.*": 0.5}},
            checkpoint={"dir": str(tmp_path / name / "ckpt"), "every_steps": 5, "keep": 3},
        )  # fmt: skip

    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _summary(_torchrun(cfg("a"), tmp_path / "a", env))
    assert a["steps"] == 8
    after_epoch_0 = CheckpointManager(str(tmp_path / "a" / "ckpt")).load(4)
    assert after_epoch_0 is not None
    assert torch.equal(after_epoch_0["model"]["1.weight"], weights["1.weight"])
    final = load_bundle(cfg("a").output).model.state_dict()
    assert not torch.equal(final["1.weight"], weights["1.weight"])  # trained in epoch 1
    crash = {FAULT_ENV: "rank=1,step=7,attempt=0,kind=exit"}
    b = _summary(_torchrun(cfg("b"), tmp_path / "b", {**env, **crash}, max_restarts=1))
    assert b["attempt"] == 1 and b["resumed_from"] == 5
    resumed = load_bundle(cfg("b").output).model.state_dict()
    for k, v in final.items():
        assert torch.equal(resumed[k], v), k


# -- builders of the ecosystem ---------------------------------------------------------------
def test_ecosystem_builders_resolve_adapt_and_name_their_extra(monkeypatch: Any) -> None:
    from pipeline.train import ecosystem
    from pipeline.train.models import BuilderError, build_model, resolve_builder

    for spec, words in [
        ("torchvision:resnet1800", "no constructor"),
        ("timm:no_such_net", "knows no model"),
        ("hf:BertModel", "AutoModelFor"),
        ("hf:", "names no model"),
    ]:
        with pytest.raises(BuilderError, match=words):
            resolve_builder(spec)
    # torchvision: a new head of num_outputs; channels checked against the input
    model = build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_outputs=4)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert "fc.weight" in model.state_dict()  # the library's own names
    with pytest.raises(BuilderError, match="3-channel images, the shard set's have 1"):
        build_model("torchvision:resnet18", input_shape=(1, 32, 32), num_outputs=2)
    with pytest.raises(BuilderError, match=r"train\.init"):
        build_model(
            "torchvision:resnet18",
            input_shape=(3, 8, 8),
            num_outputs=2,
            args={"weights": "DEFAULT"},
        )
    with pytest.raises(BuilderError, match="images"):
        build_model("torchvision:resnet18", input_shape=(16,), num_outputs=2)
    # timm adapts the input channels itself
    model = build_model("timm:resnet10t", input_shape=(1, 16, 16), num_outputs=3)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
    # a missing library is a config error naming the extra, before anything runs
    real = ecosystem.importlib.import_module

    def missing(name: str) -> Any:
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name)

    monkeypatch.setattr(ecosystem.importlib, "import_module", missing)
    cfg = TrainConfig.from_mapping({"model": {"builder": "hf:AutoModelForSequenceClassification"}})
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert e.value.key == "train.model.builder" and "spark-train[hf]" in str(e.value)


def test_hf_text_adapter_feeds_ids_and_mask(tmp_path: Path) -> None:
    from transformers import BertConfig

    from pipeline.train.models import BuilderError, build_model

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    config.save_pretrained(tmp_path)
    args = {"model_dir": str(tmp_path), "hidden_dropout_prob": 0.0}
    spec = {"review": ("int32", (12,))}
    model = build_model("hf:AutoModelForSequenceClassification", input_shape=(12,), num_outputs=2,
                        args=args, inputs=spec, vocab={"review": (40, 3)})  # fmt: skip
    assert model.config.pad_token_id == 3 and model.config.num_labels == 2
    model.eval()
    ids = torch.tensor([[5, 6, 7, 3, 3, 3, 3, 3, 3, 3, 3, 3]], dtype=torch.int32)
    # the adapter is the model called with input_ids and the mask of non-pad ids
    direct = (
        type(model)
        .__mro__[1]
        .forward(model, input_ids=ids.long(), attention_mask=(ids != 3).long())
        .logits
    )
    assert torch.allclose(model(ids), direct)
    for vocab, length, words in [((60, 0), 12, "vocab_size is 50"), ((40, 0), 20, "max_position")]:
        with pytest.raises(BuilderError, match=words):
            build_model("hf:AutoModelForSequenceClassification", input_shape=(length,), num_outputs=2,
                        args=args, inputs={"review": ("int32", (length,))}, vocab={"review": vocab})  # fmt: skip
