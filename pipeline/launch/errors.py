"""What a failed distributed run raises: the failing rank, its exception and its last lines.

:class:`DistributedError` is built from a rank's own report (:func:`rank_error`) or, when the
rank never reported (crashed, killed, cut off), from Spark's error (:func:`from_spark_error`);
where the rank's exception type is importable on the driver, the error is also an instance of
it. Used by the barrier launcher (:mod:`pipeline.launch.launcher`) and the averaging rounds
(:mod:`pipeline.launch.rounds`).
"""

from __future__ import annotations

import builtins
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.runtime import rankrun

if TYPE_CHECKING:
    from pipeline.runtime.progress import ProgressDisplay

__all__ = [
    "SECONDARY",
    "DistributedError",
    "DistributedTimeoutError",
    "all_failed",
    "from_spark_error",
    "headline",
    "rank_error",
    "timeout_error",
    "with_history",
]


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


# -- errors --------------------------------------------------------------------------------

# torch.distributed errors and Spark barrier errors a rank gets because *another* rank died
# (or hung: a collective timeout, pipeline.runtime.timeouts.CollectiveTimeoutError).
SECONDARY = re.compile(
    r"barrier|Connection (closed|reset) by peer|DistNetworkError|DistBackendError|"
    r"DistStoreError|broken pipe|CollectiveTimeoutError",
    re.IGNORECASE,
)


def from_spark_error(
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
    return rank_error(rank, exc_type, "", message, tail, attempt, also=also)


def rank_error(
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


def headline(err: DistributedError) -> str:
    return err.message.split("\n", 1)[0]


def all_failed(failures: Sequence[DistributedError]) -> DistributedError:
    last = failures[-1]
    if len(failures) == 1:
        return last
    lines = [f"all {len(failures)} attempts failed:"]
    lines += [f"  attempt {e.attempt}: {headline(e)}" for e in failures]
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


def timeout_error(
    timeout_s: float | None, attempt: int, tag: str, display: ProgressDisplay
) -> DistributedTimeoutError:
    progress = f"; last progress: {dict(display.last)}" if display.last else ""
    message = (
        f"run_distributed timed out: timeout_s={timeout_s:g} passed during attempt "
        f"{attempt}; the barrier job (tag {tag}) was cancelled{progress}"
    )
    return DistributedTimeoutError(
        message, rank=None, exc_type="TimeoutError", exc_message=message, attempt=attempt
    )


def with_history(
    err: DistributedTimeoutError, failures: Sequence[DistributedError]
) -> DistributedTimeoutError:
    if not failures:
        return err
    earlier = "\n".join(f"  attempt {e.attempt}: {headline(e)}" for e in failures)
    return DistributedTimeoutError(
        f"{err.message}\nearlier attempts failed:\n{earlier}",
        rank=None,
        exc_type=err.exc_type,
        exc_message=err.exc_message,
        attempt=err.attempt,
        attempts=[*failures, err],
    )
