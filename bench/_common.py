"""Shared by the benchmarks: a quiet local Spark session, the machine/version line and
section-wise RESULTS.md updates."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where available)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else "unknown"


def environment() -> str:
    """Machine, versions and date, as one Markdown paragraph."""
    import numpy as np
    import pyarrow as pa
    import torch

    try:
        import pyspark

        spark = f", pyspark {pyspark.__version__}"
    except ImportError:
        spark = ""
    return (
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()}. "
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, pyarrow "
        f"{pa.__version__}, numpy {np.__version__}{spark}. Date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC."
    )


NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``## name`` section of RESULTS.md, leaving the others.

    The section's hand-written analysis — what a run means, where the time goes, what
    changed since earlier runs — lies between ``<!-- notes -->`` and ``<!-- /notes -->``
    and is kept at the section's end: benchmark history lives in RESULTS.md, not in code.
    """
    header = f"## {name}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.M | re.S)
    found = pattern.search(old)
    notes = re.search(
        rf"{re.escape(NOTES_START)}.*?{re.escape(NOTES_END)}", found.group(0) if found else "", re.S
    )
    text = f"{header}\n\n{body.strip()}\n" + (f"\n{notes.group(0)}\n" if notes else "")
    if found:
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new.rstrip("\n") + "\n")


def spark_session(driver_memory: str, master: str = "local[2]"):  # type: ignore[no-untyped-def]
    """A local SparkSession without UI, console progress or INFO logs."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", driver_memory)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
