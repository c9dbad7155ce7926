"""Where stages may write: rules that keep writes and deletes inside the configured outputs.

Stages do not only write under their output, they also delete there — old shard
generations (``etl.output``), the previous bundle, replaced as a whole (``train.output``),
old checkpoints (``train.checkpoint.dir``). A mistyped or hostile path must not reach other
files, so every output obeys four rules (errors are :class:`ConfigError` naming the key):

1. **No climbing ``..``** in an output URI (checked with the config): a path means what it
   says, it is not walked out of through a directory it names (leading ``..`` of a relative
   local path, as in ``../out``, is fine).
2. **No symlinks** (local filesystems): the output itself and every entry directly under it
   must not be a symlink, since writes and deletes would follow it elsewhere. Symlinks in
   *parent* directories are fine (``/tmp`` → ``/private/tmp``).
3. **Empty or ours**: an existing output must be a directory that is empty or was written by
   this stage — a shard set, a bundle, a checkpoint directory — recognized by its entries.
   Anything else (a home directory, a project checkout, another tool's output) is refused
   rather than replaced or mixed into.
4. **No overlap**: ``train.output``, ``train.checkpoint.dir`` and ``train.dataset`` are
   distinct and not nested in one another (the bundle replaces its whole directory); the
   shard set is not inside the ETL's input (the next run would read it back).

Spark-free.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Mapping
from typing import Final

import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.core.configbase import ConfigError

__all__ = [
    "OWNED",
    "check_disjoint",
    "check_output_dir",
    "check_output_uri",
]

_STEP_DIR: Final = re.compile(r"step-\d{12}")
_GLOB: Final = re.compile(r"[*?\[{]")


def _shardset_entries(names: set[str]) -> bool:
    return "manifest.json" in names or names <= {"train", "val", "test", "quarantine", "features"}


def _bundle_entries(names: set[str]) -> bool:
    return "model.json" in names or names <= {
        "model.safetensors",
        "metrics.json",
        "config.yaml",
        "features",
    }


# pipeline.train.modes.average keeps per-worker states and its DDP warm-up in these subdirectories.
_CHECKPOINT_SUBDIRS: Final = frozenset({"workers", "ddp-warmup"})


def _checkpoint_entries(names: set[str]) -> bool:
    return all(_STEP_DIR.fullmatch(n) or n in _CHECKPOINT_SUBDIRS for n in names)


def _table_entries(names: set[str]) -> bool:
    """A directory Spark wrote (part files, _SUCCESS, checksums, its _temporary)."""
    return all(n.startswith(("part-", "_", ".part-", "._")) for n in names)


OWNED: Final[Mapping[str, Callable[[set[str]], bool]]] = {
    "shardset": _shardset_entries,
    "bundle": _bundle_entries,
    "checkpoints": _checkpoint_entries,
    "table": _table_entries,
}
"""What a directory written by each kind of stage may contain (``.tmp-*`` entries aside)."""


def check_output_uri(key: str, uri: str) -> None:
    """Rule 1: refuse a ``..`` that climbs out of a named directory (``ConfigError(key)``).

    Leading ``..`` segments of a relative local path (``../out``, run from a subdirectory)
    are allowed: they name a place, they do not walk out of one.
    """
    scheme, sep, rest = uri.partition("://")
    path = (rest if sep else scheme).replace("\\", "/")
    segments = [s for s in path.split("/") if s not in ("", ".")]
    leading = (
        0
        if (sep or path.startswith("/"))
        else len(segments) - len(list(itertools.dropwhile(lambda s: s == "..", segments)))
    )
    if ".." in segments[leading:]:
        raise ConfigError(
            key,
            f"{uri!r} climbs out of a directory with '..'; output paths may not "
            "(write the path without '..')",
        )


def check_output_dir(key: str, uri: str, kind: str) -> None:
    """Rules 2 and 3 for the existing output ``uri`` of a ``kind`` in :data:`OWNED`.

    A missing output is fine (the stage creates it). Raises ``ConfigError(key)``.
    """
    check_output_uri(key, uri)
    owned = OWNED[kind]
    fs, path = storage.resolve(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and os.path.islink(path):
        raise ConfigError(
            key,
            f"{uri} is a symlink (to {os.readlink(path)}); writes and deletes would follow it: "
            f"set {key} to the real directory",
        )
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise ConfigError(key, f"{uri} exists and is not a directory")
    entries = storage.list_dir(fs, path)
    if local:
        links = [e.base_name for e in entries if os.path.islink(e.path)]
        if links:
            raise ConfigError(
                key,
                f"{uri} holds symlink(s) {sorted(links)}; writes and deletes would follow "
                "them outside the output: remove them",
            )
    names = {e.base_name for e in entries if not e.base_name.startswith(storage.TMP_PREFIX)}
    if names and not owned(names):
        shown = ", ".join(sorted(names)[:5]) + (", …" if len(names) > 5 else "")
        raise ConfigError(
            key,
            f"{uri} is not empty and does not look like a {kind} directory (it holds: "
            f"{shown}); refusing to write into it: choose a new or empty directory",
        )


def _normalized(uri: str) -> str:
    """A comparable form: a resolved absolute path, or the URI without trailing slashes."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    path = uri.removeprefix("file://")
    prefix = _GLOB.split(path, 1)[0]
    if prefix != path:  # a glob: compare the directory it starts in
        path = prefix.rsplit("/", 1)[0] or "/"
    return os.path.realpath(path)


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_disjoint(outputs: Mapping[str, str], inputs: Mapping[str, str] | None = None) -> None:
    """Rule 4: no two ``outputs`` (key → URI) equal or nested; no output inside an input.

    Raises ``ConfigError`` naming the first key of the offending pair.
    """
    norm = {k: _normalized(v) for k, v in outputs.items()}
    keys = list(norm)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if _inside(norm[a], norm[b]) or _inside(norm[b], norm[a]):
                raise ConfigError(
                    a,
                    f"{outputs[a]!r} and {b} {outputs[b]!r} overlap (the same directory or "
                    "one inside the other); each stage replaces or prunes its own directory: "
                    "give them separate directories",
                )
    for ikey, ivalue in (inputs or {}).items():
        inp = _normalized(ivalue)
        for okey, out in norm.items():
            if _inside(out, inp):
                raise ConfigError(
                    okey,
                    f"{outputs[okey]!r} is inside {ikey} {ivalue!r}; a later run would read "
                    "its own output back as input: write it elsewhere",
                )
