"""Filesystem access through ``pyarrow.fs``: local paths and any URI pyarrow knows (hdfs://, s3://, gs://).

Every writer in the project that must be atomic goes through :func:`atomic_write_bytes`
(one file) or :func:`atomic_dir` (a directory of files), so the rule "write to a temporary
name, then rename" lives in one place.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, cast

import pyarrow.fs as pafs

__all__ = [
    "TMP_PREFIX",
    "HashingWriter",
    "atomic_dir",
    "atomic_write_bytes",
    "exists",
    "join",
    "list_dir",
    "read_bytes",
    "resolve",
    "sha256_file",
    "sha256_stream",
]

# Object stores have no rename, but a single PUT is atomic: write the final name directly.
_OBJECT_STORES = frozenset({"s3", "gcs"})
_HASH_CHUNK = 1 << 20
# Name prefix of everything written under a temporary name; listings skip these.
TMP_PREFIX = ".tmp-"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI (``file://``, ``hdfs://``, ``s3://``…)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path components with ``/`` (pyarrow paths are always slash-separated)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` names a file or a directory."""
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Entries directly under ``path``; an absent directory lists as empty."""
    if not exists(fs, path):
        return []
    return list(fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a (small) file."""
    with fs.open_input_stream(path) as f:
        return cast(bytes, f.read())


def _is_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in _OBJECT_STORES


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if _is_object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        if exists(fs, tmp):
            fs.delete_file(tmp)
        raise


@contextmanager
def atomic_dir(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """Yield a directory to fill; it appears at ``path`` complete, or not at all.

    Where the filesystem can rename, the directory is a temporary sibling
    (``.tmp-<uuid>-<name>``) renamed to ``path`` when the block exits cleanly, replacing an
    existing ``path``; if the block raises, it is deleted. Object stores cannot rename a
    directory: there an existing ``path`` is emptied and the files go to ``path`` directly,
    so the caller must write a marker file last and readers must treat a directory without
    the marker as incomplete.
    """
    parent, name = path.rstrip("/").rsplit("/", 1)
    if _is_object_store(fs):
        if exists(fs, path):
            fs.delete_dir_contents(path)
        fs.create_dir(path, recursive=True)
        yield path
        return
    tmp = join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    fs.create_dir(tmp, recursive=True)
    try:
        yield tmp
        _replace_dir(fs, tmp, path)
    except BaseException:
        if exists(fs, tmp):
            fs.delete_dir(tmp)
        raise


def _replace_dir(fs: pafs.FileSystem, new: str, final: str) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    if not exists(fs, final):
        fs.move(new, final)
        return
    parent, name = final.rsplit("/", 1)
    old = join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-old-{name}")
    fs.move(final, old)
    fs.move(new, final)
    fs.delete_dir(old)


def sha256_stream(stream: IO[bytes] | pafs.NativeFile) -> tuple[str, int]:
    """Hex sha256 and byte count of everything left in ``stream``."""
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = stream.read(_HASH_CHUNK)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_file(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """Hex sha256 and size of one file."""
    with fs.open_input_stream(path) as f:
        return sha256_stream(f)


class HashingWriter:
    """File-like wrapper computing sha256 and size of the bytes written."""

    def __init__(self, raw: pafs.NativeFile) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()
