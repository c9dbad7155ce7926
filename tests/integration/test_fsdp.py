"""``train.mode: fsdp`` end to end: FSDP2 on real gloo process groups (CPU), real shard sets.

The same launchers as DDP (``tests/integration/test_training.py``): plain ``torchrun -m
pipeline.worker`` subprocesses and :func:`pipeline.launch.fit.fit` on the session's ``local[2]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from pipeline.core.configbase import ConfigError, to_dict
from pipeline.data.reader import ShardReader
from pipeline.launch.fit import fit
from pipeline.runtime.faults import FAULT_ENV
from pipeline.train.bundle import load_bundle
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.metrics import EvalSums
from pipeline.train.models import cnn, mlp
from pipeline.train.modes.fsdp import load_full_state, shard_model, sharding_units
from pipeline.train.preflight import check_training_inputs
from pipeline.train.registry import get_mode
from tests.integration.test_training import (
    _assert_same_weights,
    _merge,
    _summary,
    _torchrun,
    _untimed,
    _weights,
)
from tests.shards import make_shardset, read_split

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)

# 624 train rows over 2 ranks: 312 each = 20 micro-batches of 16 (the last has 8), grouped
# two per optimizer step: 10 steps per epoch. 156 val rows: 78 per rank, none dropped.
STEPS_PER_EPOCH = 10
HIDDEN = [32]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("fsdp-shards") / "set"
    return make_shardset(
        root, rows_per_shard={"train": [300, 200, 0, 124], "val": [100, 56]}, seed=5
    )


def _cfg(tmp: Path, dataset: str, **over: Any) -> TrainConfig:
    """FSDP with what it must keep working: accumulation, clipping, dropout, a warm-up schedule.

    SGD with momentum, because Adam would all but undo a wrong (per-shard) clipping factor.
    The global gradient norm of this model and data is 0.16-0.78 over the run, so a clip at
    0.15 scales every step.
    """
    base = {
        "dataset": dataset,
        "mode": "fsdp",
        "model": {
            "builder": "pipeline.train.models:mlp",
            "args": {"hidden": HIDDEN, "dropout": 0.1},
        },
        "num_workers": 2,
        "epochs": 3,
        "batch_size": 16,
        "grad_accum_steps": 2,
        "grad_clip": 0.15,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "lr_schedule": {"name": "cosine", "warmup_steps": 2},
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 4},
        "output": str(tmp / "model"),
        "timeout_s": 60,
        "max_attempts": 1,
    }
    return TrainConfig.from_mapping(_merge(base, over))


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


@pytest.fixture(scope="module")
def fsdp_run(
    shards: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainConfig, dict[str, Any]]:
    """One uninterrupted 2-rank FSDP run under torchrun."""
    tmp = tmp_path_factory.mktemp("fsdp-run")
    cfg = _cfg(tmp, shards)
    return cfg, _summary(_torchrun(cfg, tmp, _env()))


@pytest.fixture(scope="module")
def ddp_run(shards: str, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """The same config trained with ``mode: ddp``."""
    tmp = tmp_path_factory.mktemp("ddp-run")
    cfg = _cfg(tmp, shards, mode="ddp")
    _summary(_torchrun(cfg, tmp, _env()))
    return cfg


@pytest.mark.slow
def test_fsdp_learns_what_ddp_learns(
    fsdp_run: tuple[TrainConfig, dict[str, Any]], ddp_run: TrainConfig
) -> None:
    cfg, summary = fsdp_run
    assert summary["world_size"] == 2 and summary["steps"] == cfg.epochs * STEPS_PER_EPOCH
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_accuracy"] > 0.8, epochs
    # Sharded gradients, reduce-scatter per micro-batch and the clip over DTensor shards give
    # DDP's update up to float summation order; a per-shard clip would be far off.
    ours, reference = _weights(cfg), _weights(ddp_run)
    assert ours.keys() == reference.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-5, atol=1e-6)


def test_fsdp_checkpoint_holds_the_full_state(
    fsdp_run: tuple[TrainConfig, dict[str, Any]],
) -> None:
    cfg, summary = fsdp_run
    manager = CheckpointManager(cfg.checkpoint.dir)
    state = manager.load()  # weights_only, sha256 checked
    assert state is not None and state["finished"] and state["step"] == summary["steps"]
    shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
    assert shapes == {"1.weight": (32, 8), "1.bias": (32,), "4.weight": (2, 32), "4.bias": (2,)}
    assert all(type(v) is torch.Tensor for v in state["model"].values())  # not DTensor shards
    optim = state["optimizer"]
    assert optim["param_groups"][0]["params"] == list(shapes)
    assert {k: tuple(v["momentum_buffer"].shape) for k, v in optim["state"].items()} == shapes
    assert manager.steps() == [24, 28, 30]  # keep=3 of every 4 steps and each epoch's end


def test_fsdp_bundle_loads_in_a_plain_process_and_predicts_as_in_training(
    shards: str, fsdp_run: tuple[TrainConfig, dict[str, Any]]
) -> None:
    cfg, summary = fsdp_run
    assert not dist.is_initialized()
    bundle = load_bundle(cfg.output)
    assert not bundle.model.training and bundle.metrics["epochs"] == summary["epochs"]
    assert bundle.spec["num_outputs"] == 2 and bundle.spec["args"]["hidden"] == HIDDEN

    # The final validation pass ran on the sharded model inside training. Redo it with the
    # bundle, batch by batch on each rank's rows, and the logged metrics come out bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun ranks (OMP_NUM_THREADS=1)
    try:
        total = torch.zeros(3, dtype=torch.float64)
        for rank in range(cfg.num_workers):
            sums = EvalSums("classification")
            with ShardReader(
                shards, "val", rank=rank, world_size=cfg.num_workers,
                batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False,
            ) as reader, torch.no_grad():  # fmt: skip
                for batch in reader:
                    sums.add(bundle.model(batch.features), batch.labels)
            total += sums.values
    finally:
        torch.set_num_threads(threads)
    recomputed = EvalSums("classification")
    recomputed.values = total
    final = summary["epochs"][-1]
    assert recomputed.result(prefix="val_") == {
        "val_loss": final["val_loss"],
        "val_accuracy": final["val_accuracy"],
    }

    # And the bundle's logits are those of the model in the final checkpoint.
    state = CheckpointManager(cfg.checkpoint.dir).load()
    assert state is not None
    trained = mlp(input_shape=(8,), num_outputs=2, hidden=HIDDEN, dropout=0.1)
    trained.load_state_dict(state["model"])
    trained.eval()
    _, x, _ = read_split(shards, "val")
    with torch.no_grad():
        assert torch.equal(bundle.model(torch.from_numpy(x)), trained(torch.from_numpy(x)))


@pytest.mark.slow
def test_fsdp_torchrun_restart_resumes_exactly(
    fsdp_run: tuple[TrainConfig, dict[str, Any]], tmp_path: Path
) -> None:
    """Rank 1 dies hard mid-epoch 1; torchrun restarts both ranks, which resume from step 12."""
    base, summary = fsdp_run
    cfg = _cfg(tmp_path, base.dataset)
    env = _env(**{FAULT_ENV: "rank=1,step=15,attempt=0,kind=exit"})
    resumed = _summary(_torchrun(cfg, tmp_path, env, max_restarts=1))
    assert resumed["attempt"] == 1 and resumed["resumed_from"] == 12
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(resumed["epochs"]) == _untimed(summary["epochs"])


def test_sharding_units_are_the_layers_that_hold_parameters() -> None:
    net = cnn(input_shape=(2, 6, 6), num_outputs=3, channels=[4, 8])
    assert [type(m).__name__ for m in sharding_units(net)] == ["Conv2d", "Conv2d", "Linear"]

    class Blocks(torch.nn.Module):  # a container has no forward for FSDP's hooks to run in
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])
            self.head = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Softmax(dim=1))

    net = Blocks()
    assert sharding_units(net) == [net.blocks[0], net.head]


def _shard_probe(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One rank of :func:`test_each_rank_holds_its_share_of_parameters_and_optimizer_state`."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        model = mlp(input_shape=(8,), num_outputs=3, hidden=[64, 32])
        shard_model(model, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        report = {
            "units": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
            "params": {k: cast(DTensor, p).to_local().numel() for k, p in model.named_parameters()},
            "exp_avg": {
                k: optimizer.state[p]["exp_avg"].to_local().numel()
                for k, p in model.named_parameters()
            },
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_holds_its_share_of_parameters_and_optimizer_state(tmp_path: Path) -> None:
    ctx = torch.multiprocessing.start_processes(
        _shard_probe, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank shard probe hung for 120 s")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # One unit per Linear, then the root.
    assert reports[0]["units"] == ["FSDPSequential", "FSDPLinear", "FSDPLinear", "FSDPLinear"]
    full = {"1.weight": 64 * 8, "1.bias": 64, "3.weight": 32 * 64, "3.bias": 32,
            "5.weight": 3 * 32, "5.bias": 3}  # fmt: skip
    for name, numel in full.items():
        # Dim 0 is split over the ranks (the 3-row head unevenly: 2 rows and 1).
        shares = [r["params"][name] for r in reports]
        assert sum(shares) == numel and max(shares) < numel, (name, shares)
        assert [r["exp_avg"][name] for r in reports] == shares  # optimizer state sharded too


@pytest.mark.parametrize("hook", ["fp16", "bf16", "powersgd"])
def test_fsdp_config_refuses_ddp_comm_hooks(tmp_path: Path, hook: str) -> None:
    """The mode's own check, which the preflight runs on the driver before any rank starts."""
    with pytest.raises(ConfigError, match=r"train\.comm_hook") as e:
        check_training_inputs(_cfg(tmp_path, "set", comm_hook=hook))
    assert e.value.key == "train.comm_hook" and "fsdp" in str(e.value)
    get_mode("ddp").check_config(_cfg(tmp_path, "set", mode="ddp", comm_hook=hook))


def test_fsdp_worker_cli_names_the_refused_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": to_dict(_cfg(tmp_path, "set"))}))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.worker", "--config", str(config),
         "--set", "train.comm_hook=fp16"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "train.comm_hook" in proc.stderr and "fsdp" in proc.stderr


def test_fsdp_refuses_to_resume_a_ddp_checkpoint(ddp_run: TrainConfig) -> None:
    state = CheckpointManager(ddp_run.checkpoint.dir).load()
    assert state is not None
    model = mlp(input_shape=(8,), num_outputs=2, hidden=HIDDEN, dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Refused before any collective, so no process group is needed to see it.
    with pytest.raises(ValueError, match=r"written by train\.mode 'ddp'.*train\.checkpoint\.dir"):
        load_full_state(model, optimizer, state["model"], state["optimizer"], source="ckpt/x")


@pytest.mark.slow
def test_fsdp_bf16_autocast_trains(
    fsdp_run: tuple[TrainConfig, dict[str, Any]], tmp_path: Path
) -> None:
    base, fp32 = fsdp_run
    cfg = _cfg(tmp_path, base.dataset, precision="bf16")
    summary = _summary(_torchrun(cfg, tmp_path, _env()))
    epochs = summary["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_accuracy"] == pytest.approx(fp32["epochs"][-1]["val_accuracy"], abs=0.05)
    ours, reference = _weights(cfg), _weights(base)
    assert any(not torch.equal(ours[k], reference[k]) for k in ours)  # bf16 changed the math
    assert load_bundle(cfg.output).metrics["epochs"] == epochs


@pytest.mark.gpu
def test_fsdp_gpu_run_with_nccl(shards: str, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    nproc = min(2, torch.cuda.device_count())
    cfg = _cfg(tmp_path, shards, num_workers=nproc, precision="bf16")
    summary = _summary(_torchrun(cfg, tmp_path, _env(), nproc=nproc))
    assert summary["epochs"][-1]["val_accuracy"] > 0.8
    bundle = load_bundle(cfg.output)  # on CPU, without a process group
    state = CheckpointManager(cfg.checkpoint.dir).load()
    assert state is not None
    _assert_same_weights(dict(bundle.model.state_dict()), state["model"])


# -- Spark ----------------------------------------------------------------------------------
@pytest.mark.spark
@pytest.mark.slow
def test_spark_fsdp_relaunch_resumes_to_the_torchrun_weights(
    spark: Any, fsdp_run: tuple[TrainConfig, dict[str, Any]], tmp_path: Path
) -> None:
    """The barrier-stage launcher runs the same FSDP loop; rank 1 raises at step 15, the
    driver relaunches both ranks in the reused Python workers (a new process group and device
    mesh), they resume from step 12 and end bitwise where the uninterrupted torchrun run did."""
    base, summary = fsdp_run
    cfg = _cfg(tmp_path, base.dataset, max_attempts=2)
    env = {FAULT_ENV: "rank=1,step=15,attempt=0,kind=raise"}
    result = fit(cfg, spark, env=env, show_progress=False)
    assert result.attempt == 1 and result.resumed_from == 12 and result.world_size == 2
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(result.epochs) == _untimed(summary["epochs"])
    assert load_bundle(cfg.output).metrics["epochs"] == result.epochs
