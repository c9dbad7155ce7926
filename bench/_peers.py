"""The reader against what a user would run instead (``bench/reader.py --peers``).

* ``mosaic``: Mosaic Streaming (``mosaicml-streaming``, the ``bench`` extra) over an MDS copy
  of each image set — raw ``ndarray:uint8:H,W,C`` encoding, no compression, local directory —
  read by ``StreamingDataset(shuffle=True, batch_size=256)`` + ``DataLoader(batch_size=256,
  num_workers=2)`` (as many workers as the machine has CPUs), one epoch per run (worker
  start included, as ours includes its thread start), alternating with one epoch of our
  ``ShardReader`` on the same CPUs. Target ≥ 1.5× its samples/s.
* ``jpeg``: JPEG tiles of about 256×256 (``bench/images.py``'s generator) in class folders.
  Ours: ``run_etl`` once (image_folder → uint8 [64, 64, 3], ``resize: crop``; one warm
  SparkSession, a small ETL before the clock) + 10 epochs of ``ShardReader`` over the train
  split. Theirs: 10 epochs of ``DataLoader(num_workers=2, batch_size=256, shuffle=True)``
  over a Dataset that opens each file and decodes it with Pillow (``convert('RGB')``,
  ``ImageOps.fit`` to 64×64, bilinear) every epoch. Target ≤ 0.3×.

``streaming``'s package ``__init__`` imports its vision helpers, which import torchvision;
the CPU build of torch has no matching torchvision wheel, so the benchmark imports
``streaming.base`` (the dataset and the MDS writer) without the package's optional helpers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from pipeline.data.reader import ShardReader
from pipeline.data.shardset import ShardSet

WORK = Path(__file__).resolve().parent / "_work"
BATCH = 256
EPOCHS = 10


def _streaming() -> Any:
    """``streaming.base`` without the package's torchvision-importing helpers."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None or spec.submodule_search_locations is None:
            raise RuntimeError("mosaicml-streaming is not installed (pip install '.[bench]')")
        package = types.ModuleType("streaming")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = package
    import streaming.base as base

    return base


# -- Mosaic Streaming ---------------------------------------------------------------------------
def mds_copy(uri: str, name: str) -> tuple[Path, tuple[int, ...]]:
    """An MDS copy of a shard set's train split (raw uint8 ndarray), written once."""
    base = _streaming()
    ss = ShardSet.open(uri)
    shape = ss.column_spec("image").shape
    out = WORK / f"mds-{Path(uri).name}"
    if (out / "index.json").exists():
        return out, shape
    shutil.rmtree(out, ignore_errors=True)
    encoding = "ndarray:uint8:" + ",".join(map(str, shape))
    with base.MDSWriter(out=str(out), columns={"x": encoding, "y": "int"}) as writer:
        for shard in ss.split("train").shards:
            t = pq.read_table(ss.shard_path(shard), columns=["image", "label"])
            x = np.frombuffer(t["image"].combine_chunks().buffers()[1], np.uint8)
            x = x.reshape(-1, *shape)
            for row, y in zip(x, t["label"].to_numpy(), strict=True):
                writer.write({"x": row, "y": int(y)})
    return out, shape


def run_mosaic(mds: Path, seed: int) -> float:
    base = _streaming()
    base.util.clean_stale_shared_memory()
    ds = base.StreamingDataset(local=str(mds), shuffle=True, shuffle_seed=seed, batch_size=BATCH)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=False)
    t0, rows = time.perf_counter(), 0
    for batch in loader:
        rows += len(batch["y"])
    seconds = time.perf_counter() - t0
    del loader, ds
    return rows / seconds


def run_ours(uri: str, seed: int) -> float:
    t0, rows = time.perf_counter(), 0
    with ShardReader(uri, "train", rank=0, world_size=1, batch_size=BATCH, seed=seed,
                     verify="none") as reader:  # fmt: skip
        for batch in reader:
            rows += len(batch.labels)
    return rows / (time.perf_counter() - t0)


def bench_mosaic(results: list[dict[str, Any]], repeats: int = 3) -> list[str]:
    lines = [
        "### Against Mosaic Streaming (same images, MDS raw `ndarray:uint8`, local directory)",
        "",
        "Both on both CPUs, alternating, one epoch per run. Target ours ≥ 1.5× Mosaic.",
        "",
        "| kind | Mosaic images/s (2 workers) | Mosaic MB/s | ours images/s | ours MB/s "
        "| ours / Mosaic (min–max) | met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if not r["kind"].startswith("img"):
            continue
        mds, shape = mds_copy(r["uri"], r["kind"])
        size = int(np.prod(shape))
        run_mosaic(mds, 0)  # warm
        theirs, ours = [], []
        for rep in range(repeats):
            if rep % 2:
                ours.append(run_ours(r["uri"], rep + 1))
                theirs.append(run_mosaic(mds, rep + 1))
            else:
                theirs.append(run_mosaic(mds, rep + 1))
                ours.append(run_ours(r["uri"], rep + 1))
        ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
        ratio, m, o = statistics.median(ratios), statistics.median(theirs), statistics.median(ours)
        lines.append(
            f"| {r['kind']} | {m:,.0f} | {m * size / 1e6:,.0f} | {o:,.0f} | {o * size / 1e6:,.0f}"
            f" | **{ratio:.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) | "
            f"{'met' if ratio >= 1.5 else 'NOT met'} |"
        )
    return lines


# -- JPEG files + Pillow every epoch --------------------------------------------------------------
class JpegFolder(Dataset):  # type: ignore[type-arg]
    """What a user writes: each item decoded from its JPEG file every time it is read."""

    def __init__(self, paths: list[str], size: tuple[int, int]) -> None:
        self.items = [(p, int(Path(p).parent.name)) for p in sorted(paths)]
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        fitted = ImageOps.fit(rgb, self.size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(fitted).copy()), label


def bench_jpeg(n: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import images
    from bench._common import spark_session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    raw = images.make_tiles(WORK / f"jpeg-{n}", n)
    spark = spark_session("4g")
    small = images.make_tiles(WORK / "jpeg-warm-200", 200, seed=1)
    images.run_etl_once(spark, small, WORK / "jpeg-warm-out")
    load0 = os.getloadavg()[0]
    etl_s, timings = images.run_etl_once(spark, raw, WORK / f"jpeg-{n}-out")
    uri = str(WORK / f"jpeg-{n}-out")
    train = ShardSet.open(uri).split("train").rows
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        with ShardReader(uri, "train", rank=0, world_size=1, batch_size=BATCH, seed=epoch,
                         verify="none") as reader:  # fmt: skip
            for batch in reader:
                assert batch.inputs["image"].shape[1:] == (64, 64, 3)
    read_s = time.perf_counter() - t0
    ss = ShardSet.open(uri)  # the same train images: the shards' keys are their paths
    keys = [k for s in ss.split("train").shards for k in pq.read_table(ss.shard_path(s),
            columns=["key"])["key"].to_pylist()]  # fmt: skip
    paths = [k.removeprefix("file://").removeprefix("file:") for k in keys]
    loader = DataLoader(JpegFolder(paths, (64, 64)), batch_size=BATCH, shuffle=True, num_workers=2)
    t0 = time.perf_counter()
    decoded = 0
    for _ in range(EPOCHS):
        for x, _y in loader:
            decoded += len(x)
    theirs_s = time.perf_counter() - t0
    ours_s = etl_s + read_s
    ratio = ours_s / theirs_s
    return [
        "### ETL once + 10 epochs of our reader vs 10 epochs of a JPEG DataLoader",
        "",
        f"{n:,} JPEG tiles (about 256×256, quality 90) → uint8 [64, 64, 3]. Ours: `run_etl` "
        f"(local[2], warm session) {etl_s:.1f} s (phases: "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + f") + 10 epochs of the {train:,}-image train split {read_s:.1f} s "
        f"({EPOCHS * train / read_s:,.0f} images/s). Theirs: `DataLoader(num_workers=2)`, "
        f"Pillow decode + crop every epoch, the same {len(paths):,} train files: {theirs_s:.1f} s "
        f"({decoded / theirs_s:,.0f} images/s). Load average at the start: {load0:.1f}.",
        "",
        f"**Ours / theirs = {ours_s:.1f} s / {theirs_s:.1f} s = {ratio:.2f}× "
        f"(target ≤ 0.3×: {'met' if ratio <= 0.3 else 'NOT met'})**.",
    ]


def run(which: list[str], results: list[dict[str, Any]], jpeg_images: int) -> list[str]:
    lines: list[str] = []
    if "mosaic" in which:
        lines += bench_mosaic(results)
    if "jpeg" in which:
        lines += ["", *bench_jpeg(jpeg_images)]
    return lines
