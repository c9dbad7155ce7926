"""Training side of spark-train: shard reader, launcher, training loops, checkpoints, bundles.

Everything here except :mod:`pipeline.launcher` and scoring imports and runs without a
SparkSession, because it runs inside executors and under plain ``torchrun``.

``pipeline.score(spark, df, bundle)`` is the batch scorer (re-exported from the module of the
same name, whose other names import as ``from pipeline.score import ...``).
"""

from pipeline.score import score as score

__all__ = ["__version__", "score"]

__version__ = "0.1.0"
