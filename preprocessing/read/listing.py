"""The files of a file input, listed with ``pyarrow.fs`` on the driver (no JVM gateway).

The ETL needs the input's files twice: the fingerprint (path, size, modification time of
every file, :mod:`preprocessing.manifest`) and, for ``image_folder``, the zero-byte files
Spark's scans skip plus the totals that size the partitions (:mod:`preprocessing.read.images`).
One recursive listing (``FileSelector``; a single directory walk locally, paginated listings
on object stores) gives all three for local paths, ``file:``, ``hdfs://``, ``s3://`` /
``s3a://`` and ``gs://`` URIs, so it works the same under a classic session and Spark
Connect, and costs no per-file round trip to the JVM.

Which files count follows Spark's file sources: a file given directly is the input; a
directory is walked recursively, skipping every file or directory whose name starts with
``.`` or with ``_`` (unless it holds ``=``, a partition directory), like Spark's hidden
files; ``pathGlobFilter`` (in ``etl.input.options``) filters file names; a path with glob
characters (``*``, ``?``, ``[``) is matched component by component below its longest plain
prefix. Paths are spelled as Spark spells them (``file:/x`` for local files, ``s3a://b/k``
as given), so they match the ``binaryFile`` source's ``path`` column.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.core import storage

__all__ = ["InputFile", "InputNotFoundError", "list_input_files"]

_GLOB = frozenset("*?[")


class InputNotFoundError(FileNotFoundError):
    """The input path does not exist (a config mistake: see :mod:`preprocessing.read.missing`)."""


@dataclass(frozen=True, order=True)
class InputFile:
    """One input file: its path as Spark spells it, size in bytes, mtime in ms since the epoch."""

    path: str
    size: int
    mtime_ms: int


def _hidden(name: str) -> bool:
    """Spark's rule for files and directories its file sources skip."""
    if name.startswith(("_metadata", "_common_metadata")):
        return False
    return (name.startswith("_") and "=" not in name) or name.startswith(".")


def _resolve(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """``(filesystem, path, prefix)``: ``prefix + path`` is how Spark spells a listed path."""
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = uri[len("file:") :]  # Spark's file:/x spelling
    parsed = urlparse(uri)
    if parsed.scheme in ("s3a", "s3n"):
        fs, path = storage.resolve("s3://" + uri.split("://", 1)[1])
        return fs, path, f"{parsed.scheme}://"
    fs, path = storage.resolve(uri)
    if "://" not in uri or parsed.scheme == "file":
        return fs, path, "file:"
    if path.startswith("/"):  # hdfs://host:port/x → /x
        return fs, path, f"{parsed.scheme}://{parsed.netloc}"
    return fs, path, f"{parsed.scheme}://"  # s3://bucket/key, gs://bucket/key → bucket/key


def _split_glob(path: str) -> tuple[str, list[str]]:
    """The longest leading part of ``path`` without glob characters, and the rest's parts."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _GLOB & set(part):
            return "/".join(parts[:i]) or "/", parts[i:]
    return path, []


def _visible(rel: str, pattern: list[str], name_glob: str | None) -> bool:
    """Whether a file at ``rel`` (below the listing root) is one Spark reads."""
    parts = rel.split("/")
    if pattern:
        if len(parts) < len(pattern) or not all(
            fnmatch.fnmatchcase(p, g) for p, g in zip(parts, pattern, strict=False)
        ):
            return False
        parts = parts[len(pattern) - 1 :]  # hidden names count below what the glob matched
    if any(_hidden(p) for p in parts):
        return False
    return name_glob is None or fnmatch.fnmatchcase(parts[-1], name_glob)


def list_input_files(uri: str, options: Mapping[str, str] | None = None) -> list[InputFile]:
    """Every file Spark's file sources read for ``uri`` (see the module docstring), sorted.

    ``options`` are the input's reader options; ``pathGlobFilter`` is honoured. A missing
    path gives :class:`InputNotFoundError` (a FileNotFoundError) naming it.
    """
    fs, path, prefix = _resolve(uri)
    name_glob = (options or {}).get("pathGlobFilter")
    root, pattern = _split_glob(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputNotFoundError(f"input path {uri!r} does not exist")
    if info.type == pafs.FileType.File and not pattern:
        return [InputFile(prefix + info.path, int(info.size), _mtime_ms(info))]
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    base = root.rstrip("/") + "/"
    out = [
        InputFile(prefix + e.path, int(e.size), _mtime_ms(e))
        for e in entries
        if e.type == pafs.FileType.File
        and _visible(
            e.path[len(base) :] if e.path.startswith(base) else e.base_name, pattern, name_glob
        )
    ]
    return sorted(out)


def _mtime_ms(info: pafs.FileInfo) -> int:
    ns = info.mtime_ns
    return 0 if ns is None else int(ns) // 1_000_000
