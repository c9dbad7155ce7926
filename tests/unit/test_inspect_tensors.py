"""``spark-train inspect`` on a shard set without a ``features`` vector (images only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.serve.inspect import describe, render
from tests.shards import Extra, write_columns


def test_describes_an_image_only_shard_set(tmp_path: Path) -> None:
    norm = {"scale": 255.0, "mean": [0.5], "std": [0.3]}
    image = Extra("image", "uint8", (8, 8, 1), "image", norm)
    pixels, labels = np.zeros((10, 8, 8, 1), np.uint8), np.arange(10) % 2
    uri = write_columns(
        tmp_path / "s", {"train": ({"image": pixels}, labels)}, columns=[image], classes=[0, 1]
    )
    d = describe(uri)
    assert d["feature_dim"] is None
    assert [c["name"] for c in d["columns"]] == ["key", "image", "label"]
    text = render(d)
    assert "features: none" in text and "tensors: image uint8 [8, 8, 1]" in text
