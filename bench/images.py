"""Image ETL, image-shard reading and image bytes on disk.

    python bench/images.py [--images 20000] [--pairs 3] [--repeats 5] [--executors 1,2]
                           [--no-write]

a. ``run_etl`` of an ``image_folder`` (JPEG tiles of scikit-learn's sample photos, about
   256×256, 10 class folders → uint8 ``[64, 64, 3]``, ``resize: crop``) on ``local[N]`` for
   each N of ``--executors`` vs a single-process Pillow loop over the same files (open →
   convert RGB → ``ImageOps.fit`` to 64×64, bilinear → one ``np.save`` of the stacked array
   and one of the labels). One SparkSession per N, warmed by a tiny ETL before the clock; the
   ETL and the loop alternate, and the headline is the median of the per-pair ratios at
   ``local[2]`` (target ≥ 1.6×); images/s per core at 1 and 2 executors show the scaling.
b. ``ShardReader`` (rank 0 of 1, batch 256, verify off) over the train split the ETL wrote,
   shuffle on and off, vs ``pq.read_table`` → ``torch.from_numpy`` of the same files,
   alternating in one process (target ≥ 0.8×).
c. Shard bytes per image vs H×W×C and vs Pillow's PNG / JPEG encodings of a sample of the
   same 64×64 images.

The files are generated once under ``bench/_work/``. Rewrites the ``## Images`` section.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import environment, spark_session, write_section  # noqa: E402

WORK = REPO / "bench" / "_work"
SECTION = "Images"
SIZE = (64, 64)
DECODE = "exact"  # etl.images.image.decode, and the same policy in the Pillow loop (--decode)
TILE = 256
CLASSES = 10
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def make_tiles(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG tiles (quality 90) of about 256×256 in ``root/<class>/<i>.jpg``; reused."""
    marker = root.parent / f"{root.name}.json"  # outside the folder: the ETL reads every file
    spec = {"images": n, "seed": seed, "tile": TILE}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    from sklearn.datasets import load_sample_images

    shutil.rmtree(root, ignore_errors=True)
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for c in range(CLASSES):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        h = TILE + int(rng.integers(-16, 17))  # about 256×256, not all square
        w = TILE + int(rng.integers(-16, 17))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        tile = photo[y : y + h, x : x + w]
        if rng.random() < 0.5:
            tile = tile[:, ::-1]
        if rng.random() < 0.5:
            tile = tile[::-1]
        Image.fromarray(np.ascontiguousarray(tile)).save(
            root / str(i % CLASSES) / f"{i:06d}.jpg", quality=90
        )
    marker.write_text(json.dumps(spec))
    print(
        f"generated {n} JPEG tiles in {time.perf_counter() - t0:.1f} s under {root}",
        file=sys.stderr,
    )
    return root


def etl_config(raw: Path, out: Path):  # type: ignore[no-untyped-def]
    from preprocessing.config import EtlConfig

    return EtlConfig.from_mapping(
        {
            "input": {"path": str(raw), "format": "image_folder"},
            "schema": {"path": "string", "label": "int", "image": "binary"},
            "key": "path",
            "label": "label",
            "images": {
                "image": {"size": list(SIZE), "channels": "RGB", "resize": "crop", "decode": DECODE}
            },
            "output": str(out),
        }
    )


def run_etl_once(spark, raw: Path, out: Path) -> tuple[float, dict[str, float]]:  # type: ignore[no-untyped-def]
    from preprocessing.etl import run_etl

    t0 = time.perf_counter()
    result = run_etl(spark, etl_config(raw, out), force=True)
    return time.perf_counter() - t0, dict(result.timings_s)


def run_pillow(raw: Path, out: Path) -> float:
    """The single-process baseline: every file decoded, cropped to 64×64, one np.save."""
    t0 = time.perf_counter()
    pixels, labels = [], []
    for cls in sorted(os.listdir(raw)):
        folder = raw / cls
        if not folder.is_dir():
            continue
        for name in sorted(os.listdir(folder)):
            with Image.open(folder / name) as img:
                if DECODE == "fast":  # what a user writes for Pillow's DCT-domain downscale
                    img.draft("RGB", (SIZE[1], SIZE[0]))
                rgb = img.convert("RGB")
            fitted = ImageOps.fit(rgb, (SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(fitted))
            labels.append(int(cls))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.stack(pixels))
    np.save(out / "labels.npy", np.asarray(labels, np.int64))
    return time.perf_counter() - t0


def bench_etl(raw: Path, n: int, pairs: int, cores: int) -> dict[str, object]:
    spark = spark_session("4g", f"local[{cores}]")
    warm = make_tiles(WORK / "images-warm", 200, seed=1)
    run_etl_once(spark, warm, WORK / "images-warm-out")  # JVM, Python workers, code paths
    run_pillow(warm, WORK / "images-warm-np")
    etl_s, pil_s, ratios, phases = [], [], [], []
    for p in range(pairs):
        order = ("etl", "pillow") if p % 2 == 0 else ("pillow", "etl")
        got: dict[str, float] = {}
        for kind in order:
            if kind == "etl":
                got["etl"], timing = run_etl_once(spark, raw, WORK / "images-etl-out")
                phases.append(timing)
            else:
                got["pillow"] = run_pillow(raw, WORK / "images-np-out")
        etl_s.append(got["etl"])
        pil_s.append(got["pillow"])
        ratios.append(got["pillow"] / got["etl"])  # = ETL images/s ÷ Pillow images/s
        print(
            f"local[{cores}] pair {p}: ETL {got['etl']:.1f} s ({n / got['etl']:.0f} img/s), Pillow "
            f"{got['pillow']:.1f} s ({n / got['pillow']:.0f} img/s), ratio {ratios[-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    spark.stop()
    return {"etl": etl_s, "pillow": pil_s, "ratios": ratios, "phases": phases, "cores": cores}


def _pixels(chunk: Any) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 of an image column chunk (fixed_size_binary: the bytes as they lie)."""
    return np.frombuffer(
        chunk.buffers()[1], np.uint8, count=len(chunk) * SIZE[0] * SIZE[1] * 3
    ).reshape(-1, SIZE[0], SIZE[1], 3)


def run_baseline(paths: list[str]) -> int:
    rows = 0
    for path in paths:
        table = pq.read_table(path, columns=["image", "label"])
        for chunk in table.column("image").chunks:
            rows += torch.from_numpy(_pixels(chunk)).shape[0]
        for chunk in table.column("label").chunks:
            torch.from_numpy(chunk.to_numpy())
    return rows


def run_reader(uri: str, shuffle: bool, epoch: int) -> int:
    from pipeline.data.reader import ShardReader

    rows = 0
    with ShardReader(
        uri, "train", rank=0, world_size=1, batch_size=256, shuffle=shuffle, verify="none", seed=0
    ) as reader:
        reader.set_epoch(epoch)
        for batch in reader:
            image = batch.inputs["image"]
            assert image.dtype == torch.uint8 and image.shape[1:] == (SIZE[0], SIZE[1], 3)
            rows += image.shape[0]
    return rows


def bench_reader(uri: str, repeats: int) -> dict[str, list[float]]:
    from pipeline.data.shardset import ShardSet

    shards = ShardSet.open(uri)
    paths = [shards.shard_path(s) for s in shards.split("train").shards]
    run_baseline(paths)
    run_reader(uri, True, 0)
    out: dict[str, list[float]] = {"baseline": [], "shuffle": [], "sequential": []}
    for rep in range(repeats):
        for name, fn in (
            ("baseline", lambda: run_baseline(paths)),
            ("shuffle", lambda rep=rep: run_reader(uri, True, rep)),
            ("sequential", lambda rep=rep: run_reader(uri, False, rep)),
        ):
            t0 = time.perf_counter()
            rows = fn()
            out[name].append(rows / (time.perf_counter() - t0))
    return out


def bench_bytes(uri: str, sample: int = 1000) -> dict[str, float]:
    from pipeline.data.shardset import ShardSet

    shards = ShardSet.open(uri)
    rows = nbytes = 0
    for info in shards.splits.values():
        for s in info.shards:
            rows += s.rows
            nbytes += s.bytes
    parts, have = [], 0
    for s in shards.split("train").shards:
        if have >= sample:
            break
        col = pq.read_table(shards.shard_path(s), columns=["image"]).column("image")
        parts.append(_pixels(col.combine_chunks()))
        have += len(parts[-1])
    pix = np.concatenate(parts)[:sample]
    enc = {"png": 0, "jpeg90": 0, "jpeg75": 0}
    for img in pix:
        im = Image.fromarray(img)
        for key, fmt, kw in (
            ("png", "PNG", {}),
            ("jpeg90", "JPEG", {"quality": 90}),
            ("jpeg75", "JPEG", {"quality": 75}),
        ):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            enc[key] += len(buf.getvalue())
    return {
        "rows": rows,
        "shard_bytes": nbytes,
        "per_image": nbytes / rows,
        "sample": len(pix),
        **{k: v / len(pix) for k, v in enc.items()},
    }


def etl_rows(n: int, policy: str, runs: list[dict]) -> list[str]:  # type: ignore[type-arg]
    """Section a's table rows and verdicts for one decode policy (one run per executor count)."""
    pil_rate = [n / s for etl in runs for s in etl["pillow"]]
    lines = [
        f"**decode: {policy}**",
        "",
        "| path | images/s (median) | min | max | images/s per core | seconds (median) | ETL / Pillow (pairs) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| Pillow loop, 1 process | {statistics.median(pil_rate):,.0f} | {min(pil_rate):,.0f} | "
        f"{max(pil_rate):,.0f} | {statistics.median(pil_rate):,.0f} | "
        f"{statistics.median(n / r for r in pil_rate):.1f} | — |",
    ]
    for etl in runs:
        rate, cores = [n / s for s in etl["etl"]], etl["cores"]
        lines.append(
            f"| ETL, local[{cores}] | {statistics.median(rate):,.0f} | {min(rate):,.0f} | "
            f"{max(rate):,.0f} | {statistics.median(rate) / cores:,.0f} | "
            f"{statistics.median(etl['etl']):.1f} | {statistics.median(etl['ratios']):.2f}× "
            f"({', '.join(f'{r:.2f}' for r in etl['ratios'])}) |"
        )
    lines.append("")
    for etl in runs:
        ratio = statistics.median(etl["ratios"])
        verdict = (
            f" (target ≥ 1.6×: {'met' if ratio >= 1.6 else 'NOT met'})" if etl["cores"] == 2 else ""
        )
        lines.append(
            f"- local[{etl['cores']}]: **ETL / Pillow = {ratio:.2f}×**{verdict}. Phases (s, "
            "median): "
            + ", ".join(
                f"{k} {statistics.median(p[k] for p in etl['phases']):.1f}"
                for k in etl["phases"][0]
            )
            + "."
        )
    by_cores = {etl["cores"]: statistics.median(n / s for s in etl["etl"]) for etl in runs}
    if 1 in by_cores and 2 in by_cores:
        lines.append(f"- Scaling: local[2] / local[1] = {by_cores[2] / by_cores[1]:.2f}×.")
    return [*lines, ""]


def report(args: argparse.Namespace, n: int, etls: dict, rd: dict, by: dict, load: tuple) -> str:  # type: ignore[type-arg]
    raw = SIZE[0] * SIZE[1] * 3
    base = rd["baseline"]
    rr = {k: statistics.median(v / b for v, b in zip(rd[k], base, strict=True)) for k in rd}
    note = "" if n >= 20000 else f" ({n:,} rather than the default 20,000 files)"
    lines = [
        f"`python bench/images.py --images {n} --pairs {args.pairs} --repeats {args.repeats} "
        f"--decode {args.decode} --executors {args.executors}`.",
        "",
        "### a. Image ETL throughput",
        "",
        f"{n:,} JPEG files{note} of about 256×256 (quality 90; tiles cut at random offsets, "
        "flipped at random, from scikit-learn's `load_sample_images()` photos) in 10 class "
        "folders → uint8 [64, 64, 3], `resize: crop`, bilinear. **ETL**: `run_etl` on "
        "`local[N]` (`image_folder`: driver listing, files read and decoded in the executors, "
        "validation + quarantine, split, per-channel "
        "statistics, 8 balanced shards per split, manifest), one SparkSession per N warmed by "
        "a 200-image ETL before the clock. **Pillow**: one Python process, for each file `open → "
        "convert('RGB') → ImageOps.fit((64, 64), BILINEAR)`, then one `np.save` of the stacked "
        "[N, 64, 64, 3] array (and one of the labels). Each decode policy on both sides: "
        "`etl.images.image.decode: fast` in the ETL, `img.draft('RGB', (64, 64))` before "
        "`convert` in the loop (what a Pillow user writes for the same DCT-domain downscale). "
        f"Alternating (order swapped every pair), {args.pairs} pairs per N; ratio = ETL images/s "
        "÷ Pillow images/s, median of the pairs. Target ≥ 1.6× at `local[2]`. Per core: the "
        "ETL's figure over the N cores of `local[N]`, the loop's over its one.",
        "",
        *(line for policy, runs in etls.items() for line in etl_rows(n, policy, runs)),
        "",
        "### b. Reader throughput on the image shards",
        "",
        f"The ETL's train split ({by['train_rows']:,} images, uint8 [64, 64, 3]); `ShardReader` "
        "rank 0 of 1, batch 256, verify off, every batch consumed (`batch.inputs['image']` "
        "checked uint8 [B, 64, 64, 3]); baseline = `pq.read_table(['image', 'label'])` → "
        "`torch.from_numpy` per chunk, no batching or shuffling. Alternating in one process, "
        f"{args.repeats} repetitions, median of per-pair ratios. Target ≥ 0.8×.",
        "",
        "| path | images/s (median) | min | max | ratio to baseline (median) | target ≥ 0.8× |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, label in (
        ("baseline", "read_table → from_numpy"),
        ("shuffle", "ShardReader, shuffle on"),
        ("sequential", "ShardReader, shuffle off"),
    ):
        v = rd[key]
        met = "—" if key == "baseline" else ("met" if rr[key] >= 0.8 else "NOT met")
        lines.append(
            f"| {label} | {statistics.median(v):,.0f} | {min(v):,.0f} | {max(v):,.0f} | "
            f"{rr[key]:.2f}× | {met} |"
        )
    lines += [
        "",
        "### c. Bytes on disk per image",
        "",
        f"All shards of the ETL's output (every split, {by['rows']:,} images, "
        f"{by['shard_bytes'] / 1e6:.1f} MB, Parquet with the ETL's default compression) vs the raw "
        f"pixels and vs Pillow encodings of the first {by['sample']:,} stored 64×64 images.",
        "",
        "| storage | bytes / image | vs H×W×C |",
        "|---|---:|---:|",
        f"| H×W×C uint8 (64×64×3) | {raw:,} | 1.00× |",
        f"| Parquet shards (incl. key, label, metadata) | {by['per_image']:,.0f} | {by['per_image'] / raw:.2f}× |",
        f"| PNG (Pillow defaults) | {by['png']:,.0f} | {by['png'] / raw:.2f}× |",
        f"| JPEG quality 90 | {by['jpeg90']:,.0f} | {by['jpeg90'] / raw:.2f}× |",
        f"| JPEG quality 75 | {by['jpeg75']:,.0f} | {by['jpeg75'] / raw:.2f}× |",
        "",
        f"1-minute load average before/after all runs: {load[0]:.1f}/{load[1]:.1f} (2 shared CPUs "
        "with other work running: absolute figures drift, the alternating ratios share it).",
        "",
        environment(),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", default="exact,fast", help="decode policies, in turn")
    ap.add_argument("--executors", default="1,2", help="local[N] for each N, in turn")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    global DECODE  # the policy both sides use (etl_config, run_pillow)
    raw = make_tiles(WORK / f"images-{args.images}", args.images)
    load_before = os.getloadavg()[0]
    etl: dict[str, list[dict[str, object]]] = {}
    masters = [int(c) for c in args.executors.split(",")]
    for DECODE in args.decode.split(","):
        etl[DECODE] = [bench_etl(raw, args.images, args.pairs, cores) for cores in masters]
    uri = str(WORK / "images-etl-out")
    rd = bench_reader(uri, args.repeats)
    by = bench_bytes(uri)
    from pipeline.data.shardset import ShardSet

    by["train_rows"] = ShardSet.open(uri).split("train").rows
    text = report(args, args.images, etl, rd, by, (load_before, os.getloadavg()[0]))
    print(f"## {SECTION}\n\n{text}")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
