"""The driver-only guard: :func:`require_driver` refuses to run inside a Spark task.

Launching training (:mod:`pipeline.launch`) and scoring (:mod:`pipeline.serve.score`) start
Spark jobs of their own, which a Spark task cannot do; called there by mistake, they fail
at once with one message naming the function.

Spark-free by import: a Spark task runs in a Python worker that has imported pyspark, so
where pyspark is not imported there is no task to refuse.
"""

from __future__ import annotations

import sys

__all__ = ["require_driver"]


def require_driver(name: str) -> None:
    """Raise ``RuntimeError`` naming ``name`` when called inside a Spark task."""
    taskcontext = sys.modules.get("pyspark.taskcontext")
    if taskcontext is not None and taskcontext.TaskContext.get() is not None:
        raise RuntimeError(
            f"{name} is driver-only but was called inside a Spark task; call it from the "
            "driver program (code running as a rank gets its rank from "
            "pipeline.runtime.distenv.current())"
        )
