"""Training step time on image shards on one GPU: ``pipeline.worker`` vs a plain torch loop.

    python bench/gpu.py [--rows 60000] [--epochs 2] [--repeats 3] [--no-write]

Needs a CUDA GPU, torch and pyarrow; it never imports pyspark (GPU machines have none).
Without a GPU it prints why and exits 0 (``--allow-cpu`` runs the same code on the CPU, a
smoke test of the script only: no figures are written).

* shard set: ``rows`` uint8 ``[64, 64, 3]`` images (random pixels, a per-class brightness
  offset so that the labels are learnable), 10 classes, 8 Parquet shards with the ETL's
  layout and manifest, written with pyarrow by ``tests.shards.write_columns`` (no Spark) under
  ``bench/_work/gpu-*``, reused when present.
* ours: ``torchrun --nproc_per_node=1 -m pipeline.worker`` — the built-in ``cnn``, AdamW,
  batch 256, ``verify: auto``; ShardReader (shuffle window, prefetch thread) → the device,
  where the uint8 images are normalized and made channels-first; the DDP loop.
* plain: ``torchrun --nproc_per_node=1 bench/gpu.py --plain`` — the same model, optimizer and
  batch on the whole train split held on the GPU as one uint8 tensor (loading excluded),
  the same normalization, a ``randperm`` per epoch, DDP over one rank.

Both run ``--epochs`` epochs; the step time is the last epoch's training seconds divided by
its steps (the first epoch carries CUDA / cuDNN warm-up). Runs alternate (order swapped
every pair); the headline is the median of per-pair ratios (target ≤ 1.05×). Rewrites the
``## GPU`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
SECTION = "GPU"
SIZE = (64, 64, 3)
CLASSES = 10
BATCH = 256
LR = 1e-3
MEAN, STD = [0.5, 0.5, 0.5], [0.29, 0.29, 0.29]


def ensure_shards(rows: int, shards: int) -> str:
    """The image shard set (train ``rows``, val ``rows // 10``), written with pyarrow only."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from tests.shards import Extra, write_columns

    root = WORK / f"gpu-{rows}x{'x'.join(map(str, SIZE))}-{shards}s"
    marker = root / "bench.json"
    spec = {"rows": rows, "shards": shards, "shape": list(SIZE)}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(root)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    splits = {}
    for name, n in (("train", rows), ("val", max(rows // 10, CLASSES))):
        labels = rng.integers(0, CLASSES, n).astype(np.int64)
        pixels = rng.integers(0, 256 - 8 * CLASSES, (n, *SIZE), dtype=np.uint8)
        pixels += (8 * labels).astype(np.uint8).reshape(-1, 1, 1, 1)
        splits[name] = ({"image": pixels}, labels)
    norm = {"scale": 255.0, "mean": MEAN, "std": STD}
    image = Extra("image", "uint8", SIZE, "image", norm)
    uri = write_columns(
        root, splits, columns=[image], classes=list(range(CLASSES)), shards=shards,
        row_group_rows=4096,
    )  # fmt: skip
    marker.write_text(json.dumps(spec))
    print(f"generated {rows} images in {time.perf_counter() - t0:.1f} s under {root}", flush=True)
    return uri


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _torchrun(args: list[str]) -> tuple[dict[str, Any], float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           *args]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return dict(json.loads(line)), wall


def run_ours(uri: str, epochs: int, tag: str) -> dict[str, float]:
    import yaml

    out = WORK / f"gpu-ours-{tag}"
    config = {
        "train": {
            "dataset": uri,
            "model": {"builder": "pipeline.train.models:cnn"},
            "num_workers": 1,
            "epochs": epochs,
            "batch_size": BATCH,
            "optimizer": {"name": "adamw", "lr": LR},
            "lr_schedule": {"name": "constant"},
            "checkpoint": {"dir": str(out / "ckpt"), "every_steps": 0, "keep": 1},
            "output": str(out / "model"),
            "verify": "auto",
        }
    }
    path = WORK / "gpu-ours.yaml"
    path.write_text(yaml.safe_dump(config))
    summary, wall = _torchrun(["-m", "pipeline.worker", "--config", str(path)])
    last = summary["epochs"][-1]
    steps = summary["steps"] // epochs
    return {"seconds": last["seconds"], "steps": steps, "wall": wall,
            "val_accuracy": last.get("val_accuracy", float("nan"))}  # fmt: skip


def run_plain(uri: str, epochs: int) -> dict[str, float]:
    summary, wall = _torchrun([str(Path(__file__).resolve()), "--plain", "--shards-uri", uri,
                               "--epochs", str(epochs)])  # fmt: skip
    return {"seconds": summary["seconds"], "steps": summary["steps"], "wall": wall}


def plain(uri: str, epochs: int) -> None:
    """The baseline, as one torchrun rank: whole train split on the device, a bare loop."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(ROOT))
    from pipeline.data.shardset import ShardSet
    from pipeline.train.models import cnn

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    shards = ShardSet.open(uri)
    parts, labels = [], []
    for shard in shards.split("train").shards:
        t = pq.read_table(shards.shard_path(shard), columns=["image", "label"])
        parts.append(t.column("image").combine_chunks().flatten().to_numpy().reshape(-1, *SIZE))
        labels.append(t.column("label").to_numpy())
    x = torch.from_numpy(np.concatenate(parts)).to(device or "cpu")
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64)).to(device or "cpu")
    mean = torch.tensor(MEAN, device=x.device).view(1, 1, 1, 3)
    std = torch.tensor(STD, device=x.device).view(1, 1, 1, 3)
    torch.manual_seed(0)
    module = cnn(input_shape=(SIZE[2], SIZE[0], SIZE[1]), num_outputs=CLASSES).to(x.device)
    model = DistributedDataParallel(module, device_ids=[device] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    seconds, steps = 0.0, 0
    for _ in range(epochs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(x), device=x.device)
        steps = 0
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            xb = ((x[idx].float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()
            loss = F.cross_entropy(model(xb), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps": steps}), flush=True)
    dist.destroy_process_group()


def environment() -> str:
    """Machine, GPU, versions and date (no pyspark here)."""
    import numpy as np
    import pyarrow as pa

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"Machine: {os.cpu_count()} CPUs, {gpu}, {platform.system()} {platform.release()}. "
        f"Versions: Python {platform.python_version()}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), pyarrow {pa.__version__}, numpy {np.__version__}. Date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. 1-minute load "
        f"average: {os.getloadavg()[0]:.1f}."
    )


def report(args: argparse.Namespace, pairs: list[tuple[dict, dict]]) -> str:  # type: ignore[type-arg]
    rows = []
    for i, (o, p) in enumerate(pairs):
        so, sp = o["seconds"] / o["steps"], p["seconds"] / p["steps"]
        rows.append(f"| {i} | {1000 * so:.2f} | {1000 * sp:.2f} | {so / sp:.3f} |")
    ratio = statistics.median((o["seconds"] / o["steps"]) / (p["seconds"] / p["steps"]) for o, p in pairs)  # fmt: skip
    return "\n".join(
        [
            f"`python bench/gpu.py --rows {args.rows} --epochs {args.epochs} --repeats "
            f"{args.repeats}` — {args.rows:,} uint8 [64, 64, 3] images (8 Parquet shards written "
            "with pyarrow, no Spark), built-in `cnn` (32, 64 channels), AdamW, fp32, batch "
            f"{BATCH}, 1 GPU. *Ours*: `torchrun -m pipeline.worker` (ShardReader, verify auto, "
            "normalization and channels-first on the device, DDP). *Plain*: the same model on "
            "the train split held on the GPU, bare loop. Step time = last epoch's training "
            "seconds / steps. Target ≤ 1.05×.",
            "",
            "| run | ours (ms/step) | plain (ms/step) | ratio |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"**Median ratio ours / plain: {ratio:.3f}× (target ≤ 1.05×: "
            f"{'met' if ratio <= 1.05 else 'NOT met'})**; steps per epoch {pairs[0][0]['steps']}."
            if torch.cuda.is_available()
            else f"CPU smoke test only (`--allow-cpu`), not a GPU figure: ratio {ratio:.3f}×.",
            "",
            "Ours runs under `engine.deterministic()` (deterministic cuDNN / cuBLAS algorithms, "
            "as the pipeline always does); the plain loop uses torch's defaults.",
            "",
            environment(),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke-test on the CPU, no write")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards-uri", "--shards-dir", dest="uri", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.plain:
        plain(args.uri, args.epochs)
        sys.stdout.flush()
        os._exit(0)  # as pipeline.worker: skip the interpreter teardown of DDP processes
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "bench/gpu.py: skipped — torch.cuda.is_available() is False (no CUDA GPU here); "
            "run it on a GPU machine (torch + pyarrow, no Spark needed).",
            flush=True,
        )
        return
    WORK.mkdir(parents=True, exist_ok=True)
    uri = ensure_shards(args.rows, args.shards)
    pairs = []
    for run in range(args.repeats):
        if run % 2 == 0:
            ours, base = run_ours(uri, args.epochs, str(run)), run_plain(uri, args.epochs)
        else:
            base, ours = run_plain(uri, args.epochs), run_ours(uri, args.epochs, str(run))
        pairs.append((ours, base))
        print(f"run {run}: ours {ours['seconds']:.2f} s / {ours['steps']} steps, plain "
              f"{base['seconds']:.2f} s / {base['steps']} steps", flush=True)  # fmt: skip
    text = report(args, pairs)
    print(f"## {SECTION}\n\n{text}")
    if not args.no_write and torch.cuda.is_available():
        sys.path.insert(0, str(ROOT))
        from bench._common import write_section

        write_section(SECTION, text)


if __name__ == "__main__":
    main()
