"""Input fingerprints, manifest assembly, the atomic commit and cleanup of old generations."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import pyspark
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.core import storage
from pipeline.core.version import __version__
from pipeline.data.formats import DEFAULT_FORMAT
from pipeline.data.manifest import Manifest, ShardInfo, SplitInfo
from pipeline.data.shardset import FORMAT_VERSION, MANIFEST_NAME, SPLITS
from preprocessing.config import EtlConfig
from preprocessing.read import RawInput
from preprocessing.read.listing import list_input_files

__all__ = [
    "cleanup_generations",
    "commit_manifest",
    "content_digest",
    "fingerprint",
    "read_existing",
]

log = logging.getLogger(__name__)
# Top-level entries of a shard set that hold per-generation data.
_GENERATIONAL = (*SPLITS, "quarantine", "features")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(df: DataFrame) -> tuple[str, int]:
    """An order-independent digest of every row of ``df`` and its row count, in one Spark pass.

    Per row, two independent hashes of all columns (``xxhash64`` and Murmur3 ``hash``; map
    columns as JSON, which Spark's hashes refuse) are summed as exact decimals: equal for the
    same multiset of rows in any order or partitioning, different when a value, a row or a
    duplicate changes. The schema is part of the digest.
    """
    cols = [
        F.to_json(F.col(f.name)) if isinstance(f.dataType, T.MapType) else F.col(f.name)
        for f in df.schema.fields
    ]
    total = "decimal(38,0)"
    row = df.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64(*cols).cast(total)).alias("x"),
        F.sum(F.hash(*cols).cast(total)).alias("m"),
    ).first()
    assert row is not None
    n = int(row["n"])
    return _digest([df.schema.simpleString(), n, str(row["x"]), str(row["m"])]), n


def fingerprint(raw: RawInput, cfg: EtlConfig, etl_config: dict[str, Any]) -> dict[str, str]:
    """What makes a build up to date: the input and the config.

    File inputs (csv, json, parquet, image_folder) are fingerprinted by their listing —
    path, size and modification time of every file (:mod:`preprocessing.read.listing`, on
    the driver, no JVM call) — without reading them. A ``table`` input (a catalog table, or a
    view over files, in-memory data or a query) has no listing that tells whether its rows
    changed, so it is fingerprinted by content (:func:`content_digest`: one aggregation over
    the table on every run, cheaper than the ETL it may skip; a replaced temp view is rebuilt).
    """
    if cfg.input.format == "table":
        # the declared columns only: an undeclared one neither matters nor need be hashable
        declared = [c for c in cfg.schema if c in raw.df.columns]
        fp_input, n = content_digest(raw.df.select(*declared))
        count = {"input_kind": "content", "input_rows": str(n)}
    else:
        files = raw.files
        if files is None:
            files = tuple(list_input_files(cfg.input.path, cfg.input.options))
        fp_input = _digest([(f.path, f.size, f.mtime_ms) for f in files])
        count = {"input_kind": "files", "input_files": str(len(files))}
    fp_config = _digest(etl_config)
    return {
        "input": fp_input,
        **count,
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
    try:
        splits = Manifest.from_json(manifest).splits
    except (KeyError, TypeError, ValueError):  # malformed: rebuilt
        return False
    fs, root = storage.resolve(output)
    for split in splits.values():
        for shard in split.shards:
            if fs.get_file_info(storage.join(root, shard.path)).size != shard.bytes:
                return False
    return True


def build_manifest(
    *,
    generation: str,
    splits: Mapping[str, list[ShardInfo]],
    file_format: str = DEFAULT_FORMAT,
    **parts: Any,
) -> Manifest:
    """The manifest of a build: its generation, shards and ``parts`` (:class:`Manifest` fields)."""
    return Manifest(
        format_version=FORMAT_VERSION,
        created_by=f"spark-train {__version__} (pyspark {pyspark.__version__})",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=generation,
        file_format=file_format,
        splits={s: SplitInfo(s, sum(x.rows for x in splits[s]), tuple(splits[s])) for s in SPLITS},
        **parts,
    )


def commit_manifest(output: str, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically: the single commit point of a build."""
    fs, root = storage.resolve(output)
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=False).encode()
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
