"""The run summary: one JSON document per ``spark-train run``, written even when a stage fails.

A scheduler (Airflow, cron, a CI job) reads this file instead of parsing logs::

    {"format_version": 1, "command": "run", "status": "succeeded" | "failed",
     "exit_status": 0, "error": null | "<one line>", "started_at": "...", "ended_at": "...",
     "seconds": 12.3, "config": "c.yaml", "overrides": [...], "forced": ["train"],
     "stages": [{"name": "etl", "status": "ran" | "skipped" | "failed" | "not_run",
                 "started_at", "ended_at", "seconds", "reason", "counts", "metrics", "error"}],
     "metrics": {...evaluation metrics...}, "outputs": {...}, "spark": {...},
     "versions": {...}, "host": "..."}

Stages never reached after a failure stay ``not_run``. The file is replaced atomically
(:func:`pipeline.core.storage.atomic_write_bytes`), so a reader never sees half a summary.
"""

from __future__ import annotations

import json
import math
import platform
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Literal

from pipeline.core import storage
from pipeline.core.compat import NewerFormatError, check_format_version

__all__ = [
    "SUMMARY_FILE",
    "SUMMARY_FORMAT_VERSION",
    "RunSummary",
    "StageRecord",
    "StageStatus",
    "default_summary_path",
    "one_line_error",
    "read_summary",
    "versions",
]

SUMMARY_FORMAT_VERSION = 1
SUMMARY_FILE = "run-summary.json"
StageStatus = Literal["ran", "skipped", "failed", "not_run"]
_DISTRIBUTIONS = ("spark-train", "pyspark", "torch", "pyarrow", "numpy", "pandas")


class SummaryError(ValueError):
    """A file is not a run summary spark-train can read."""


class SummaryTooNew(SummaryError, NewerFormatError):
    """A run summary written by a newer spark-train (a higher ``format_version``)."""


def read_summary(uri: str) -> dict[str, Any]:
    """A run summary written by this or an earlier release; a newer one raises :class:`SummaryTooNew`."""
    fs, path = storage.resolve(uri)
    try:
        doc = json.loads(storage.read_bytes(fs, path))
    except (OSError, ValueError) as e:
        raise SummaryError(f"{uri} is not a readable run summary: {e}") from e
    if not isinstance(doc, dict) or "stages" not in doc:
        raise SummaryError(f"{uri} is not a run summary (no 'stages')")
    check_format_version(
        doc.get("format_version"),
        SUMMARY_FORMAT_VERSION,
        where=uri,
        writer=(doc.get("versions") or {}).get("spark-train"),
        newer=SummaryTooNew,
        invalid=SummaryError,
    )
    return doc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def one_line_error(exc: BaseException) -> str:
    """``Type: first line of the message`` — what the CLI prints and the summary records."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _finite(obj: Any) -> Any:
    """``obj`` with NaN / ±inf floats (a diverged loss) as None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a run depends on (None: absent)."""
    return {"python": platform.python_version(), **{d: _version(d) for d in _DISTRIBUTIONS}}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def default_summary_path(bundle_uri: str) -> str:
    """``run-summary.json`` beside the bundle (not inside it: a retrain replaces the bundle).

    ``out/model`` → ``out/run-summary.json``; ``s3://b/runs/model`` → ``s3://b/runs/run-summary.json``.
    """
    trimmed = bundle_uri.rstrip("/")
    if "/" not in trimmed:
        return SUMMARY_FILE
    return storage.join(trimmed.rsplit("/", 1)[0], SUMMARY_FILE)


@dataclass
class StageRecord:
    """One stage of a run: what happened, how long it took, what it counted."""

    name: str
    status: StageStatus = "not_run"
    started_at: str | None = None
    ended_at: str | None = None
    seconds: float | None = None
    reason: str | None = None
    """Why the stage was skipped (``status == "skipped"``)."""
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """One-line error of a failed stage."""

    def skip(self, reason: str) -> None:
        """Mark the stage as skipped (up to date) for ``reason``."""
        self.status, self.reason = "skipped", reason


class RunSummary:
    """Collects stage records while a run goes on and writes them as one JSON file."""

    def __init__(
        self,
        command: str,
        stages: Sequence[str],
        *,
        path: str | None,
        config: str | None = None,
        overrides: Sequence[str] = (),
        forced: Sequence[str] = (),
    ) -> None:
        """Start the clock; ``path`` may be set later (e.g. once the config is read)."""
        if len(set(stages)) != len(stages):
            raise ValueError(f"stage names must be unique, got {list(stages)}")
        self.path = path
        self.stages = {name: StageRecord(name) for name in stages}
        self._started = time.monotonic()
        self.doc: dict[str, Any] = {
            "format_version": SUMMARY_FORMAT_VERSION,
            "command": command,
            "status": "running",
            "exit_status": None,
            "error": None,
            "started_at": _now(),
            "ended_at": None,
            "seconds": None,
            "config": config,
            "overrides": list(overrides),
            "forced": sorted(forced),
            "metrics": {},
            "outputs": {},
            "spark": {},
            "versions": versions(),
            "host": socket.gethostname(),
        }

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time stage ``name``; ``ran`` unless the block calls ``skip``, ``failed`` if it raises."""
        record = self.stages[name]
        record.status, record.started_at = "ran", _now()
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.status, record.error = "failed", one_line_error(exc)
            raise
        finally:
            record.ended_at = _now()
            record.seconds = round(time.monotonic() - started, 3)

    def finish(self, exit_status: int, error: BaseException | None = None) -> None:
        """Record the end of the run: its exit status and, for a failure, the one-line error."""
        self.doc.update(
            status="succeeded" if exit_status == 0 else "failed",
            exit_status=exit_status,
            error=one_line_error(error) if error is not None else None,
            ended_at=_now(),
            seconds=round(time.monotonic() - self._started, 3),
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary document (plain JSON data)."""
        return {**self.doc, "stages": [asdict(s) for s in self.stages.values()]}

    def write(self) -> str:
        """Write the summary atomically to ``self.path`` (any pyarrow.fs URI); returns the path."""
        if self.path is None:
            raise ValueError("the run summary has no path to be written to")
        fs, path = storage.resolve(self.path)
        doc = _finite(self.to_dict())
        data = json.dumps(doc, indent=2, default=str, allow_nan=False).encode()
        storage.atomic_write_bytes(fs, path, data + b"\n")
        return self.path
