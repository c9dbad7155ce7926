"""How ``spark-train`` reports errors and its effective config, and its exit codes.

Every error is one line on stderr, ``spark-train COMMAND: error: …``, naming the key, path,
file or row (exit 2 for bad usage or config, and for an artifact written in a newer format
than this release reads; 1 for a runtime failure); ``--debug`` raises
instead, so the traceback shows. The effective config is logged once per command with
credentials redacted (:mod:`pipeline.core.redact`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, NoReturn

from pipeline.config import Config
from pipeline.core.compat import NewerFormatError
from pipeline.core.redact import redact

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "OneLineParser",
    "UsageError",
    "log_effective_config",
    "newer_format",
    "one_line",
    "report_error",
]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit 2."""
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined, blank lines and ``^`` markers dropped."""
    lines = [ln.strip() for ln in str(text).splitlines()]
    return " ".join(ln for ln in lines if ln and set(ln) != {"^"})


def report_error(command: str, exc: BaseException, *, usage: bool) -> int:
    """Print the one-line error of ``exc`` for ``command``; return the exit code.

    Usage and config errors print their whole message (it names the key); runtime errors
    print the exception type and the first line of the message (a distributed failure's
    next lines are the rank's output tail, which the log already has), or the first two when
    the first ends with a colon (``all 3 attempts failed:`` and the first attempt's cause).
    """
    if usage:
        print(f"spark-train {command}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "all 3 attempts failed:" + the first cause
        lines = [f"{lines[0]} {lines[1]}"]
    first = f": {lines[0]}" if lines else ""
    print(
        f"spark-train {command}: error: {type(exc).__name__}{first} (--debug shows the traceback)",
        file=sys.stderr,
    )
    return EXIT_RUNTIME


def newer_format(exc: BaseException) -> NewerFormatError | None:
    """The :class:`NewerFormatError` behind ``exc`` (itself, or a cause of it), or None.

    An artifact written by a newer release is reported like a config error (exit 2): a
    retry fails the same way, upgrading spark-train fixes it.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, NewerFormatError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


LOG_ITEMS = 12
"""Items of a long list or mapping shown in the effective-config log line (then a count)."""
LOG_CHARS = 4000
"""The effective-config log line is cut after this many characters."""


def log_effective_config(logger: logging.Logger, cfg: Config) -> None:
    """Log the validated config at INFO, with credentials redacted, in one bounded line.

    A 784-column schema or a long feature list would otherwise make a line of many
    kilobytes: long lists and mappings show their first :data:`LOG_ITEMS` entries and how
    many more there are, and the line stops at :data:`LOG_CHARS` characters.
    """
    if logger.isEnabledFor(logging.INFO):
        text = json.dumps(summarized(redact(cfg.to_dict())), default=str, sort_keys=True)
        if len(text) > LOG_CHARS:
            text = f"{text[:LOG_CHARS]}… ({len(text) - LOG_CHARS} more characters)"
        logger.info("effective config (%s): %s", cfg.source, text)


def summarized(value: Any) -> Any:
    """``value`` with every list / mapping longer than :data:`LOG_ITEMS` shortened."""
    if isinstance(value, dict):
        items = list(value.items())
        out = {k: summarized(v) for k, v in items[:LOG_ITEMS]}
        if len(items) > LOG_ITEMS:
            out["…"] = f"{len(items) - LOG_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple):
        shown = [summarized(v) for v in value[:LOG_ITEMS]]
        return [*shown, f"… {len(value) - LOG_ITEMS} more"] if len(value) > LOG_ITEMS else shown
    return value
