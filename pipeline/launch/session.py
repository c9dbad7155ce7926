"""The driver's view of the Spark session: driver-only guard, barrier slots, log address.

Works with classic and Spark Connect sessions. A classic session counts barrier slots with the
scheduler's own figure (through the JVM gateway); a Connect session has no gateway, so its
slots are derived from the configuration (``spark.master``, ``spark.executor.instances`` ×
``spark.executor.cores`` / ``spark.task.cpus``) and the check is skipped, with a log line,
when the configuration does not say (``local[*]`` on the server, dynamic allocation, unset
cores): Spark's own barrier check then applies.

Imports pyspark lazily (inside the functions), so importing it costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.connect import is_connect
from pipeline.core.driver import require_driver
from pipeline.launch.errors import DistributedError, all_failed

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

__all__ = [
    "BarrierSlots",
    "active_session",
    "barrier_job",
    "barrier_slots",
    "check_slots",
    "cluster_slots",
    "conf_slots",
    "job_tags",
    "log_server_address",
    "require_driver",
]

log = logging.getLogger(__name__)

_SLOT_POLL_S = 0.25


def active_session(spark: SparkSession | None) -> SparkSession:
    """``spark``, or the active session (classic or Connect), or a new classic one."""
    from pyspark.sql import SparkSession

    if spark is not None:
        return spark
    return SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()


def log_server_address(spark: SparkSession) -> tuple[str, str]:
    """``(bind, advertise)`` addresses for the driver's log server.

    Classic: ``spark.driver.bindAddress`` / ``spark.driver.host``. Connect: the client runs
    outside the cluster, so it advertises the address of its own interface that routes to the
    Connect server (what the executors most likely reach too); when they cannot, the ranks
    rendezvous through ``allGather`` and their logs stay in the executors' logs.
    """
    if not is_connect(spark):
        conf = spark.sparkContext.getConf()
        host = conf.get("spark.driver.host") or "127.0.0.1"
        return conf.get("spark.driver.bindAddress") or host, host
    server = str(spark.client.host).strip("[]")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((server, 9))  # no packet is sent: this only picks the route
            host = str(probe.getsockname()[0])
    except OSError as err:
        log.warning("no route to the Connect server %s (%s); log server on 127.0.0.1", server, err)
        host = "127.0.0.1"
    return host, host


@dataclass(frozen=True, kw_only=True)
class BarrierSlots:
    """How many barrier tasks the cluster can run at once, and where that number comes from."""

    slots: int
    master: str
    executors: int
    """Registered executors (1 for a local master)."""
    expected_executors: int | None
    """Executors the application asked for (``spark.executor.instances``, the N of
    ``local-cluster[N,…]``), None when unknown."""
    executor_cores: str
    """``spark.executor.cores``, the N of ``local[N]``, or ``unset``."""
    task_cpus: int
    """``spark.task.cpus``."""

    @property
    def local(self) -> bool:
        """True for ``local`` / ``local[N]`` (one in-process executor)."""
        return _LOCAL.fullmatch(self.master) is not None

    @property
    def registering(self) -> bool:
        """True while executors the application expects have not all registered yet."""
        if self.local:
            return False
        if self.expected_executors is None:
            return self.executors == 0
        return self.executors < self.expected_executors

    def explain(self) -> str:
        """One sentence: the slots and the settings they follow from."""
        if self.local:
            return (
                f"{self.slots} barrier slot(s) = {self.executor_cores} core(s) of "
                f"master {self.master} / spark.task.cpus={self.task_cpus}"
            )
        expected = f" of {self.expected_executors}" if self.expected_executors is not None else ""
        return (
            f"{self.slots} barrier slot(s) = {self.executors}{expected} registered executor(s) × "
            f"spark.executor.cores={self.executor_cores} / spark.task.cpus={self.task_cpus} "
            "(GPU amounts also limit it when set)"
        )


_LOCAL = re.compile(r"local(\[(\d+|\*)(,\s*\d+)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,.*\]")


def barrier_slots(spark: SparkSession | None = None) -> BarrierSlots | None:
    """The cluster's barrier slots now (driver only): executors × cores / ``spark.task.cpus``.

    Classic sessions use the scheduler's own count (``SparkContext.maxNumConcurrentTasks``,
    which also accounts for task GPU amounts), falling back to the configuration when that
    private API is unavailable. Connect sessions derive it from the configuration alone and
    return None when it does not say (see the module docstring).
    """
    require_driver("barrier_slots")
    session = active_session(spark)
    if is_connect(session):
        return conf_slots(session)
    return cluster_slots(session.sparkContext)


def conf_slots(spark: SparkSession) -> BarrierSlots | None:
    """Barrier slots from the session's configuration (Spark Connect), or None when unknown."""
    conf = spark.conf
    master = str(conf.get("spark.master", "") or "")
    task_cpus = int(conf.get("spark.task.cpus", "1") or 1)
    if local := _LOCAL.fullmatch(master):
        cores = local.group(2) or "1"
        if cores == "*":  # the server's core count, which the client cannot see
            return None
        executors, executor_cores = 1, cores
    else:
        if (conf.get("spark.dynamicAllocation.enabled", "false") or "").lower() == "true":
            return None
        cluster = _LOCAL_CLUSTER.fullmatch(master)
        instances = cluster.group(1) if cluster else conf.get("spark.executor.instances", None)
        executor_cores = conf.get("spark.executor.cores", None) or "unset"
        if not instances or not executor_cores.isdigit():
            return None
        executors = int(instances)
    return BarrierSlots(
        slots=executors * int(executor_cores) // task_cpus,
        master=master,
        executors=executors,
        expected_executors=executors,
        executor_cores=executor_cores,
        task_cpus=task_cpus,
    )


def cluster_slots(sc: SparkContext) -> BarrierSlots:
    conf = sc.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1") or 1)
    master = str(sc.master)
    jsc = sc._jsc.sc()
    expected: int | None = 1
    if local := _LOCAL.fullmatch(master):
        cores = local.group(2) or "1"
        executors = 1
        executor_cores = str(os.cpu_count() or 1) if cores == "*" else cores
    else:
        executors = max(len(jsc.statusTracker().getExecutorInfos()) - 1, 0)  # minus the driver
        executor_cores = conf.get("spark.executor.cores") or "unset"
        cluster = _LOCAL_CLUSTER.fullmatch(master)
        instances = cluster.group(1) if cluster else conf.get("spark.executor.instances")
        expected = int(instances) if instances else None
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        slots = int(jsc.maxNumConcurrentTasks(profile))
    except Exception as err:  # py4j: a private Scala API that may change
        log.debug("maxNumConcurrentTasks unavailable (%s); computing slots from the conf", err)
        cores_each = int(executor_cores) if executor_cores.isdigit() else 1
        slots = executors * cores_each // task_cpus
    return BarrierSlots(
        slots=slots,
        master=master,
        executors=executors,
        expected_executors=expected,
        executor_cores=executor_cores,
        task_cpus=task_cpus,
    )


def check_slots(
    spark: SparkSession, num_workers: int, failures: Sequence[DistributedError] = ()
) -> None:
    """Fail fast instead of Spark's minutes of retrying the barrier slot check.

    While expected executors are still registering, wait for them up to
    ``spark.scheduler.maxRegisteredResourcesWaitingTime``; otherwise decide at once. Before
    a relaunch, ``failures`` are the earlier attempts' errors, chained to the ValueError.
    A Connect session is checked against its configuration, or not at all (logged) when the
    configuration does not tell the slots.
    """
    if is_connect(spark):
        found = conf_slots(spark)
        if found is None:
            log.info(
                "Spark Connect: the barrier slots cannot be derived from the configuration "
                "(spark.master, spark.executor.instances/cores, dynamic allocation); not "
                "checking them, Spark's own barrier check applies"
            )
            return
    else:
        found = _registered_slots(spark.sparkContext, num_workers)
    if found.slots < num_workers:
        relaunch = f"cannot relaunch after {len(failures)} failed attempt(s): " if failures else ""
        raise ValueError(
            f"{relaunch}num_workers={num_workers} needs {num_workers} concurrent barrier tasks "
            f"but the cluster has {found.explain()}. Lower num_workers, or give the job more "
            "slots: " + _slot_advice(found, num_workers)
        ) from (all_failed(failures) if failures else None)


def _registered_slots(sc: SparkContext, num_workers: int) -> BarrierSlots:
    """The classic count, after waiting for expected executors that are still registering."""
    found = cluster_slots(sc)
    if found.slots < num_workers and found.registering:
        wait_s = (
            sc._jsc.sc()
            .conf()
            .getTimeAsMs("spark.scheduler.maxRegisteredResourcesWaitingTime", "30s")
            / 1000
        )
        log.info(
            "waiting up to %.0f s for executors to register: %s; need %d",
            wait_s,
            found.explain(),
            num_workers,
        )
        deadline = time.monotonic() + wait_s
        while found.slots < num_workers and found.registering and time.monotonic() < deadline:
            time.sleep(_SLOT_POLL_S)  # executors register asynchronously; Spark has no wait API
            found = cluster_slots(sc)
    return found


def _slot_advice(found: BarrierSlots, num_workers: int) -> str:
    if found.local:
        return (
            f"use master local[{num_workers * found.task_cpus}] (at least num_workers × "
            "spark.task.cpus cores) or lower spark.task.cpus"
        )
    return (
        "add executors (spark.executor.instances), raise spark.executor.cores, or lower "
        "spark.task.cpus (and spark.task.resource.gpu.amount, if set)"
    )


def barrier_job(
    spark: SparkSession, task: Callable[[], bytes], num_workers: int
) -> Callable[[], list[bytes]]:
    """The barrier job of one attempt, as a function that runs it: one rank per task.

    Connect: ``spark.range(n)`` in ``n`` partitions ``.mapInArrow(..., barrier=True)``.
    Classic: an RDD barrier stage. Both return every rank's pickled ``(rank, connected,
    value)``. Classic keeps the RDD because a cancelled ``mapInArrow`` barrier job there does
    not end (measured with Spark 4.3 on ``local[2]``: its ``collect`` had not returned 60 s
    after ``cancelJobsWithTag`` or ``cancelAllJobs``; the RDD stage's returned in ~1.5 s), and
    ``timeout_s`` and the heartbeat check rely on cancelling.
    """
    if not is_connect(spark):
        rdd = spark.sparkContext.parallelize(range(num_workers), num_workers)
        barrier = rdd.barrier().mapPartitions(lambda _: [task()])
        return barrier.collect

    def arrow(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        for _ in batches:  # read the input to its end, or Spark does not reuse the worker
            pass
        yield pa.RecordBatch.from_pydict(
            {"payload": [task()]}, schema=pa.schema([("payload", pa.binary())])
        )

    df = spark.range(0, num_workers, 1, num_workers).mapInArrow(
        arrow, "payload binary", barrier=True
    )
    return lambda: [bytes(row[0]) for row in df.collect()]


def job_tags(
    spark: SparkSession,
) -> tuple[Callable[[str], None], Callable[[str], None], Callable[[str], object]]:
    """``(add, remove, interrupt)`` for a job tag: the calling thread's jobs get the tag.

    Connect: ``SparkSession.addTag`` / ``interruptTag`` (the server interrupts the session's
    executions with that tag, from any client thread). Classic: the thread's job group,
    cancelled with interrupt-on-cancel (a classic session's ``interruptTag`` only reaches the
    tags of the thread that calls it).
    """
    if is_connect(spark):
        return spark.addTag, spark.removeTag, spark.interruptTag
    sc = spark.sparkContext

    def add(tag: str) -> None:
        sc.setJobGroup(tag, "spark-train run_distributed", interruptOnCancel=True)

    return add, lambda _: None, sc.cancelJobGroup
