"""Input fingerprints, manifest assembly, the atomic commit and cleanup of old generations."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import pyspark
from pyspark.sql import DataFrame, SparkSession

from pipeline import __version__
from pipeline.core import storage
from pipeline.core.connect import is_connect
from pipeline.data.formats import DEFAULT_FORMAT
from pipeline.data.shardset import FORMAT_VERSION, MANIFEST_NAME, SPLITS, ShardInfo

__all__ = ["cleanup_generations", "commit_manifest", "fingerprint", "read_existing"]

log = logging.getLogger(__name__)
# Top-level entries of a shard set that hold per-generation data.
_GENERATIONAL = (*SPLITS, "quarantine", "features")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def input_listing(spark: SparkSession, df: DataFrame) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ms)`` of every input file, through the Hadoop FileSystem API.

    Works for any URI Spark can read (local, HDFS, S3A…); one ``listStatus`` per directory.
    """
    files = sorted(df.inputFiles())
    if is_connect(spark):  # no JVM gateway: stat the files through pyarrow.fs
        return _arrow_listing(files)
    jvm = spark.sparkContext._jvm
    assert jvm is not None, "fingerprinting runs on the driver"
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    hpath = jvm.org.apache.hadoop.fs.Path
    # inputFiles() and listStatus() spell URIs differently (file:///x vs file:/x): compare
    # the path component, per parent directory.
    by_dir: dict[str, set[str]] = {}
    for f in files:
        p = hpath(f)
        by_dir.setdefault(p.getParent().toString(), set()).add(p.toUri().getPath())
    out = []
    for parent, wanted in by_dir.items():
        path = hpath(parent)
        for st in path.getFileSystem(conf).listStatus(path):
            name = st.getPath().toUri().getPath()
            if name in wanted:
                out.append((name, int(st.getLen()), int(st.getModificationTime())))
    if len(out) != len(files):
        raise RuntimeError(
            f"could not stat every input file for the fingerprint ({len(out)} of {len(files)})"
        )
    return sorted(out)


def _arrow_listing(files: list[str]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ms)`` of ``files`` (Spark URIs) through pyarrow.fs."""
    out = []
    for uri in files:
        if uri.startswith("file:/") and not uri.startswith("file://"):
            uri = "file://" + uri[len("file:") :]
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.size is None or info.mtime_ns is None:
            raise RuntimeError(f"could not stat input file {uri} for the fingerprint")
        out.append((path, int(info.size), int(info.mtime_ns // 1_000_000)))
    return sorted(out)


def fingerprint(spark: SparkSession, df: DataFrame, etl_config: dict[str, Any]) -> dict[str, str]:
    """What makes a build up to date: the input files (path, size, mtime) and the config."""
    listing = input_listing(spark, df)
    fp_input = _digest(listing)
    fp_config = _digest(etl_config)
    return {
        "input": fp_input,
        "input_files": str(len(listing)),
        "config": fp_config,
        "combined": _digest([fp_input, fp_config, FORMAT_VERSION]),
    }


def read_existing(output: str) -> dict[str, Any] | None:
    """The committed manifest at ``output``, or None (absent or unreadable)."""
    fs, root = storage.resolve(output)
    path = storage.join(root, MANIFEST_NAME)
    if not storage.exists(fs, path):
        return None
    try:
        data = json.loads(storage.read_bytes(fs, path))
    except ValueError:
        log.warning("%s is not valid JSON; it will be replaced", path)
        return None
    return data if isinstance(data, dict) else None


def is_up_to_date(output: str, manifest: dict[str, Any] | None, combined: str) -> bool:
    """True when ``manifest`` has this fingerprint and every shard it lists has its size."""
    if manifest is None or manifest.get("fingerprint", {}).get("combined") != combined:
        return False
    fs, root = storage.resolve(output)
    for split in manifest.get("splits", {}).values():
        for sh in split["shards"]:
            info = fs.get_file_info(storage.join(root, sh["path"]))
            if info.size != sh["bytes"]:
                return False
    return True


def build_manifest(*, generation: str, **parts: Any) -> dict[str, Any]:
    """The manifest document (see DESIGN.md, "Shard set")."""
    splits: dict[str, list[ShardInfo]] = parts.pop("splits")
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"spark-train {__version__} (pyspark {pyspark.__version__})",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation": generation,
        "file_format": parts.pop("file_format", DEFAULT_FORMAT),
        **parts,
        "splits": {
            s: {
                "rows": sum(x.rows for x in splits[s]),
                "shards": [
                    {"path": x.path, "rows": x.rows, "bytes": x.bytes, "sha256": x.sha256}
                    for x in splits[s]
                ],
            }
            for s in SPLITS
        },
    }


def commit_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically: the single commit point of a build."""
    fs, root = storage.resolve(output)
    data = json.dumps(manifest, indent=2, sort_keys=False).encode()
    storage.atomic_write_bytes(fs, storage.join(root, MANIFEST_NAME), data)


def cleanup_generations(output: str, keep: str) -> int:
    """Delete data of every generation but ``keep`` (old builds, interrupted builds).

    Runs only after the new manifest is committed. Returns the number of entries removed.
    """
    fs, root = storage.resolve(output)
    removed = 0
    for top in _GENERATIONAL:
        for entry in storage.list_dir(fs, storage.join(root, top)):
            if keep in entry.base_name:
                continue
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
            removed += 1
    return removed
