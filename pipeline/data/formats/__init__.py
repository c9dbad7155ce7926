"""The shard file formats, by the name a manifest records as ``file_format``.

One registry (like mosaicml streaming's format table): :data:`FORMATS` maps a name to a
:class:`~pipeline.data.formats.base.ShardFormat` — the executors' writer, the
:class:`~pipeline.data.reader.ShardReader`'s row-group index and decoder, and preflight's row
count. Code outside ``pipeline/data`` asks the registry (:func:`get_format`, or
:func:`format_of` for an opened shard set) and never tests a format's name.

Adding a format: implement :class:`~pipeline.data.formats.base.ShardFormat` in a module
here, add an instance to :data:`FORMATS` and its name to :data:`FormatName` (the type of
``etl.format``; the two are checked against each other on import).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

from pipeline.data.formats.base import RowGroupIndex, ShardFormat, ShardWriter, WrittenShard
from pipeline.data.formats.parquet import ParquetFormat
from pipeline.data.formats.tfrecord import TFRecordFormat
from pipeline.data.shardset import DEFAULT_FILE_FORMAT, MANIFEST_NAME, ShardSet, ShardSetError

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "FormatName",
    "RowGroupIndex",
    "ShardFormat",
    "ShardWriter",
    "UnknownFormatError",
    "WrittenShard",
    "format_names",
    "format_of",
    "get_format",
]

FormatName = Literal["parquet", "tfrecord"]
"""The names of :data:`FORMATS` as a type (``etl.format``)."""

FORMATS: Final[Mapping[str, ShardFormat]] = MappingProxyType(
    {f.name: f for f in (ParquetFormat(), TFRecordFormat())}
)
"""Every shard format, by name."""

DEFAULT_FORMAT: Final = DEFAULT_FILE_FORMAT
"""The format of a manifest that names none, and ``etl.format``'s default."""

if set(get_args(FormatName)) != set(FORMATS) or DEFAULT_FORMAT not in FORMATS:
    raise ImportError(f"FormatName {get_args(FormatName)} does not match FORMATS {list(FORMATS)}")


class UnknownFormatError(ValueError):
    """A format name that is not in :data:`FORMATS`."""


def format_names() -> tuple[str, ...]:
    """The names of the known formats, sorted."""
    return tuple(sorted(FORMATS))


def get_format(name: str) -> ShardFormat:
    """The format registered as ``name``; :class:`UnknownFormatError` lists the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in format_names())
        raise UnknownFormatError(
            f"unknown shard file format {name!r} (known formats: {known})"
        ) from None


def format_of(shards: ShardSet) -> ShardFormat:
    """The format of a shard set's files; ShardSetError naming its manifest for an unknown one."""
    try:
        return get_format(shards.file_format)
    except UnknownFormatError as e:
        raise ShardSetError(f"{shards.uri}/{MANIFEST_NAME}: {e}") from e
