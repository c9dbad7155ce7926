"""Training side of spark-train: shard reader, launcher, training loops, checkpoints, bundles.

Everything here except :mod:`pipeline.launcher` and scoring imports and runs without a
SparkSession, because it runs inside executors and under plain ``torchrun``.
"""

__version__ = "0.1.0"
