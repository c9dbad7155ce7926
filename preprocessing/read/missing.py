"""A missing input is a config mistake: one :class:`ConfigError` naming the key or flag.

Every way an input can be missing ends here, whoever reads it (the ETL's reader, the
``etl`` stage of the CLI, scoring's ``--input``):

- Spark's ``PATH_NOT_FOUND`` (a file input: csv, json, parquet; a glob matching nothing);
- Spark's ``TABLE_OR_VIEW_NOT_FOUND`` (a ``table`` input naming no table or view);
- :class:`~preprocessing.read.listing.InputNotFoundError`, the driver-side listing's
  (``image_folder`` inputs, and the fingerprint of every file input).

The error names the key (``etl.input.path``) or flag (``--input``) and keeps the first line
of the underlying message, which names the path or table; the CLI exits 2 on it. Under Spark
Connect a missing path may surface only when the plan is analysed, so callers wrap all the
work that reads the input, not just the call that names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.errors import AnalysisException

from pipeline.core.configbase import ConfigError
from preprocessing.read.listing import InputNotFoundError

__all__ = ["NOT_FOUND_CONDITIONS", "missing_input_as_config_error"]

NOT_FOUND_CONDITIONS = ("PATH_NOT_FOUND", "TABLE_OR_VIEW_NOT_FOUND")
"""Spark's error conditions for an input that does not exist."""


@contextmanager
def missing_input_as_config_error(key: str) -> Iterator[None]:
    """Inside the block, a missing input raises :class:`ConfigError` for ``key``.

    ``key`` is the config key or CLI flag that named the input. Every other error passes
    through unchanged.
    """
    try:
        yield
    except InputNotFoundError as e:
        raise ConfigError(key, _first_line(e)) from e
    except AnalysisException as e:
        if e.getCondition() in NOT_FOUND_CONDITIONS:
            raise ConfigError(key, _first_line(e)) from e
        raise


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
