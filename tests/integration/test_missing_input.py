"""A missing input is one ConfigError naming the key, from the reader and from the ETL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyspark.errors import AnalysisException

from pipeline.core.configbase import ConfigError
from preprocessing.config import EtlConfig
from preprocessing.etl import run_etl
from preprocessing.read import missing_input_as_config_error, read_raw
from preprocessing.read.listing import list_input_files
from tests import corpus

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


def _cfg(tmp_path: Path, path: str, fmt: str = "csv") -> EtlConfig:
    section = corpus.etl_section(path, str(tmp_path / "out"))
    section["input"] = {"path": path, "format": fmt}
    return EtlConfig.from_mapping(section)


def test_each_kind_of_missing_input_names_the_key(spark: Any, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir")
    for where, read in {
        "spark path": lambda: spark.read.csv(missing).columns,
        "spark table": lambda: spark.read.table("no_such_table_abc").columns,
        "listing": lambda: list_input_files(missing),
    }.items():
        with pytest.raises(ConfigError) as e, missing_input_as_config_error("--input"):
            read()
        assert e.value.key == "--input", where
        assert ("no_such_table_abc" if where == "spark table" else "no-such-dir") in str(e.value)
        assert len(str(e.value).splitlines()) == 1, where


def test_other_errors_pass_through(spark: Any) -> None:
    with pytest.raises(AnalysisException) as e, missing_input_as_config_error("--input"):
        spark.range(1).select("no_such_column").collect()
    assert e.value.getCondition() == "UNRESOLVED_COLUMN.WITH_SUGGESTION"
    with pytest.raises(FileNotFoundError), missing_input_as_config_error("--input"):
        Path("/nonexistent/tokenizer.json").read_text()  # not the input's: not a config error


def test_run_etl_reports_a_missing_file_or_table_input(spark: Any, tmp_path: Path) -> None:
    """Not only through the CLI: the library's ETL names ``etl.input.path`` too."""
    for path, fmt in ((str(tmp_path / "absent.csv"), "csv"), ("no_such_table_def", "table")):
        with pytest.raises(ConfigError) as e:
            run_etl(spark, _cfg(tmp_path, path, fmt))
        assert e.value.key == "etl.input.path" and Path(path).name in str(e.value)
    with pytest.raises(ConfigError) as e:
        read_raw(spark, _cfg(tmp_path, str(tmp_path / "absent.json"), "json"), source="--input")
    assert e.value.key == "--input" and "absent.json" in str(e.value)
