"""The executors' Python: checked with one probe before a job that runs spark-train code there.

A session whose Python workers run another interpreter than the driver's environment (no
``PYSPARK_PYTHON`` set, so ``python3`` on the executors' PATH) used to fail inside every
rank of every attempt with ``No module named 'pipeline'`` hundreds of log lines later.
:func:`check_executor_python` runs a tiny Spark job first — a plain Python UDF, which needs
neither pyarrow nor this package on the executors, and works over Spark Connect — that
reports the executors' interpreter and which of the packages spark-train needs it cannot
import, and raises a one-line :class:`ConfigError` saying which interpreter that is and what
to set. One probe per session; a passing probe also starts the Python workers the job then
reuses.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import weakref
from typing import Any, Final

from pipeline.core.configbase import ConfigError

__all__ = ["NEEDED", "check_executor_python"]

log = logging.getLogger(__name__)

NEEDED: Final = ("pipeline", "torch", "numpy", "pyarrow")
"""What the executors' Python must import for spark-train's tasks."""

_KEY: Final = "spark.pyspark.python"
_checked: weakref.WeakSet[Any] = weakref.WeakSet()


def _advice() -> str:
    return (
        f"set PYSPARK_PYTHON (or {_KEY}) on the executors to a Python with spark-train "
        f"installed — for a local master this driver's, {sys.executable} — or ship an "
        "environment with spark.archives (a packed venv or conda env)"
    )


def _configured(spark: Any) -> str:
    """The executors' interpreter as the driver sees it configured."""
    import os

    try:
        conf = spark.conf.get(_KEY, None)
    except Exception:  # a Connect server may refuse to show some keys
        conf = None
    return conf or os.environ.get("PYSPARK_PYTHON") or "python3 on the executors' PATH"


def _probe_udf() -> Any:
    """A UDF whose function pickles by value (it is local), importing only the standard library.

    ``NEEDED``, a tuple it refers to, travels with it in the pickle.
    """
    from pyspark.sql.functions import udf

    def probe() -> str:
        import importlib.util
        import json
        import sys

        missing = [n for n in NEEDED if importlib.util.find_spec(n) is None]
        version = ".".join(map(str, sys.version_info[:3]))
        return json.dumps({"executable": sys.executable, "version": version, "missing": missing})

    return udf(probe, "string", useArrow=False)


def check_executor_python(spark: Any) -> None:
    """Raise :class:`ConfigError` when the executors' Python cannot run spark-train's tasks.

    ``spark`` is a classic or Connect session. The message names the interpreter the
    executors run and what to set; the check runs once per session.
    """
    if spark in _checked:
        return
    try:
        row = spark.range(1).select(_probe_udf()().alias("probe")).collect()[0]
    except Exception as e:
        text = str(e)
        mismatch = re.search(r"different version ([\d.]+) than that in driver ([\d.]+)", text)
        if mismatch is None and "PYTHON_VERSION_MISMATCH" not in text:
            raise
        versions = (
            f"Python {mismatch.group(1)}, the driver Python {mismatch.group(2)}"
            if mismatch
            else "another Python version than the driver"
        )
        raise ConfigError(
            _KEY, f"the executors run {_configured(spark)} ({versions}): {_advice()}"
        ) from None
    found = json.loads(row["probe"])
    if found["missing"]:
        raise ConfigError(
            _KEY,
            f"the executors run {found['executable']} (Python {found['version']}), which cannot "
            f"import {', '.join(found['missing'])}: {_advice()}",
        )
    log.debug("executors' Python: %s (%s)", found["executable"], found["version"])
    _checked.add(spark)
