"""Spark side of spark-train: schema validation, quarantine, split, featurization, shard writing."""
