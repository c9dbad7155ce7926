"""The DDP training plane end to end: real gloo process groups on CPU, real shard sets.

Two launchers run the same loop: plain ``torchrun -m pipeline.worker`` in a subprocess
(no Spark) and :func:`pipeline.launch.fit.fit` on the session's ``local[2]`` Spark.
Separate executor JVMs (local-cluster) train the same weights as ``local[2]``: that is
asserted by ``tests/reliability/test_process_faults.py``, whose local-cluster run (an
executor killed, the run resumed) must end bitwise equal to the ``local[2]`` baseline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.configbase import to_dict
from pipeline.launch.fit import TrainResult, fit
from pipeline.runtime.faults import FAULT_ENV
from pipeline.train.bundle import load_bundle
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.models import mlp
from pipeline.worker import EXIT_STOPPED
from tests.shards import make_shardset, read_split

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(600)

# 625 train rows over 2 ranks: 312 each, 10 batches of 32 (the last one short).
TRAIN_SHARDS = [300, 200, 0, 125]
STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("train-shards") / "set"
    return make_shardset(root, rows_per_shard={"train": TRAIN_SHARDS, "val": [100, 57]}, seed=3)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _cfg(tmp: Path, dataset: str, **over: Any) -> TrainConfig:
    """A small, quick config: MLP with dropout, AdamW, cosine with warm-up, checkpoints every 4."""
    base = {
        "dataset": dataset,
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [32], "dropout": 0.1}},
        "num_workers": 2,
        "epochs": 3,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "lr_schedule": {"name": "cosine", "warmup_steps": 2},
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 4},
        "output": str(tmp / "model"),
        "timeout_s": 60,
        "max_attempts": 1,
    }
    return TrainConfig.from_mapping(_merge(base, over))


def _weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg.output) / "model.safetensors"))


def _untimed(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in epochs]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max()})"


# -- torchrun (no Spark) ------------------------------------------------------------------------
def _torchrun(
    cfg: TrainConfig,
    tmp: Path,
    env: dict[str, str],
    *,
    nproc: int = 2,
    max_restarts: int = 0,
) -> subprocess.CompletedProcess[str]:
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"train": to_dict(cfg)}))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
        "-m", "pipeline.worker", "--config", str(config),
    ]  # fmt: skip
    # A session of its own, so that a hang kills torchrun and every rank it started.
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {TORCHRUN_TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"rank"')]
    assert len(lines) == 1, proc.stdout
    return dict(json.loads(lines[0]))


@pytest.fixture(scope="module")
def torchrun_baseline(
    shards: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainConfig, dict[str, Any]]:
    """One uninterrupted 2-rank torchrun run of the base config."""
    tmp = tmp_path_factory.mktemp("torchrun-baseline")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cfg = _cfg(tmp, shards)
    return cfg, _summary(_torchrun(cfg, tmp, env))


def test_two_ranks_learn_and_the_bundle_predicts_like_the_final_model(
    shards: str, torchrun_baseline: tuple[TrainConfig, dict[str, Any]]
) -> None:
    cfg, summary = torchrun_baseline
    assert summary["world_size"] == 2
    assert summary["steps"] == cfg.epochs * STEPS_PER_EPOCH
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_accuracy"] > 0.8, epochs  # two balanced-ish classes: chance is ~0.5

    # The final checkpoint holds the model as training left it.
    final = CheckpointManager(cfg.checkpoint.dir).load()
    assert final is not None and final["finished"] and final["step"] == summary["steps"]
    trained = mlp(input_shape=(8,), num_outputs=2, hidden=[32], dropout=0.1)
    trained.load_state_dict(final["model"])
    trained.eval()

    bundle = load_bundle(cfg.output)
    assert not bundle.model.training
    _, x, y = read_split(shards, "val")
    features = torch.from_numpy(x)
    with torch.no_grad():
        predicted = bundle.model(features)
        assert torch.equal(predicted, trained(features))
    accuracy = (predicted.argmax(1).numpy() == y).mean()
    # The reader drops at most world_size - 1 val rows, so the accuracies agree closely.
    assert abs(accuracy - epochs[-1]["val_accuracy"]) < 0.01

    spec = bundle.spec
    assert spec["builder"] == "pipeline.train.models:mlp" and spec["args"] == {
        "hidden": [32],
        "dropout": 0.1,
    }
    assert (
        spec["input_shape"] == [8] and spec["num_outputs"] == 2 and spec["task"] == "classification"
    )
    assert spec["classes"] == [0, 1] and spec["feature_names"] == [f"f{i}" for i in range(8)]
    assert spec["shardset"]["fingerprint"] == "synthetic-3"
    assert bundle.metrics["epochs"] == epochs
    assert not (Path(cfg.output) / "features").exists()  # the synthetic set has no feature model
    config = yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())
    # the config as trained: train.task resolved to the shard set's
    assert TrainConfig.from_mapping(config["train"]) == cfg.replace(task="classification")


def test_torchrun_restart_resumes_exactly(
    torchrun_baseline: tuple[TrainConfig, dict[str, Any]], tmp_path: Path
) -> None:
    """Rank 1 dies hard mid-epoch 1; torchrun restarts both ranks, which resume from step 12."""
    base, summary = torchrun_baseline
    cfg = _cfg(tmp_path, base.dataset)
    env = dict(
        os.environ, PYTHONPATH=str(REPO), **{FAULT_ENV: "rank=1,step=15,attempt=0,kind=exit"}
    )
    resumed = _summary(_torchrun(cfg, tmp_path, env, max_restarts=1))
    assert resumed["attempt"] == 1 and resumed["resumed_from"] == 12
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(resumed["epochs"]) == _untimed(summary["epochs"])


def test_an_elastic_run_preempted_and_resumed_on_fewer_ranks_is_reproducible(
    shards: str, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 after step 6: both ranks checkpoint there and exit 75; the run then
    resumes on one process (an elastic range allows it). Done twice, the two runs end with
    bitwise equal weights, and both record the resize 2 → 1 at step 6."""
    runs = []
    for name in ("first", "second"):
        tmp = tmp_path / name
        tmp.mkdir()
        cfg = _cfg(tmp, shards, num_workers={"min": 1, "max": 2}, epochs=2)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        stopped = _torchrun(cfg, tmp, {**env, FAULT_ENV: "rank=1,step=6,kind=sigterm"})
        # torchrun exits 1 and reports the rank(s) it saw end first: each with 75
        codes = set(re.findall(r"exitcode\s*:\s*(\d+)", stopped.stderr))
        assert codes == {str(EXIT_STOPPED)}, stopped.stderr[-3000:]
        for rank in (0, 1):
            assert f"rank {rank}: stopped at step 6 (preempted: SIGTERM" in stopped.stderr
        summary = _summary(_torchrun(cfg.replace(resume=True), tmp, env, nproc=1))
        assert (summary["world_size"], summary["resumed_from"]) == (1, 6)
        [resize] = summary["resizes"]
        assert (resize["from"], resize["to"], resize["step"]) == (2, 1, 6)
        assert summary["steps"] == 2 * STEPS_PER_EPOCH  # the global batch stayed 64 rows
        runs.append(cfg)
    _assert_same_weights(_weights(runs[0]), _weights(runs[1]))


def test_torchrun_shows_the_failing_ranks_traceback(shards: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{FAULT_ENV: "rank=1,step=3,kind=raise"})
    proc = _torchrun(_cfg(tmp_path, shards, epochs=1), tmp_path, env)
    assert proc.returncode != 0
    assert "[rank1]: Traceback" in proc.stderr
    assert (
        "pipeline.runtime.faults.InjectedFault: SPARK_TRAIN_FAULT: injected failure on rank 1"
        in proc.stderr
    )
    assert "maybe_fire" in proc.stderr  # the frame that raised


@pytest.mark.gpu
def test_gpu_run_with_nccl(shards: str, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    nproc = min(2, torch.cuda.device_count())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cfg = _cfg(tmp_path, shards, num_workers=nproc, precision="bf16")
    summary = _summary(_torchrun(cfg, tmp_path, env, nproc=nproc))
    assert summary["epochs"][-1]["val_accuracy"] > 0.8
    assert load_bundle(cfg.output).spec["num_outputs"] == 2  # loads on CPU


# -- Spark (run_distributed on local[2]) -------------------------------------------------------
@pytest.fixture(scope="module")
def spark_baseline(
    spark: Any, shards: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainConfig, TrainResult]:
    cfg = _cfg(tmp_path_factory.mktemp("spark-baseline"), shards)
    return cfg, fit(cfg, spark, show_progress=False)


@pytest.mark.spark
def test_spark_run_learns_and_matches_torchrun_bitwise(
    spark_baseline: tuple[TrainConfig, TrainResult],
    torchrun_baseline: tuple[TrainConfig, dict[str, Any]],
) -> None:
    cfg, result = spark_baseline
    assert result.steps == cfg.epochs * STEPS_PER_EPOCH and result.attempt == 0
    assert result.final["val_accuracy"] > 0.8
    assert result.bundle == cfg.output
    # One code path, two launchers: same seed and threads give the same weights.
    _assert_same_weights(_weights(cfg), _weights(torchrun_baseline[0]))


@pytest.mark.spark
def test_spark_relaunch_after_a_hard_crash_resumes_exactly(
    spark: Any, spark_baseline: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    base, expected = spark_baseline
    cfg = _cfg(tmp_path, base.dataset, max_attempts=2)
    env = {FAULT_ENV: "rank=1,step=15,attempt=0,kind=exit"}
    result = fit(cfg, spark, env=env, show_progress=False)
    assert result.attempt == 1 and result.resumed_from == 12
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(result.epochs) == _untimed(expected.epochs)


@pytest.mark.spark
@pytest.mark.slow
def test_unfinished_checkpoints_need_resume_true(
    spark: Any, spark_baseline: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    from pipeline.launch.launcher import DistributedError

    base, _ = spark_baseline
    cfg = _cfg(tmp_path, base.dataset)
    with pytest.raises(DistributedError):  # a crash leaves checkpoints up to step 20
        fit(cfg, spark, env={FAULT_ENV: "rank=0,step=22,kind=raise"}, show_progress=False)
    with pytest.raises(DistributedError, match=r"train\.resume=true") as e:
        fit(cfg, spark, show_progress=False)
    assert e.value.exc_type.endswith("ResumeError")
    result = fit(cfg.replace(resume=True), spark, show_progress=False)
    assert result.resumed_from == 20
    _assert_same_weights(_weights(cfg), _weights(base))
    # A finished run's checkpoints are cleared by the next fresh run, which starts over.
    again = fit(cfg, spark, show_progress=False)
    assert again.resumed_from is None
    _assert_same_weights(_weights(cfg), _weights(base))


@pytest.mark.spark
def test_a_raising_rank_reaches_the_driver_with_its_traceback(
    spark: Any, shards: str, tmp_path: Path
) -> None:
    from pipeline.launch.launcher import DistributedError

    with pytest.raises(DistributedError) as e:
        fit(_cfg(tmp_path, shards, epochs=1), spark, env={FAULT_ENV: "rank=1,step=3,kind=raise"},
            show_progress=False)  # fmt: skip
    err = e.value
    assert err.rank == 1
    assert err.exc_type.endswith("InjectedFault")
    text = "\n".join([str(err), *err.tail])
    assert "injected failure on rank 1 at optimizer step 3" in text
    assert "Traceback" in text and "maybe_fire" in text


@pytest.mark.spark
@pytest.mark.parametrize(("drop_last", "batches"), [(False, 5), (True, 4)])
def test_uneven_and_empty_shards_give_equal_steps(
    spark: Any, tmp_path: Path, drop_last: bool, batches: int
) -> None:
    # 132 train rows: 66 per rank whatever the shards, 4 batches of 16 and one of 2 (dropped
    # with train.drop_last); 1 val row: none per rank.
    uri = make_shardset(tmp_path / "set", rows_per_shard={"train": [37, 0, 5, 0, 90], "val": [1]})
    cfg = _cfg(tmp_path, uri, epochs=2, batch_size=16, timeout_s=30, drop_last=drop_last)
    result = fit(cfg, spark, show_progress=False)
    assert result.steps == 2 * batches
    assert result.final["val_loss"] is None and result.final["val_accuracy"] is None


@pytest.mark.spark
def test_too_few_train_rows_for_the_ranks_is_a_clear_error(spark: Any, tmp_path: Path) -> None:
    uri = make_shardset(tmp_path / "set", rows_per_shard={"train": [1, 0], "val": [4]})
    with pytest.raises(ValueError, match=r"too few for train.num_workers=2"):
        fit(_cfg(tmp_path, uri), spark, show_progress=False)


@pytest.mark.spark
def test_grad_accumulation_equals_a_larger_batch(spark: Any, shards: str, tmp_path: Path) -> None:
    common = {
        "model": {"args": {"hidden": [16], "dropout": 0.0}},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "lr_schedule": {"name": "linear", "warmup_steps": 1},
        "epochs": 2,
    }
    # 312 rows per rank: 10 batches of 32 (last has 24) == 20 micro-batches of 16 (last has 8).
    big = _cfg(tmp_path / "big", shards, batch_size=32, grad_accum_steps=1, **common)
    accum = _cfg(tmp_path / "accum", shards, batch_size=16, grad_accum_steps=2, **common)
    r_big, r_accum = fit(big, spark, show_progress=False), fit(accum, spark, show_progress=False)
    assert r_big.steps == r_accum.steps == 2 * STEPS_PER_EPOCH
    a, b = _weights(big), _weights(accum)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert r_big.final["train_loss"] == pytest.approx(r_accum.final["train_loss"], rel=1e-5)


@pytest.mark.spark
@pytest.mark.parametrize(
    "variant",
    [{"comm_hook": "fp16"}, {"comm_hook": "bf16"}, {"comm_hook": "powersgd", "powersgd": {"start_iter": 2}},
     {"precision": "bf16"}],
    ids=["fp16-hook", "bf16-hook", "powersgd-hook", "bf16-autocast"],
)  # fmt: skip
def test_comm_hooks_and_bf16_train(
    spark: Any,
    spark_baseline: tuple[TrainConfig, TrainResult],
    tmp_path: Path,
    variant: dict[str, Any],
) -> None:
    base, expected = spark_baseline
    cfg = _cfg(tmp_path, base.dataset, **variant)
    result = fit(cfg, spark, show_progress=False)
    assert result.steps == expected.steps
    assert result.final["val_accuracy"] > 0.75
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    # The variant really changed the arithmetic: the weights are close to, not equal to, fp32's.
    ours, fp32 = _weights(cfg), _weights(base)
    assert any(not torch.equal(ours[k], fp32[k]) for k in ours)
