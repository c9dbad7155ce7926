"""Tell a Spark Connect session from a classic one without importing pyspark.

A Spark Connect session (``SparkSession.builder.remote(...)``) has no SparkContext, no RDDs,
no accumulators and no JVM gateway; the code that would use them asks :func:`is_connect`
and takes its Connect-safe path instead. Spark-free, so any layer may use it.
"""

from __future__ import annotations

__all__ = ["is_connect"]


def is_connect(spark: object) -> bool:
    """True for a Spark Connect session (``pyspark.sql.connect.session.SparkSession``)."""
    return type(spark).__module__.startswith("pyspark.sql.connect.")
