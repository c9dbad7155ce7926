"""Run a training function or a torchrun-style script as a Spark barrier job.

:func:`run_distributed` starts one barrier task per rank. The tasks agree on rank 0's host,
a free port there and the GPUs of each host — through the driver, which gathers every
task's part and answers all at once (a network round trip), or, when some task cannot reach
the driver, through ``BarrierTaskContext.allGather`` (which costs about a second: Spark
polls its barrier coordinator every 1000 ms). Then each task runs the target with the
torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) plus ``SPARK_TRAIN_ATTEMPT``, ``SPARK_TRAIN_RUN_TOKEN`` and
``SPARK_TRAIN_LAUNCH_REASON``, so ``init_process_group("env://")`` works unchanged. A
callable runs inside the Python worker itself (torch stays imported in reused workers); a
script runs as a child process of it.

The driver supervises: it checks the cluster has enough barrier slots before launching
(with an :class:`Elastic` range, it takes what there is), serves a token-authenticated log
channel (ranks' log records, output and progress reach the driver's log as ``[rank N] …``),
bounds the job by ``timeout_s``, reports the first real cause of a failure
(:class:`DistributedError`), and relaunches the whole job until ``max_attempts`` attempts
failed, or when the ranks stopped on purpose (:mod:`pipeline.launch.elastic`).

On a Spark Connect session the "driver" is the client: the job is
``mapInArrow(barrier=True)`` over ``spark.range(n)``, tagged and interrupted with
``SparkSession.addTag`` / ``interruptTag``; when the executors cannot reach the client, the
ranks rendezvous through ``allGather`` and each failure report reaches the client inside
Spark's error (:func:`pipeline.runtime.rankrun.report_failure`).

It imports pyspark lazily; the task side lives in the Spark-free
:mod:`pipeline.runtime.rankrun`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.launch.elastic import Elastic, Launch, can_grow, launch_size, planned_stop
from pipeline.launch.errors import (
    SECONDARY,
    DistributedError,
    DistributedTimeoutError,
    all_failed,
    from_spark_error,
    headline,
    rank_error,
    timeout_error,
    with_history,
)
from pipeline.launch.rendezvous import Rendezvous
from pipeline.launch.session import (
    BarrierSlots,
    active_session,
    barrier_job,
    barrier_slots,
    job_tags,
    log_server_address,
    require_driver,
)
from pipeline.runtime import distenv, logchannel, preempt, rankrun
from pipeline.runtime.progress import ProgressDisplay

if TYPE_CHECKING:
    from pyspark import BarrierTaskContext
    from pyspark.sql import SparkSession

__all__ = [
    "BarrierSlots",
    "DistributedError",
    "DistributedTimeoutError",
    "Elastic",
    "barrier_slots",
    "run_distributed",
]

log = logging.getLogger(__name__)

_FINISH_WAIT_S = 10.0
"""After the job ended, the driver waits for the ranks' last log messages until none came
for this long."""
_CANCEL_WAIT_S = 30.0
"""How long a cancelled job may take to wind down before the driver stops waiting."""
_WATCH_S = 1.0
"""How often the driver checks the deadline and the ranks' heartbeats while a job runs."""
_SECONDARY_DELAY_S = 5.0
"""Without the log channel, how long a rank whose failure looks like a peer's consequence
waits before failing its task (Spark's error then names the peer that failed first)."""
_RENDEZVOUS_ANSWER_S = 90.0
"""How long a rank waits for the driver's rendezvous answer (more than the driver waits)."""


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
    elastic: Elastic | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``target`` on ``num_workers`` ranks in one Spark barrier job; return per-rank results.

    Args:
        target: a callable, called as ``target(*args, **kwargs)`` in each rank's Python
            worker; or the path of a ``.py`` script (as the executors see it), run with
            ``args`` as its argv by the executors' Python interpreter.
        *args: positional arguments of a callable target, or a script's argv (as strings).
        num_workers: number of ranks (barrier tasks); at most the cluster's barrier slots.
            With ``elastic``, the largest world size (``elastic.sizes[0]``).
        spark: the session to use; default the active one.
        max_attempts: relaunch the whole job after a failure until this many attempts
            failed. The target resumes from its own checkpoint (``SPARK_TRAIN_ATTEMPT``
            counts launches from 0; ``SPARK_TRAIN_LAUNCH_REASON`` says why this one).
        timeout_s: bound on the whole call, relaunches included; the job is cancelled and
            :class:`DistributedTimeoutError` raised when it passes. None: no bound.
        env: extra environment variables for every rank.
        show_progress: show :func:`pipeline.runtime.progress.report` figures (a bar on a terminal,
            else log lines); None: automatic, False: off.
        heartbeat_timeout_s: cancel the attempt (and relaunch, if attempts are left) when a
            rank that sends heartbeats (:func:`pipeline.runtime.timeouts.watchdog`) goes this long
            without any message: it is frozen (SIGSTOP, a paused VM) or cut off. None: off.
        elastic: the world sizes a launch may take (the largest the barrier slots hold
            then; rank 0 may ask to grow, :func:`pipeline.runtime.preempt.more_slots`), the
            wait for the smallest, and how to tell ranks that stopped on purpose (a
            preemption notice, growing): they are relaunched without counting a failure
            (:mod:`pipeline.launch.elastic`). None: ``num_workers`` ranks, no planned stops.
        **kwargs: keyword arguments for a callable target.

    Returns:
        Every rank's return value (callable) or exit code (script), in rank order.

    Raises:
        DistributedError: a rank failed in every attempt (the first real cause of each).
        DistributedTimeoutError: ``timeout_s`` passed.
        ValueError: bad arguments, or more ranks than the cluster has barrier slots.
    """
    require_driver("run_distributed")
    spec = _spec(target, args, kwargs, env)
    _check_counts(num_workers, max_attempts, timeout_s)
    if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
        raise ValueError(f"heartbeat_timeout_s must be > 0 or None, got {heartbeat_timeout_s!r}")
    elastic = elastic or Elastic(sizes=(num_workers,))
    if elastic.sizes[0] != num_workers:
        raise ValueError(f"num_workers ({num_workers}) must be elastic.sizes[0] {elastic.sizes}")
    session = active_session(spark)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    limits = _Limits(deadline=deadline, timeout_s=timeout_s, heartbeat_s=heartbeat_timeout_s)
    display = ProgressDisplay(enabled=show_progress)
    failures: list[DistributedError] = []
    launch, planned, reason = 0, 0, "first launch"
    try:
        while len(failures) < max_attempts:
            # A lost executor may still be coming back: wait for it, or fail fast.
            size = launch_size(session, elastic, failures)
            try:
                results = _run_attempt(
                    session, spec, Launch(size, launch, reason, elastic), limits, display
                )
            except DistributedTimeoutError as err:
                raise with_history(err, failures) from None
            except DistributedError as err:
                failures.append(err)
                launch, reason = launch + 1, f"failure: {headline(err)}"
                if len(failures) < max_attempts:
                    log.warning(
                        "attempt %d of %d failed, relaunching: %s",
                        len(failures),
                        max_attempts,
                        headline(err),
                    )
                continue
            planned, stopped = planned_stop(elastic, results, planned)
            if stopped is None:
                return results
            log.warning("the %d ranks stopped at a step boundary (%s): relaunching", size, stopped)
            launch, reason = launch + 1, stopped
    finally:
        display.close()
    raise all_failed(failures)


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


# -- one attempt ---------------------------------------------------------------------------


@dataclass
class _Failure:
    rank: int
    exc_type: str
    module: str
    message: str
    tail: list[str]


class _Collector:
    """Driver side of the channel for one attempt: rendezvous, logs, progress, failures."""

    def __init__(
        self, display: ProgressDisplay, ranks: int, grow: Callable[[], bool] = lambda: False
    ) -> None:
        self._display = display
        self._grow = grow  # rank 0's question at a checkpoint boundary
        self.ranks = ranks
        self._rendezvous = Rendezvous(ranks)
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

    def on_message(self, rank: int, msg: dict[str, Any]) -> dict[str, Any] | bytes | None:
        kind = msg.get("t")
        with self._lock:
            if kind == "alive" and msg.get("done"):
                self._heard.pop(rank, None)
            elif kind == "alive" or rank in self._heard:
                self._heard[rank] = time.monotonic()
        if kind == "rendezvous":
            return self._rendezvous.answer(rank, str(msg["part"]))
        if kind == preempt.GROW_REQUEST:
            return {"t": "grow", "more": rank == 0 and self._grow()}
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
    spark: SparkSession,
    spec: rankrun.RankSpec,
    launch: Launch,
    limits: _Limits,
    display: ProgressDisplay,
) -> list[Any]:
    from pyspark import cloudpickle

    num_workers, attempt = launch.size, launch.number
    spec = dataclasses.replace(spec, env={**spec.env, distenv.LAUNCH_REASON: launch.reason})
    token = secrets.token_hex(16)
    collector = _Collector(
        display, num_workers, lambda: can_grow(spark, launch.elastic, num_workers)
    )
    bind, host = log_server_address(spark)
    tag = f"spark-train-{token[:12]}"
    with logchannel.ChannelServer(bind, token, collector.on_message, advertise=host) as server:
        task = _rank_task(spec, attempt, token, server.address)
        log.info(
            "launching %d ranks (attempt %d, tag %s; %s)", num_workers, attempt, tag, launch.reason
        )
        job = barrier_job(spark, task, num_workers)
        rows, error, timed_out, silent = _collect(spark, job, tag, limits, collector)
        ranked = (
            None
            if rows is None
            else sorted((cloudpickle.loads(r) for r in rows), key=lambda row: row[0])
        )
        # Ranks that reached the driver say bye last; a failed job's ranks just disconnect.
        said_bye = None if ranked is None else sum(connected for _, connected, _ in ranked)
        if not server.wait_finished(ranks=said_bye, timeout_s=_FINISH_WAIT_S):
            log.warning(
                "some ranks' last log messages did not arrive (none came for %.0f s)",
                _FINISH_WAIT_S,
            )
    if timed_out:
        raise timeout_error(limits.timeout_s, attempt, tag, display)
    if silent:
        raise _silence_error(silent, limits.heartbeat_s, attempt, collector)
    if ranked is None:
        for rank, report in rankrun.failure_reports(str(error)):  # ranks not heard directly
            collector.on_message(rank, report)
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
    spark: SparkSession,
    run: Callable[[], list[bytes]],
    tag: str,
    limits: _Limits,
    collector: _Collector,
) -> tuple[list[bytes] | None, BaseException | None, bool, list[int]]:
    """Run the job from a thread; interrupt its tag at the deadline or when a rank falls silent.

    See :func:`_job_tags` for how the job is tagged and interrupted. Returns ``(rows, error,
    timed_out, silent ranks)``.
    """
    box: dict[str, Any] = {}

    add, remove, interrupt = job_tags(spark)

    def job() -> None:
        add(tag)
        try:
            box["rows"] = run()
        except BaseException as err:
            box["error"] = err
        finally:
            remove(tag)

    thread = threading.Thread(target=job, name=tag, daemon=True)
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
            interrupt(tag)
            thread.join(_CANCEL_WAIT_S)
            if thread.is_alive():
                log.warning(
                    "job tag %s still running %.0f s after interrupting it", tag, _CANCEL_WAIT_S
                )
    return box.get("rows"), box.get("error"), timed_out, silent


def _rank_task(
    spec: rankrun.RankSpec, attempt: int, token: str, log_addr: str
) -> Callable[[], bytes]:
    """What each barrier task runs: rendezvous, then the rank; its pickled result."""

    def task() -> bytes:
        from pyspark import BarrierTaskContext, cloudpickle

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        client = _connect(log_addr, token, rank)
        logchannel.install_client(client)
        try:
            env = _rendezvous(ctx, client, attempt, token, log_addr)
            result = rankrun.run_rank(spec, env, cpus=ctx.cpus())
            return bytes(cloudpickle.dumps((rank, client is not None, result)))
        except BaseException as exc:
            rankrun.report_failure(rank, exc)  # the driver keeps the first report per rank
            if client is None and SECONDARY.search(f"{type(exc).__name__} {exc}"):
                # Only Spark's error reaches the driver, and it carries one task's failure:
                # a rank that failed because a peer died lets the peer's failure come first.
                time.sleep(_SECONDARY_DELAY_S)
            raise
        finally:
            logchannel.install_client(None)
            if client is not None:
                client.close()

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


def _attempt_error(
    collector: _Collector, spark_error: BaseException | None, attempt: int
) -> DistributedError:
    """The first real cause: the first reported failure that is not a peer's consequence.

    When every report is a peer's consequence (or there is none), the cause is a rank that
    reported nothing — crashed, killed or hung: Spark's error names it if Spark saw it fail.
    """
    failures = collector.failures
    primary = [f for f in failures if not SECONDARY.search(f"{f.exc_type} {f.message}")]
    silent = [r for r in range(collector.ranks) if all(f.rank != r for f in failures)]
    if not primary and (silent or not failures):
        also = [f"rank {f.rank} {f.exc_type}" for f in failures]
        from_spark = from_spark_error(spark_error, attempt, collector.outputs, also=also)
        if not failures or from_spark.rank in silent:
            return from_spark
    first = (primary or list(failures))[0]
    others = [f"rank {f.rank} {f.exc_type}" for f in failures if f is not first]
    return rank_error(
        first.rank,
        first.exc_type,
        first.module,
        first.message,
        first.tail,
        attempt,
        also=others,
        silent=[] if primary else silent,
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
    return rank_error(rank, "HeartbeatTimeout", "", message, tail, attempt)
