"""Run a training function or a torchrun-style script as a Spark barrier job.

:func:`run_distributed` starts one barrier task per rank. The tasks agree on rank 0's host,
a free port there and the GPUs of each host — through the driver, which gathers every
task's part and answers all at once (a network round trip), or, when some task cannot reach
the driver, through ``BarrierTaskContext.allGather`` (which costs about a second: Spark
polls its barrier coordinator every 1000 ms). Then each task runs the target with the
torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) plus ``SPARK_TRAIN_ATTEMPT`` and ``SPARK_TRAIN_RUN_TOKEN``,
so ``init_process_group("env://")`` works unchanged. A callable
runs inside the Python worker itself (torch stays imported in reused workers); a script runs
as a child process of it.

The driver supervises: it checks the cluster has enough barrier slots before launching,
serves a token-authenticated log channel (ranks' log records, output and progress reach the
driver's log as ``[rank N] …``), bounds the job by ``timeout_s``, reports the first real
cause of a failure (:class:`DistributedError`), and relaunches the whole job up to
``max_attempts`` times.

This is the only ``pipeline`` module that imports pyspark, and it does so lazily; the task
side lives in the Spark-free :mod:`pipeline.runtime.rankrun`.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.runtime import logchannel, rankrun
from pipeline.runtime.progress import ProgressDisplay

if TYPE_CHECKING:
    from pyspark import BarrierTaskContext, SparkContext
    from pyspark.sql import SparkSession

__all__ = [
    "BarrierSlots",
    "DistributedError",
    "DistributedTimeoutError",
    "barrier_slots",
    "run_distributed",
]

log = logging.getLogger(__name__)

_FINISH_WAIT_S = 10.0
"""How long the driver waits, after the job ended, for ranks' last log messages."""
_CANCEL_WAIT_S = 30.0
"""How long a cancelled job may take to wind down before the driver stops waiting."""
_SLOT_POLL_S = 0.25
_WATCH_S = 1.0
"""How often the driver checks the deadline and the ranks' heartbeats while a job runs."""
_RENDEZVOUS_WAIT_S = 30.0
"""How long the driver waits for every rank to join its rendezvous before all fall back to
``BarrierTaskContext.allGather``."""
_RENDEZVOUS_ANSWER_S = 90.0
"""How long a rank waits for the driver's rendezvous answer (more than the driver waits)."""


class DistributedError(RuntimeError):
    """A rank failed. Carries the rank, the original exception's type and message, and the tail.

    Where the rank's exception type is importable on the driver, the raised error is also an
    instance of it (``except ValueError`` works). ``attempts`` lists every attempt's error
    when all ``max_attempts`` failed.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None,
        exc_type: str,
        exc_message: str,
        tail: Sequence[str] = (),
        attempt: int = 0,
        attempts: Sequence[DistributedError] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rank = rank
        """The failing rank, or None when Spark's error did not say."""
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.tail = list(tail)
        """Last lines of the rank's output and traceback."""
        self.attempt = attempt
        self.attempts = tuple(attempts)

    def __str__(self) -> str:
        return self.message


class DistributedTimeoutError(DistributedError, TimeoutError):
    """The barrier job ran past ``timeout_s`` and was cancelled."""


def run_distributed(
    target: Callable[..., Any] | str,
    *args: Any,
    num_workers: int,
    spark: SparkSession | None = None,
    max_attempts: int = 1,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
    heartbeat_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``target`` on ``num_workers`` ranks in one Spark barrier job; return per-rank results.

    Args:
        target: a callable, called as ``target(*args, **kwargs)`` in each rank's Python
            worker; or the path of a ``.py`` script (as the executors see it), run with
            ``args`` as its argv by the executors' Python interpreter.
        *args: positional arguments of a callable target, or a script's argv (as strings).
        num_workers: number of ranks (barrier tasks); at most the cluster's barrier slots.
        spark: the session to use; default the active one.
        max_attempts: relaunch the whole job after a failure until this many attempts ran.
            The target resumes from its own checkpoint (``SPARK_TRAIN_ATTEMPT`` counts from 0).
        timeout_s: bound on the whole call, relaunches included; the job is cancelled and
            :class:`DistributedTimeoutError` raised when it passes. None: no bound.
        env: extra environment variables for every rank.
        show_progress: show :func:`pipeline.runtime.progress.report` figures (a bar on a terminal,
            else log lines); None: automatic, False: off.
        heartbeat_timeout_s: cancel the attempt (and relaunch, if attempts are left) when a
            rank that sends heartbeats (:func:`pipeline.runtime.timeouts.watchdog`) goes this long
            without any message: it is frozen (SIGSTOP, a paused VM) or cut off. None: off.
        **kwargs: keyword arguments for a callable target.

    Returns:
        Every rank's return value (callable) or exit code (script), in rank order.

    Raises:
        DistributedError: a rank failed in every attempt (the first real cause of each).
        DistributedTimeoutError: ``timeout_s`` passed.
        ValueError: bad arguments, or more ranks than the cluster has barrier slots.
    """
    _require_driver("run_distributed")
    spec = _spec(target, args, kwargs, env)
    _check_counts(num_workers, max_attempts, timeout_s)
    if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
        raise ValueError(f"heartbeat_timeout_s must be > 0 or None, got {heartbeat_timeout_s!r}")
    sc = _spark_context(spark)
    _check_slots(sc, num_workers)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    limits = _Limits(deadline=deadline, timeout_s=timeout_s, heartbeat_s=heartbeat_timeout_s)
    display = ProgressDisplay(enabled=show_progress)
    failures: list[DistributedError] = []
    try:
        for attempt in range(max_attempts):
            if attempt:  # a lost executor may still be coming back: wait for it, or fail fast
                _check_slots(sc, num_workers, failures)
            try:
                return _run_attempt(sc, spec, num_workers, attempt, limits, display)
            except DistributedTimeoutError as err:
                raise _with_history(err, failures) from None
            except DistributedError as err:
                failures.append(err)
                if attempt + 1 < max_attempts:
                    log.warning(
                        "attempt %d of %d failed, relaunching: %s",
                        attempt + 1,
                        max_attempts,
                        _headline(err),
                    )
    finally:
        display.close()
    raise _all_failed(failures)


def _spec(
    target: Callable[..., Any] | str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    env: Mapping[str, str] | None,
) -> rankrun.RankSpec:
    if isinstance(target, str):
        if not target.endswith(".py"):
            raise ValueError(f"target must be a callable or a .py script path, got {target!r}")
        if kwargs:
            raise ValueError(
                f"a script target takes its argv as positional args, got keyword arguments "
                f"{sorted(kwargs)}"
            )
    elif not callable(target):
        raise ValueError(f"target must be a callable or a .py script path, got {target!r}")
    env = dict(env or {})
    bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"env must map str to str; bad entries for {bad}")
    return rankrun.RankSpec(target=target, args=tuple(args), kwargs=dict(kwargs), env=env)


def _check_counts(num_workers: int, max_attempts: int, timeout_s: float | None) -> None:
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")


def _require_driver(name: str) -> None:
    from pyspark import TaskContext

    if TaskContext.get() is not None:
        raise RuntimeError(
            f"{name} is driver-only but was called inside a Spark task; call it from the "
            "driver program (a training function gets its rank from pipeline.runtime.distenv.current())"
        )


def _spark_context(spark: SparkSession | None) -> SparkContext:
    from pyspark.sql import SparkSession

    if spark is None:
        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    try:
        return spark.sparkContext
    except Exception as err:  # Spark Connect sessions have no SparkContext
        raise ValueError(
            "run_distributed needs a classic SparkSession with a SparkContext (barrier mode "
            f"is not available over Spark Connect): {err}"
        ) from err


# -- barrier slots -------------------------------------------------------------------------


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


def barrier_slots(spark: SparkSession | None = None) -> BarrierSlots:
    """The cluster's barrier slots now (driver only): executors × cores / ``spark.task.cpus``.

    Uses the scheduler's own count (``SparkContext.maxNumConcurrentTasks``, which also
    accounts for task GPU amounts), falling back to the configuration when that private
    API is unavailable.
    """
    _require_driver("barrier_slots")
    return _slots(_spark_context(spark))


def _slots(sc: SparkContext) -> BarrierSlots:
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


def _check_slots(
    sc: SparkContext, num_workers: int, failures: Sequence[DistributedError] = ()
) -> None:
    """Fail fast instead of Spark's minutes of retrying the barrier slot check.

    While expected executors are still registering, wait for them up to
    ``spark.scheduler.maxRegisteredResourcesWaitingTime``; otherwise decide at once. Before
    a relaunch, ``failures`` are the earlier attempts' errors, chained to the ValueError.
    """
    found = _slots(sc)
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
            found = _slots(sc)
    if found.slots < num_workers:
        relaunch = f"cannot relaunch after {len(failures)} failed attempt(s): " if failures else ""
        raise ValueError(
            f"{relaunch}num_workers={num_workers} needs {num_workers} concurrent barrier tasks "
            f"but the cluster has {found.explain()}. Lower num_workers, or give the job more "
            "slots: " + _slot_advice(found, num_workers)
        ) from (_all_failed(failures) if failures else None)


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


# -- one attempt ---------------------------------------------------------------------------


@dataclass
class _Failure:
    rank: int
    exc_type: str
    module: str
    message: str
    tail: list[str]


class _Rendezvous:
    """Driver side of the rendezvous: gathers every rank's part and answers all ranks at once.

    When not every rank joined within ``_RENDEZVOUS_WAIT_S`` (one could not reach the
    driver), every rank is answered None and uses ``BarrierTaskContext.allGather`` — the
    ones that never connected use it anyway, so all ranks take the same path.
    """

    def __init__(self, ranks: int) -> None:
        self._ranks = ranks
        self._parts: dict[int, str] = {}
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._done = False
        self._result: list[str] | None = None

    def join(self, rank: int, part: str) -> list[str] | None:
        """Add ``rank``'s part and wait for the answer: all parts in rank order, or None."""
        with self._cond:
            if self._done:
                return self._result
            if self._deadline is None:
                self._deadline = time.monotonic() + _RENDEZVOUS_WAIT_S
            self._parts[rank] = part
            if len(self._parts) == self._ranks:
                self._result = [self._parts[r] for r in range(self._ranks)]
            elif not self._cond.wait_for(
                lambda: self._done, timeout=max(self._deadline - time.monotonic(), 0.0)
            ):
                log.warning(
                    "only ranks %s reached the driver within %.0f s; every rank "
                    "rendezvouses through BarrierTaskContext.allGather instead",
                    sorted(self._parts),
                    _RENDEZVOUS_WAIT_S,
                )
            self._done = True
            self._cond.notify_all()
            return self._result


class _Collector:
    """Driver side of the channel for one attempt: rendezvous, logs, progress, failures."""

    def __init__(self, display: ProgressDisplay, ranks: int) -> None:
        self._display = display
        self.ranks = ranks
        self._rendezvous = _Rendezvous(ranks)
        self._lock = threading.Lock()
        self.failures: list[_Failure] = []
        self.outputs: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=rankrun.TAIL_LINES))
        """Last output lines per rank, for a rank that dies without reporting (a crash)."""
        self._heard: dict[int, float] = {}
        """Time of the last message of each rank that sends heartbeats, until it is done."""

    def silent(self, limit_s: float) -> list[int]:
        """Heartbeating ranks that sent nothing for ``limit_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            return sorted(r for r, t in self._heard.items() if now - t > limit_s)

    def on_message(self, rank: int, msg: dict[str, Any]) -> dict[str, Any] | None:
        kind = msg.get("t")
        with self._lock:
            if kind == "alive" and msg.get("done"):
                self._heard.pop(rank, None)
            elif kind == "alive" or rank in self._heard:
                self._heard[rank] = time.monotonic()
        if kind == "rendezvous":
            return {"t": "rendezvous", "parts": self._rendezvous.join(rank, str(msg["part"]))}
        if kind in ("log", "out"):
            text = str(msg.get("msg" if kind == "log" else "line", ""))
            log.log(int(msg.get("level", logging.INFO)), "[rank %d] %s", rank, text)
            with self._lock:
                self.outputs[rank].extend(text.splitlines())
        elif kind == "progress" and rank == 0:
            self._display.update(msg)
        elif kind == "failure":
            failure = _Failure(
                rank=rank,
                exc_type=str(msg.get("type", "")),
                module=str(msg.get("module", "")),
                message=str(msg.get("message", "")),
                tail=[str(t) for t in msg.get("tail", [])],
            )
            with self._lock:  # the first report per rank is the one with its output tail
                if all(f.rank != rank for f in self.failures):
                    self.failures.append(failure)
        return None


def _run_attempt(
    sc: SparkContext,
    spec: rankrun.RankSpec,
    num_workers: int,
    attempt: int,
    limits: _Limits,
    display: ProgressDisplay,
) -> list[Any]:
    from pyspark import cloudpickle

    token = secrets.token_hex(16)
    collector = _Collector(display, num_workers)
    conf = sc.getConf()
    host = conf.get("spark.driver.host") or "127.0.0.1"
    bind = conf.get("spark.driver.bindAddress") or host
    group = f"spark-train-{token[:12]}"
    with logchannel.ChannelServer(bind, token, collector.on_message, advertise=host) as server:
        task = _barrier_task(spec, attempt, token, server.address)
        rdd = sc.parallelize(range(num_workers), num_workers).barrier().mapPartitions(task)
        log.info("launching %d ranks (attempt %d, job group %s)", num_workers, attempt, group)
        rows, error, timed_out, silent = _collect(sc, rdd, group, limits, collector)
        ranked = (
            None
            if rows is None
            else sorted((cloudpickle.loads(r) for r in rows), key=lambda row: row[0])
        )
        # Ranks that reached the driver say bye last; a failed job's ranks just disconnect.
        said_bye = None if ranked is None else sum(connected for _, connected, _ in ranked)
        if not server.wait_finished(ranks=said_bye, timeout_s=_FINISH_WAIT_S):
            log.warning(
                "some ranks' last log messages did not arrive within %.0f s", _FINISH_WAIT_S
            )
    if timed_out:
        raise _timeout_error(limits.timeout_s, attempt, group, display)
    if silent:
        raise _silence_error(silent, limits.heartbeat_s, attempt, collector)
    if ranked is None:
        raise _attempt_error(collector, error, attempt)
    return [value for _, _, value in ranked]


@dataclass(frozen=True)
class _Limits:
    """The bounds of one :func:`run_distributed` call."""

    deadline: float | None
    """``time.monotonic()`` by which the whole call must end."""
    timeout_s: float | None
    heartbeat_s: float | None


def _collect(
    sc: SparkContext, rdd: Any, group: str, limits: _Limits, collector: _Collector
) -> tuple[list[bytes] | None, BaseException | None, bool, list[int]]:
    """Run the job from a thread; cancel its group at the deadline or when a rank falls silent.

    Returns ``(rows, error, timed_out, silent ranks)``.
    """
    box: dict[str, Any] = {}

    def job() -> None:
        sc.setJobGroup(group, "spark-train run_distributed", interruptOnCancel=True)
        try:
            box["rows"] = rdd.collect()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=job, name=group, daemon=True)
    thread.start()
    timed_out, deadline = False, limits.deadline
    silent: list[int] = []
    try:
        while thread.is_alive() and not timed_out and not silent:
            left = _WATCH_S if deadline is None else min(deadline - time.monotonic(), _WATCH_S)
            thread.join(max(left, 0.0))
            if thread.is_alive():
                timed_out = deadline is not None and time.monotonic() >= deadline
                silent = [] if limits.heartbeat_s is None else collector.silent(limits.heartbeat_s)
    finally:
        if thread.is_alive():
            sc.cancelJobGroup(group)
            thread.join(_CANCEL_WAIT_S)
            if thread.is_alive():
                log.warning(
                    "job group %s still running %.0f s after cancelling it", group, _CANCEL_WAIT_S
                )
    return box.get("rows"), box.get("error"), timed_out, silent


def _barrier_task(
    spec: rankrun.RankSpec, attempt: int, token: str, log_addr: str
) -> Callable[[Iterable[int]], Iterable[bytes]]:
    def task(_: Iterable[int]) -> Iterator[bytes]:
        from pyspark import BarrierTaskContext, cloudpickle

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        client = _connect(log_addr, token, rank)
        logchannel.install_client(client)
        try:
            env = _rendezvous(ctx, client, attempt, token, log_addr)
            result = rankrun.run_rank(spec, env, cpus=ctx.cpus())
            payload = cloudpickle.dumps((rank, client is not None, result))
        except BaseException as exc:
            rankrun.report_failure(rank, exc)  # the driver keeps the first report per rank
            raise
        finally:
            logchannel.install_client(None)
            if client is not None:
                client.close()
        yield payload

    return task


def _connect(log_addr: str, token: str, rank: int) -> logchannel.ChannelClient | None:
    try:
        return logchannel.ChannelClient(log_addr, token, rank)
    except OSError as err:
        log.warning(
            "rank %d cannot reach the driver's log server at %s (%s); logs stay in "
            "the executor's log",
            rank,
            log_addr,
            err,
        )
        return None


def _rendezvous(
    ctx: BarrierTaskContext,
    client: logchannel.ChannelClient | None,
    attempt: int,
    token: str,
    log_addr: str,
) -> dict[str, str]:
    """Agree with the other tasks on hosts, GPUs and rank 0's port; return this rank's env."""
    rank = ctx.partitionId()
    host = ctx.getTaskInfos()[rank].address.rsplit(":", 1)[0]
    resources = ctx.resources()
    addresses = resources["gpu"].addresses if "gpu" in resources else []
    gpus = rankrun.physical_gpus(addresses, os.environ.get("CUDA_VISIBLE_DEVICES"))
    port = rankrun.free_port(host) if rank == 0 else 0
    mine = rankrun.RankInfo(host=host, gpus=gpus, port=port).to_json()
    parts = None
    if client is not None:
        answer = client.request({"t": "rendezvous", "part": mine}, timeout_s=_RENDEZVOUS_ANSWER_S)
        parts = answer.get("parts")
    if parts is None:
        parts = ctx.allGather(mine)
    infos = [rankrun.RankInfo.from_json(part) for part in parts]
    return rankrun.rank_environment(
        rank, infos, cpus=ctx.cpus(), attempt=attempt, run_token=token, log_addr=log_addr
    )


# -- errors --------------------------------------------------------------------------------

# torch.distributed errors and Spark barrier errors a rank gets because *another* rank died
# (or hung: a collective timeout, pipeline.runtime.timeouts.CollectiveTimeoutError).
_SECONDARY = re.compile(
    r"barrier|Connection (closed|reset) by peer|DistNetworkError|DistBackendError|"
    r"DistStoreError|broken pipe|CollectiveTimeoutError",
    re.IGNORECASE,
)


def _attempt_error(
    collector: _Collector, spark_error: BaseException | None, attempt: int
) -> DistributedError:
    """The first real cause: the first reported failure that is not a peer's consequence.

    When every report is a peer's consequence (or there is none), the cause is a rank that
    reported nothing — crashed, killed or hung: Spark's error names it if Spark saw it fail.
    """
    failures = collector.failures
    primary = [f for f in failures if not _SECONDARY.search(f"{f.exc_type} {f.message}")]
    silent = [r for r in range(collector.ranks) if all(f.rank != r for f in failures)]
    if not primary and (silent or not failures):
        also = [f"rank {f.rank} {f.exc_type}" for f in failures]
        from_spark = _from_spark_error(spark_error, attempt, collector.outputs, also=also)
        if not failures or from_spark.rank in silent:
            return from_spark
    first = (primary or list(failures))[0]
    others = [f"rank {f.rank} {f.exc_type}" for f in failures if f is not first]
    return _error(
        first.rank,
        first.exc_type,
        first.module,
        first.message,
        first.tail,
        attempt,
        also=others,
        silent=[] if primary else silent,
    )


def _from_spark_error(
    spark_error: BaseException | None,
    attempt: int,
    outputs: Mapping[int, Sequence[str]] | None = None,
    also: Sequence[str] = (),
) -> DistributedError:
    """No rank reported (it crashed, or never reached the driver): read Spark's own error.

    The tail is the rank's last forwarded output, then Spark's message without JVM frames.
    """
    text = str(spark_error) if spark_error is not None else "the barrier job failed"
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")), None
    )
    spark_tail = [line for line in lines[start or 0 :] if not line.startswith("\t")]
    found = re.search(r"barrier task ResultTask\(\d+, (\d+)\)|Task (\d+) in stage", text)
    rank = int(found.group(1) or found.group(2)) if found else None
    last = next(
        (m for line in reversed(spark_tail) if (m := re.match(r"([\w.]+): (.*)", line))), None
    )
    exc_type = last.group(1).rsplit(".", 1)[-1] if last else type(spark_error).__name__
    message = last.group(2) if last else (lines[0] if lines else text)
    # No Python exception (a lost executor, a killed worker): Spark's reason for the task.
    reason = None if last else re.search(r"finished unsuccessfully\.\n(\w+) (.+)", text)
    if reason:
        exc_type, message = reason.group(1), reason.group(2)
    output = list((outputs or {}).get(rank, ())) if rank is not None else []
    tail = [*output, *spark_tail][-rankrun.TAIL_LINES :]
    return _error(rank, exc_type, "", message, tail, attempt, also=also)


def _error(
    rank: int | None,
    exc_type: str,
    module: str,
    message: str,
    tail: Sequence[str],
    attempt: int,
    also: Sequence[str] = (),
    silent: Sequence[int] = (),
) -> DistributedError:
    who = f"rank {rank}" if rank is not None else "a rank"
    text = f"{who} failed with {exc_type}: {message} (attempt {attempt})"
    if also:
        text += f"; also failed after it: {', '.join(also)}"
    if silent:
        ranks = ", ".join(map(str, silent))
        text += f"; no error report from rank {ranks} (crashed, killed or hung)"
    text += f"\n--- last {len(tail)} lines of {who} ---\n" + "\n".join(tail)

    def build(cls: type[DistributedError]) -> DistributedError:
        return cls(
            text, rank=rank, exc_type=exc_type, exc_message=message, tail=tail, attempt=attempt
        )

    try:
        return build(_typed_error_class(module, exc_type))
    except Exception:  # an exotic original __new__: the plain error says everything too
        return build(DistributedError)


_TYPED: dict[type, type[DistributedError]] = {}


def _typed_error_class(module: str, qualname: str) -> type[DistributedError]:
    """``DistributedError`` that is also the rank's exception type, when the driver has it."""
    original: Any = None
    if module in ("builtins", "") and "." not in qualname:
        original = getattr(builtins, qualname, None)
    elif module:
        original = sys.modules.get(module)
        for part in qualname.split("."):
            original = getattr(original, part, None)
    if (
        not isinstance(original, type)
        or not issubclass(original, Exception)
        or issubclass(DistributedError, original)
        or issubclass(original, DistributedError)
    ):
        return DistributedError
    if original not in _TYPED:
        try:
            _TYPED[original] = type(
                f"Distributed{original.__name__}",
                (DistributedError, original),
                {"__module__": __name__},
            )
        except TypeError:  # incompatible instance layouts
            return DistributedError
    return _TYPED[original]


def _headline(err: DistributedError) -> str:
    return err.message.split("\n", 1)[0]


def _all_failed(failures: Sequence[DistributedError]) -> DistributedError:
    last = failures[-1]
    if len(failures) == 1:
        return last
    lines = [f"all {len(failures)} attempts failed:"]
    lines += [f"  attempt {e.attempt}: {_headline(e)}" for e in failures]
    detail = last.message.split("\n", 1)[1] if "\n" in last.message else ""
    text = "\n".join(lines) + ("\n" + detail if detail else "")
    cls = type(last)
    return cls(
        text,
        rank=last.rank,
        exc_type=last.exc_type,
        exc_message=last.exc_message,
        tail=last.tail,
        attempt=last.attempt,
        attempts=failures,
    )


def _timeout_error(
    timeout_s: float | None, attempt: int, group: str, display: ProgressDisplay
) -> DistributedTimeoutError:
    progress = f"; last progress: {dict(display.last)}" if display.last else ""
    message = (
        f"run_distributed timed out: timeout_s={timeout_s:g} passed during attempt "
        f"{attempt}; the barrier job (group {group}) was cancelled{progress}"
    )
    return DistributedTimeoutError(
        message, rank=None, exc_type="TimeoutError", exc_message=message, attempt=attempt
    )


def _silence_error(
    silent: Sequence[int], heartbeat_s: float | None, attempt: int, collector: _Collector
) -> DistributedError:
    rank = silent[0]
    message = (
        f"sent no heartbeat for heartbeat_timeout_s={heartbeat_s:g} s (spark-train derives it "
        "from train.timeout_s): the process is frozen (SIGSTOP, a paused VM, swapping) or cut "
        "off from the driver; the attempt was cancelled"
    )
    tail = list(collector.outputs.get(rank, ()))
    return _error(rank, "HeartbeatTimeout", "", message, tail, attempt)


def _with_history(
    err: DistributedTimeoutError, failures: Sequence[DistributedError]
) -> DistributedTimeoutError:
    if not failures:
        return err
    earlier = "\n".join(f"  attempt {e.attempt}: {_headline(e)}" for e in failures)
    return DistributedTimeoutError(
        f"{err.message}\nearlier attempts failed:\n{earlier}",
        rank=None,
        exc_type=err.exc_type,
        exc_message=err.exc_message,
        attempt=err.attempt,
        attempts=[*failures, err],
    )
