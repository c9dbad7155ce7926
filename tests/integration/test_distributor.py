"""``pipeline.TorchDistributor`` behaves as PySpark's: rank 0's value, None for a script.

The rank functions live at module level: Spark's Python workers import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline import DistributedError, TorchDistributor

SCRIPT = str(Path(__file__).resolve().parents[1] / "data" / "allreduce_script.py")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


def allreduce(offset: float, *, scale: float = 1.0, timeout_s: float = 0.0) -> tuple[int, float]:
    """``timeout_s`` is the function's own keyword (it must not reach run_distributed)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    value = torch.tensor([(dist.get_rank() + offset) * scale + timeout_s])
    dist.all_reduce(value)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank, value.item()


def test_function_returns_rank_0s_value_and_keeps_every_ranks(spark: Any) -> None:
    distributor = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False)
    assert distributor.results is None
    # ranks hold 10 and 11 (times 2): the all_reduce sums them on both
    assert distributor.run(allreduce, 10.0, scale=2.0, timeout_s=0.5) == (0, 43.0)
    assert distributor.results == [(0, 43.0), (1, 43.0)]


def test_script_returns_none_and_a_failing_rank_is_named(spark: Any) -> None:
    distributor = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False)
    assert distributor.run(SCRIPT, "--exit-code", 0) is None  # args become strings
    assert distributor.results == [0, 0]
    with pytest.raises(RuntimeError) as info:  # PySpark raises RuntimeError too
        distributor.run(SCRIPT, "--exit-code", 3)
    err = info.value
    assert isinstance(err, DistributedError) and err.rank == 1
    assert "exited with code 3" in str(err) and "rank 1 exiting with code 3" in err.tail


def test_bad_arguments_fail_as_pysparks_do(spark: Any) -> None:
    with pytest.raises(ValueError, match="num_processes has to be a positive integer"):
        TorchDistributor(num_processes=0, use_gpu=False)
    with pytest.raises(RuntimeError, match=r"'spark\.task\.resource\.gpu\.amount' was unset"):
        TorchDistributor(num_processes=2, local_mode=False, use_gpu=True)


def test_local_mode_needs_a_local_master() -> None:
    class Conf:
        def get(self, key: str, default: str | None = None) -> str | None:
            return "yarn" if key == "spark.master" else default

    class Session:
        conf = Conf()

    with pytest.raises(ValueError, match="pass local_mode=False"):
        TorchDistributor(2, True, False, spark=Session())  # type: ignore[arg-type]
    assert TorchDistributor(2, False, False, spark=Session()).num_processes == 2  # type: ignore[arg-type]
