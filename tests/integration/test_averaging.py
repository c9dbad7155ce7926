"""Map-reduce model averaging (``train.mode: average``) end to end on the session's local[2].

Every round is an ordinary Spark job (no barrier); these tests check that the average is
the exact sample-weighted one, that a failed task's rerun and a resumed run give bitwise
the same weights, and that the bundle is the same kind DDP writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.configbase import to_dict
from pipeline.launch import rounds
from pipeline.launch.fit import TrainResult, fit
from pipeline.launch.launcher import DistributedError
from pipeline.runtime.faults import FAULT_ENV, InjectedFault
from pipeline.serve.evaluate import evaluate_bundle
from pipeline.train.bundle import load_bundle
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.config import TrainConfig
from pipeline.train.models import mlp
from pipeline.train.modes.average import (
    MODEL_PREFIX,
    RoundSpec,
    pack,
    reduce_layout,
    train_round,
    unpack,
)
from tests.integration.test_training import _merge
from tests.shards import make_shardset

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]

# 300 train rows: partition 'rows' gives each of 2 workers 150 (5 batches of 32); partition
# 'shards' with 3 workers gives worker 0 shards 0 and 3 (170 rows), 1 shard 1, 2 shard 2.
TRAIN_SHARDS = [150, 90, 40, 20]
STEPS_PER_ROUND = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("avg-shards") / "set"
    return make_shardset(root, rows_per_shard={"train": TRAIN_SHARDS, "val": [120]}, seed=3)


def _cfg(tmp: Path, dataset: str, **over: Any) -> TrainConfig:
    """A small MLP with dropout, AdamW, constant LR; 3 rounds of 1 local epoch on 2 workers."""
    base = {
        "dataset": dataset,
        "mode": "average",
        "model": {"builder": "pipeline.train.models:mlp", "args": {"hidden": [16], "dropout": 0.1}},
        "num_workers": 2,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.02},
        "lr_schedule": {"name": "constant"},
        "checkpoint": {"dir": str(tmp / "ckpt")},
        "output": str(tmp / "model"),
        "max_attempts": 1,
        "averaging": {"rounds": 3},
    }
    return TrainConfig.from_mapping(_merge(base, over))


def _weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg.output) / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max()})"


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


@pytest.fixture(scope="module")
def baseline(
    spark: Any, shards: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainConfig, TrainResult]:
    """One uninterrupted run of the base config."""
    cfg = _cfg(tmp_path_factory.mktemp("avg-baseline"), shards)
    return cfg, fit(cfg, spark)


def test_rounds_improve_the_model_and_the_bundle_is_a_normal_one(
    baseline: tuple[TrainConfig, TrainResult],
) -> None:
    cfg, result = baseline
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert result.epochs == rounds and result.final == rounds[-1]
    assert rounds[-1]["val_loss"] < rounds[0]["val_loss"], rounds
    assert rounds[-1]["val_accuracy"] > 0.8, rounds
    assert result.steps == 3 * STEPS_PER_ROUND and result.attempt == 0
    assert result.resumed_from is None and result.world_size == 2
    for r in rounds:
        assert r["samples"] == 300 and r["local_steps"] == STEPS_PER_ROUND and r["attempts"] == 1
        # The workers receive the weights (2 copies) and send theirs back: same sizes here.
        assert r["bytes_sent"] == r["bytes_received"] > 2 * 4 * (8 * 16 + 16 + 16 * 2 + 2)
        assert r["seconds"] > 0

    bundle = load_bundle(cfg.output)
    metrics = bundle.metrics
    assert metrics["mode"] == "average" and metrics["rounds"] == rounds
    assert metrics["synchronizations"] == 3
    assert metrics["bytes_sent"] == sum(r["bytes_sent"] for r in rounds)
    assert bundle.spec["builder"] == "pipeline.train.models:mlp" and bundle.spec["num_outputs"] == 2
    # `spark-train evaluate` reads the bundle unchanged and agrees with the driver's val pass.
    evaluated = evaluate_bundle(cfg.output, split="val")
    assert evaluated["rows"] == 120
    assert evaluated["accuracy"] == pytest.approx(rounds[-1]["val_accuracy"])
    assert evaluated["loss"] == pytest.approx(rounds[-1]["val_loss"], rel=1e-5)
    # The final checkpoint holds the same weights.
    final = CheckpointManager(cfg.checkpoint.dir).load()
    assert final is not None and final["finished"]
    _assert_same_weights(dict(final["model"]), _weights(cfg))


def test_a_round_is_the_exact_sample_weighted_average_of_unequal_workers(
    spark: Any, shards: str, tmp_path: Path
) -> None:
    """One round of 3 workers on 2 task slots (no barrier: tasks run in waves) over partition
    'shards' (170, 90 and 40 rows), recomputed here by hand."""
    cfg = _cfg(tmp_path, shards, num_workers=3, averaging={"rounds": 1, "partition": "shards"})
    result = fit(cfg, spark)

    torch.manual_seed(cfg.seed)  # the driver's initial model
    initial = mlp(input_shape=(8,), num_outputs=2, hidden=[16], dropout=0.1).state_dict()
    payload = pack({MODEL_PREFIX + k: v for k, v in initial.items()})
    spec = RoundSpec(config=to_dict(cfg), round=0, attempt=0)
    # What each worker's task computed (tasks are deterministic, so rerunning them here
    # gives the same bits).
    own = [train_round(spec, worker, payload) for worker in range(3)]
    n = [c.samples for c in own]
    assert n == [170, 90, 40]
    w = [unpack(c.blob or b"") for c in own]
    expected = {  # in float64, summed in worker order (the driver's order for 3 workers)
        k[len(MODEL_PREFIX) :]: (
            (n[0] * w[0][k].double() + n[1] * w[1][k].double() + n[2] * w[2][k].double()) / 300
        ).float()
        for k in w[0]
    }
    _assert_same_weights(_weights(cfg), expected)
    assert not torch.equal(w[0]["model/1.weight"], w[1]["model/1.weight"])
    # Not the unweighted mean.
    mean = ((w[0]["model/1.weight"] + w[1]["model/1.weight"] + w[2]["model/1.weight"]) / 3).float()
    assert not torch.allclose(_weights(cfg)["1.weight"], mean)
    record = result.rounds[0]
    assert record["samples"] == 300
    assert record["bytes_received"] == sum(c.nbytes for c in own)
    assert record["train_loss"] == pytest.approx(sum(c.loss_sum for c in own) / 300)


def test_reduce_is_a_binary_tree_whatever_the_worker_count(spark: Any) -> None:
    """Every combine adds exactly two values, so the float sum order is always the same."""

    def add(a: str, b: str) -> str:  # commutative but not associative: shows the tree
        return f"({min(a, b)}+{max(a, b)})"

    sc = spark.sparkContext
    expected = {
        5: "((((0+4)+1)+2)+3)",  # padded to 8 partitions, 5..7 empty
        8: "((((0+4)+(1+5))+(2+6))+(3+7))",
    }
    for workers, shape in expected.items():
        partitions, depth = reduce_layout(workers)
        rdd = sc.parallelize(range(partitions), partitions).mapPartitionsWithIndex(
            lambda i, _, w=workers: [str(i)] if i < w else []
        )
        assert rdd.treeReduce(add, depth=depth) == shape
        # Over Spark Connect the client sums the workers' rows in the same tree.
        values = [str(i) if i < workers else None for i in range(partitions)]
        assert rounds._tree_sum(values, add) == shape


@pytest.mark.slow
def test_each_optimizer_state_policy_trains(spark: Any, shards: str, tmp_path: Path) -> None:
    results: dict[str, TrainResult] = {}
    cfgs: dict[str, TrainConfig] = {}
    for policy in ("reset", "average", "local"):
        cfgs[policy] = _cfg(
            tmp_path / policy, shards, averaging={"rounds": 2, "optimizer_state": policy}
        )
        results[policy] = fit(cfgs[policy], spark)
        assert results[policy].rounds[-1]["val_accuracy"] > 0.7, results[policy].rounds

    reset, average, local = (results[p].rounds for p in ("reset", "average", "local"))
    # Round 0 starts from the same fresh optimizer under every policy: same weights.
    first = [{k: v for k, v in r[0].items() if "bytes" not in k} for r in (reset, average, local)]
    assert _untimed(first[:1]) == _untimed(first[1:2]) == _untimed(first[2:])
    # 'average' also returns AdamW's two moments and step per parameter, and from round 1
    # on broadcasts them too.
    assert average[0]["bytes_received"] > 2.5 * reset[0]["bytes_received"]
    assert average[0]["bytes_sent"] == reset[0]["bytes_sent"]
    assert average[1]["bytes_sent"] > 2.5 * reset[1]["bytes_sent"]
    assert local[1]["bytes_sent"] == reset[1]["bytes_sent"]
    # From round 1 on the policies start from different optimizer states.
    final = {p: _weights(c) for p, c in cfgs.items()}
    assert not torch.equal(final["reset"]["1.weight"], final["local"]["1.weight"])
    assert not torch.equal(final["reset"]["1.weight"], final["average"]["1.weight"])
    # 'local': each worker's own state after each round, keyed by worker and round.
    for worker in (0, 1):
        manager = CheckpointManager(
            str(tmp_path / "local" / "ckpt" / "workers" / f"worker-{worker:05d}")
        )
        assert manager.steps() == [1, 2]
        state = manager.load(2)
        assert state is not None
        assert float(state["optimizer"]["0/step"]) == 2 * STEPS_PER_ROUND


def test_a_failed_task_is_rerun_and_the_round_is_bitwise_the_same(
    spark: Any, baseline: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    """Worker 1 raises at its 7th step (round 1) once; the driver reruns the round's job."""
    base, expected = baseline
    cfg = _cfg(tmp_path, base.dataset, max_attempts=2)
    result = fit(cfg, spark, env={FAULT_ENV: "rank=1,step=7,attempt=0,kind=raise"})
    assert [r["attempts"] for r in result.rounds] == [1, 2, 1]
    assert result.attempt == 1
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(result.rounds) == [
        {**r, "attempts": a} for r, a in zip(_untimed(expected.rounds), (1, 2, 1), strict=True)
    ]


def test_a_stuck_worker_ends_the_round_within_the_timeout(
    spark: Any, baseline: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    """Worker 0 hangs outside any Spark call; its watchdog ends it, the run fails bounded."""
    import time

    from pipeline.runtime.timeouts import stall_limit_s

    base, _ = baseline
    cfg = _cfg(tmp_path, base.dataset, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(DistributedError) as caught:
        fit(cfg, spark, env={FAULT_ENV: "rank=0,step=2,attempt=0,kind=hang,seconds=3600"})
    seconds = time.monotonic() - started
    limit = stall_limit_s(cfg.timeout_s)
    assert limit <= seconds <= limit + 60, f"ended after {seconds:.1f}s (limit {limit:.0f}s)"
    # The watchdog logs the stall (naming train.timeout_s) in the worker, then ends it: the
    # driver sees the worker crash and names the round and the worker.
    assert "round 0 failed" in str(caught.value) and "rank 0" in str(caught.value)


# A driver with a master that lets Spark retry a task (local[N, maxFailures]).
_RETRYING_DRIVER = """
import json, sys
from pyspark.sql import SparkSession
from pipeline.launch.fit import fit
from pipeline.train.config import TrainConfig
spark = (
    SparkSession.builder.master("local[2,2]").config("spark.ui.enabled", "false")
    .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("OFF")
result = fit(TrainConfig.from_mapping(json.loads(sys.argv[1])), spark, env=json.loads(sys.argv[2]))
print(json.dumps([r["attempts"] for r in result.rounds]))
spark.stop()
"""


@pytest.mark.slow
def test_spark_retries_a_failed_task_within_the_round_job(
    baseline: tuple[TrainConfig, TrainResult], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """With spark.task.maxFailures 2 the task's retry, not the driver, repairs the round."""
    base, _ = baseline
    cfg = _cfg(tmp_path, base.dataset)  # max_attempts 1: no rerun of the job by the driver
    fault = {FAULT_ENV: "rank=1,step=7,attempt=0,kind=raise"}
    argv = [json.dumps(to_dict(cfg)), json.dumps(fault)]
    proc = subprocess.run(
        [sys.executable, "-c", _RETRYING_DRIVER, *argv],
        env=subprocess_env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injecting raise on rank 1 at optimizer step 7" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [1, 1, 1]
    _assert_same_weights(_weights(cfg), _weights(base))


def test_resume_after_a_round_gives_bitwise_the_same_weights(
    spark: Any, baseline: tuple[TrainConfig, TrainResult], tmp_path: Path
) -> None:
    """Round 2 fails for good; a relaunch with train.resume continues from round 2's start."""
    base, expected = baseline
    cfg = _cfg(tmp_path, base.dataset)
    fault = {FAULT_ENV: f"rank=0,step={2 * STEPS_PER_ROUND + 2},attempt=0,kind=raise"}
    with pytest.raises(DistributedError, match="round 2") as failed:
        fit(cfg, spark, env=fault)
    # The error names the worker and is also the worker's exception type.
    assert isinstance(failed.value, InjectedFault) and failed.value.rank == 0
    assert CheckpointManager(cfg.checkpoint.dir).steps() == [1, 2]
    assert not Path(cfg.output).exists()

    resumed = fit(cfg.replace(resume=True), spark)
    assert resumed.resumed_from == 2
    _assert_same_weights(_weights(cfg), _weights(base))
    assert _untimed(resumed.rounds) == _untimed(expected.rounds)
    metrics = json.loads((Path(cfg.output) / "metrics.json").read_text())
    assert metrics["resumed_from"] == 2


@pytest.mark.slow
def test_ddp_warm_up_then_averaging(spark: Any, shards: str, tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        shards,
        averaging={"rounds": 2, "warmup_ddp_epochs": 1, "optimizer_state": "average"},
    )
    result = fit(cfg, spark)
    assert [e.get("phase") for e in result.epochs] == ["ddp", "average", "average"]
    assert [e["epoch"] for e in result.epochs] == [0, 1, 2]
    # One DDP epoch is 5 synchronized steps (150 rows per rank); then 2 rounds of 5 local steps.
    assert result.steps == STEPS_PER_ROUND + 2 * STEPS_PER_ROUND
    metrics = load_bundle(cfg.output).metrics
    assert metrics["synchronizations"] == STEPS_PER_ROUND + 2
    # The first round starts from the warm-up's weights and optimizer state (AdamW step 5).
    warm = CheckpointManager(str(tmp_path / "ckpt" / "ddp-warmup" / "ckpt")).load()
    assert warm is not None and warm["finished"]
    first = CheckpointManager(cfg.checkpoint.dir).load(1)
    assert first is not None
    assert float(first["optimizer"]["optim/0/step"]) == 2 * STEPS_PER_ROUND
    assert result.final["val_accuracy"] > 0.8
