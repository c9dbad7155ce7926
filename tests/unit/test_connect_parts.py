"""Spark Connect's Spark-free parts: failure reports carried in an error, slots from the conf."""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from pipeline.core.connect import is_connect
from pipeline.launch.session import conf_slots
from pipeline.runtime.rankrun import failure_reports, report_failure


class _Conf:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


class _Session:
    def __init__(self, conf: dict[str, str] | None = None) -> None:
        self.conf = _Conf(conf or {})


def test_a_failure_report_rides_in_the_exception_text_once() -> None:
    try:
        print_and_fail()
    except ValueError as exc:
        report_failure(3, exc, ["rank 3 reached step 7"])
        report_failure(3, exc)  # the launcher reports again: no second note
        text = "".join(traceback.format_exception(exc))
    [(rank, report)] = failure_reports(f"py4j noise\n{text}\nmore noise")
    assert rank == 3 and report["type"] == "ValueError" and report["message"] == "bad row 7"
    assert report["tail"][0] == "rank 3 reached step 7"
    assert report["tail"][-1] == "ValueError: bad row 7"
    assert failure_reports(text[: text.index("[spark-train failure report]") + 40]) == []


def print_and_fail() -> None:
    raise ValueError("bad row 7")


@pytest.mark.parametrize(
    ("conf", "slots"),
    [
        ({"spark.master": "local[3]"}, 3),
        ({"spark.master": "local[4]", "spark.task.cpus": "2"}, 2),
        ({"spark.master": "local[*]"}, None),  # the server's cores: unknown to the client
        (
            {"spark.master": "yarn", "spark.executor.instances": "3", "spark.executor.cores": "4"},
            12,
        ),
        ({"spark.master": "yarn", "spark.executor.instances": "3"}, None),
        (
            {
                "spark.master": "yarn",
                "spark.executor.instances": "3",
                "spark.executor.cores": "4",
                "spark.dynamicAllocation.enabled": "true",
            },
            None,
        ),
        ({"spark.master": "local-cluster[2,1,1024]", "spark.executor.cores": "1"}, 2),
    ],
)
def test_connect_slots_come_from_the_conf_or_are_unknown(
    conf: dict[str, str], slots: int | None
) -> None:
    found = conf_slots(_Session(conf))  # type: ignore[arg-type]
    assert (found.slots if found else None) == slots


def test_is_connect_tells_sessions_apart_without_pyspark() -> None:
    assert not is_connect(_Session())
    connect_like = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    assert is_connect(connect_like)


def test_averaging_refuses_weights_larger_than_a_connect_plan() -> None:
    from pipeline.launch import rounds

    session = _Session({"spark.connect.grpc.maxInboundMessageSize": str(2**20)})
    rounds._check_plan_size(session, b"x" * 2**19)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"spark.connect.grpc.maxInboundMessageSize \(1 MiB\)"):
        rounds._check_plan_size(session, b"x" * 2**20)  # type: ignore[arg-type]
