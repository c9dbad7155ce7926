"""The shard-set manifest as types: :class:`Manifest`, written by the ETL, read by everyone else.

``manifest.json`` is the commit point of a shard set (:mod:`pipeline.data.shardset`). The ETL
builds a :class:`Manifest` and commits :meth:`Manifest.to_json`; a reader gets one from
:meth:`Manifest.from_json`, which takes every ``format_version`` this release reads — entries
that older writers did not record are ``None`` (and stay absent when written back), entries
this release does not know are kept in :attr:`Manifest.extra`. The JSON document is the
format; these types are its one reading.

The nested parts that are free-form by design stay plain JSON values: the redacted ETL
``config``, the column ``schema`` entries (:attr:`Manifest.columns` parses them),
``feature_stats``, ``fingerprint`` and ``timings_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from pipeline.data.columns import ColumnSpec, columns_from_manifest

__all__ = ["Label", "Manifest", "Quarantine", "Reconciliation", "ShardInfo", "SplitInfo"]

DEFAULT_FILE_FORMAT: Final = "parquet"
DEFAULT_ROW_GROUP_ROWS: Final = 65536
_KNOWN: Final = (
    "format_version", "created_by", "created_at", "generation", "file_format", "config",
    "fingerprint", "schema", "feature_names", "label", "row_group_rows", "quarantine",
    "reconciliation", "feature_stats", "features_model", "text", "timings_s", "splits",
)  # fmt: skip
# Written whatever their value (created_by, for one, may be null in a hand-made manifest).
_REQUIRED: Final = (
    "format_version", "created_by", "generation", "config", "fingerprint", "schema",
    "feature_names", "label",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard file as the manifest records it (``path`` is relative to the root)."""

    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class SplitInfo:
    """All shards of one split."""

    name: str
    rows: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True, slots=True)
class Label:
    """The label column: its name, the task, and for classification the classes in code order."""

    column: str | None
    task: str
    classes: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Rows the ETL set aside, by reason and by column, and where they were written."""

    rows: int
    by_reason: Mapping[str, int]
    by_column: Mapping[str, int]
    path: str | None


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """``rows_in == rows_ok + rows_quarantined``: every input row is accounted for."""

    rows_in: int
    rows_ok: int
    rows_quarantined: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """One shard set's manifest (see the module docstring)."""

    format_version: int
    created_by: str | None
    generation: str
    label: Label
    splits: Mapping[str, SplitInfo]
    config: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: Mapping[str, str] = field(default_factory=dict)
    schema: tuple[Mapping[str, Any], ...] = ()
    feature_names: tuple[str, ...] = ()
    features_model: str | None = None
    file_format: str | None = None
    row_group_rows: int | None = None
    created_at: str | None = None
    quarantine: Quarantine | None = None
    reconciliation: Reconciliation | None = None
    feature_stats: Mapping[str, Any] | None = None
    text: Mapping[str, Mapping[str, int]] | None = None
    timings_s: Mapping[str, float] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Entries this release does not know (a newer minor writer's), kept as they were."""

    @property
    def columns(self) -> tuple[ColumnSpec, ...]:
        """The column specs of ``schema`` (``ValueError`` for a malformed entry)."""
        return columns_from_manifest(list(self.schema))

    @property
    def shard_format(self) -> str:
        """``file_format``, or Parquet for a manifest that names none."""
        return self.file_format or DEFAULT_FILE_FORMAT

    @property
    def group_rows(self) -> int:
        """``row_group_rows``, or the default for a manifest that does not record it."""
        return self.row_group_rows or DEFAULT_ROW_GROUP_ROWS

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        """The manifest of a parsed ``manifest.json`` (``KeyError`` / ``TypeError`` if malformed)."""
        label = doc["label"]
        classes = label.get("classes")
        quarantine, rec = doc.get("quarantine"), doc.get("reconciliation")
        return cls(
            format_version=int(doc["format_version"]),
            created_by=doc.get("created_by"),
            generation=str(doc.get("generation", "")),
            label=Label(
                label.get("column"),
                str(label["task"]),
                None if classes is None else tuple(classes),
            ),
            splits={
                name: SplitInfo(name, int(s["rows"]), tuple(ShardInfo(**sh) for sh in s["shards"]))
                for name, s in doc["splits"].items()
            },
            config=doc.get("config") or {},
            fingerprint=doc.get("fingerprint") or {},
            schema=tuple(doc.get("schema") or ()),
            feature_names=tuple(doc.get("feature_names") or ()),
            features_model=doc.get("features_model"),
            file_format=doc.get("file_format"),
            row_group_rows=doc.get("row_group_rows"),
            created_at=doc.get("created_at"),
            quarantine=None if quarantine is None else Quarantine(**quarantine),
            reconciliation=None if rec is None else Reconciliation(**rec),
            feature_stats=doc.get("feature_stats"),
            text=doc.get("text"),
            timings_s=doc.get("timings_s"),
            extra={k: v for k, v in doc.items() if k not in _KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        """The ``manifest.json`` document, entries in the order the ETL has always written.

        An optional entry that is ``None`` (an older writer left it out) stays out.
        """
        label = {
            **({} if self.label.column is None else {"column": self.label.column}),
            "task": self.label.task,
            "classes": None if self.label.classes is None else list(self.label.classes),
        }
        values: dict[str, Any] = {
            "format_version": self.format_version,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "generation": self.generation,
            "file_format": self.file_format,
            "config": dict(self.config),
            "fingerprint": dict(self.fingerprint),
            "schema": [dict(e) for e in self.schema],
            "feature_names": list(self.feature_names),
            "label": label,
            "row_group_rows": self.row_group_rows,
            "quarantine": None if self.quarantine is None else asdict(self.quarantine),
            "reconciliation": None if self.reconciliation is None else asdict(self.reconciliation),
            "feature_stats": self.feature_stats,
            "features_model": self.features_model,
            "text": self.text,
            "timings_s": self.timings_s,
        }
        doc = {k: values[k] for k in _KNOWN[:-1] if k in _REQUIRED or values[k] is not None}
        return {**doc, **self.extra, "splits": {n: _split(s) for n, s in self.splits.items()}}


def _split(split: SplitInfo) -> dict[str, Any]:
    return {
        "rows": split.rows,
        "shards": [
            {"path": s.path, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256}
            for s in split.shards
        ],
    }
