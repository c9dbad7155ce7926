"""The shard-set format: what the ETL writes and what the reader and scorer trust.

A shard set is a directory (local path or any ``pyarrow.fs`` URI) whose commit point is
``manifest.json``. A directory without one is refused. Paths inside the manifest are
relative to the shard-set root. Shard files carry a generation suffix
(``train/part-00000-<gen>.parquet``) so that a rebuild into the same directory writes new
files beside the old ones and replaces the old commit with one atomic manifest write:
a reader holding the previous manifest still finds every file it names until cleanup.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.core.compat import NewerFormatError, check_format_version, written_by
from pipeline.data.columns import ColumnSpec
from pipeline.data.manifest import (
    DEFAULT_FILE_FORMAT,
    Manifest,
    ShardInfo,
    SplitInfo,
)

__all__ = [
    "DEFAULT_FILE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "ShardInfo",
    "ShardSet",
    "ShardSetError",
    "ShardSetTooNew",
    "SplitInfo",
]

FORMAT_VERSION = 2
# Version 1: tensor columns as Parquet fixed_size_list; 2: as fixed_size_binary (same reader).
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
FEATURES_COLUMN = "features"
LABEL_COLUMN = "label"
KEY_COLUMN = "key"
# Files under this size are sha256-verified by default (``verify: auto``).
FULL_VERIFY_LIMIT_BYTES = 1 << 30


class ShardSetError(RuntimeError):
    """A shard set is missing, uncommitted, or does not match its manifest."""


class ShardSetTooNew(ShardSetError, NewerFormatError):
    """The manifest was written by a newer spark-train (a higher ``format_version``)."""


class ShardSet:
    """A committed shard set, opened from its manifest."""

    def __init__(self, uri: str, manifest: dict[str, Any]) -> None:
        self.uri = uri
        self.fs, self.root = storage.resolve(uri)
        self.manifest = manifest
        # Every version up to FORMAT_VERSION is read; a newer one says who wrote it.
        self.format_version = check_format_version(
            manifest.get("format_version"),
            FORMAT_VERSION,
            where=storage.join(uri, MANIFEST_NAME),
            writer=written_by(manifest.get("created_by")),
            newer=ShardSetTooNew,
            invalid=ShardSetError,
        )
        try:
            self.info: Manifest = Manifest.from_json(manifest)
            """The manifest, typed (:class:`~pipeline.data.manifest.Manifest`)."""
        except (KeyError, TypeError, ValueError) as e:
            raise ShardSetError(
                f"{storage.join(uri, MANIFEST_NAME)} is malformed: {type(e).__name__}: {e}"
            ) from e
        self.splits: dict[str, SplitInfo] = dict(self.info.splits)

    @classmethod
    def open(cls, uri: str) -> ShardSet:
        """Open the shard set at ``uri``; refuse a directory without a committed manifest."""
        fs, root = storage.resolve(uri)
        path = storage.join(root, MANIFEST_NAME)
        if not storage.exists(fs, path):
            raise ShardSetError(
                f"{uri} is not a committed shard set: {MANIFEST_NAME} is missing "
                "(the ETL writes it last; an interrupted ETL leaves none)"
            )
        try:
            manifest = json.loads(storage.read_bytes(fs, path))
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardSetError(f"{storage.join(uri, MANIFEST_NAME)} is not valid JSON: {e}") from e
        return cls(uri, manifest)

    # -- schema ---------------------------------------------------------------
    @property
    def file_format(self) -> str:
        """The name of the shard file format (its code: :func:`pipeline.data.formats.format_of`)."""
        return self.info.shard_format

    @property
    def row_group_rows(self) -> int:
        """Rows per row group as the ETL wrote them (TFRecord readers cut pieces of this size)."""
        return self.info.group_rows

    @property
    def columns(self) -> tuple[ColumnSpec, ...]:
        """Every column of the shard files, from the manifest's ``schema``."""
        try:
            return self.info.columns
        except ValueError as e:
            raise ShardSetError(f"{storage.join(self.uri, MANIFEST_NAME)}: {e}") from e

    def column_spec(self, name: str) -> ColumnSpec:
        """The :class:`~pipeline.data.columns.ColumnSpec` of one column."""
        for c in self.columns:
            if c.name == name:
                return c
        raise ShardSetError(f"{self.uri}: manifest schema has no column {name!r}")

    def column(self, name: str) -> dict[str, Any]:
        """The schema entry ``{name, dtype, shape}`` of one column."""
        return self.column_spec(name).to_manifest()

    @property
    def feature_dim(self) -> int:
        """Length of the fixed-size ``features`` vector."""
        spec = self.column_spec(FEATURES_COLUMN)
        if len(spec.shape) != 1:
            raise ShardSetError(
                f"{self.uri}: manifest column {FEATURES_COLUMN!r} has shape {list(spec.shape)}; "
                "expected one dimension"
            )
        return spec.shape[0]

    @property
    def feature_names(self) -> list[str]:
        """Name of each position of the feature vector."""
        return list(self.info.feature_names)

    @property
    def task(self) -> str:
        """``classification`` or ``regression``."""
        return self.info.label.task

    @property
    def classes(self) -> list[Any]:
        """Original class values, in the order of the integer codes stored in shards."""
        return list(self.info.label.classes or [])

    @property
    def features_model_uri(self) -> str:
        """URI of the fitted Spark ML ``PipelineModel``."""
        if self.info.features_model is None:
            raise ShardSetError(f"{self.uri}: the manifest names no features_model")
        return storage.join(self.uri, self.info.features_model)

    def split(self, name: str) -> SplitInfo:
        """One split; a clear error names the splits that exist."""
        if name not in self.splits:
            raise ShardSetError(
                f"{self.uri}: no split {name!r} (has: {', '.join(sorted(self.splits))})"
            )
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> str:
        """Filesystem path (for :attr:`fs`) of a shard."""
        return storage.join(self.root, shard.path)

    def shard_uri(self, shard: ShardInfo) -> str:
        """The shard as users should see it in messages (under the URI the set was opened with)."""
        return storage.join(self.uri, shard.path)

    # -- verification ---------------------------------------------------------
    def check_split_rows(self, name: str) -> SplitInfo:
        """The split, once its declared rows equal its shards' (``ShardSetError`` otherwise)."""
        split = self.split(name)
        listed = sum(s.rows for s in split.shards)
        if listed != split.rows:
            raise ShardSetError(
                f"{self.uri}/manifest.json: split {name!r} says {split.rows} rows but its "
                f"shards add up to {listed}"
            )
        return split

    def check_shard_rows(self, shard: ShardInfo, rows: int, counted_by: str) -> None:
        """``rows``, as the file's ``counted_by`` (footer, index) says, match the manifest's."""
        if rows != shard.rows:
            raise ShardSetError(
                f"shard {self.shard_uri(shard)} has {rows} rows in its {counted_by}, the "
                f"manifest says {shard.rows} (the manifest does not match the files)"
            )

    def verify_shards(
        self, shards: list[ShardInfo] | tuple[ShardInfo, ...], mode: str = "auto"
    ) -> None:
        """Check shards against the manifest: existence and size always, sha256 per ``mode``.

        ``mode`` is ``size`` (size only), ``full`` (sha256 of every file) or ``auto``
        (sha256 for files under 1 GiB). Raises :class:`ShardSetError` naming the file.
        """
        if mode not in ("size", "full", "auto"):
            raise ValueError(f"verify mode must be size, full or auto, got {mode!r}")
        for shard in shards:
            verify_one(self.fs, self.shard_path(shard), shard, mode, display=self.shard_uri(shard))


def verify_one(fs: pafs.FileSystem, path: str, shard: ShardInfo, mode: str, display: str) -> None:
    """Verify one shard file against its manifest entry (see :meth:`ShardSet.verify_shards`)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ShardSetError(f"shard {display} is missing (listed in the manifest)")
    if info.size != shard.bytes:
        raise ShardSetError(
            f"shard {display} has {info.size} bytes, the manifest says {shard.bytes} "
            "(truncated or replaced after the ETL committed)"
        )
    full = mode == "full" or (mode == "auto" and shard.bytes < FULL_VERIFY_LIMIT_BYTES)
    if full:
        digest, _ = storage.sha256_file(fs, path)
        if digest != shard.sha256:
            raise ShardSetError(
                f"shard {display} is corrupt: sha256 {digest[:16]}… does not match the "
                f"manifest's {shard.sha256[:16]}…"
            )
