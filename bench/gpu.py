"""The data plane on one GPU: training step, reader into GPU memory, time waiting for data.

    python bench/gpu.py [--rows 20000] [--epochs 2] [--repeats 2] [--budget-s 450] [--no-write]

Needs a CUDA GPU, torch and pyarrow; it never imports pyspark (GPU machines have none), and
runs under plain ``torchrun``/``python``. Without a GPU it prints one line and exits 0
(``--allow-cpu`` runs the same code on the CPU, a smoke test of the script only: no figures
are written). Everything stops starting new parts after ``--budget-s`` seconds (default
7.5 minutes, to fit an 8-minute slot); what was skipped is said in the report.

* shard sets: ``rows`` uint8 ``[64, 64, 3]`` images and ``rows // 8`` of ``[224, 224, 3]``
  (random pixels plus a per-class brightness offset, so the labels are learnable), 10
  classes, 8 Parquet shards in the ETL's ``format_version`` 2 layout with its manifest,
  written with pyarrow by ``tests.shards.write_columns`` (no Spark) under
  ``bench/_work/gpu-*``, reused when present.
* (a) step time, ours vs plain, at 64²: ours = ``torchrun --nproc_per_node=1 -m
  pipeline.worker`` — the built-in ``cnn``, AdamW, batch 256, ``verify: auto``; ShardReader
  (pinned batches, ``non_blocking`` copies) → the device, where the uint8 images are
  normalized and made channels-first; the DDP loop. Plain = ``torchrun … bench/gpu.py
  --plain``: the same model, optimizer and batch on the train split held on the GPU as one
  uint8 tensor (loading excluded), the same normalization, a ``randperm`` per epoch, DDP
  over one rank. Step time = the last epoch's training seconds / steps (the first carries
  CUDA / cuDNN warm-up); runs alternate; median of per-pair ratios (target ≤ 1.05×).
* (b) the reader alone into GPU memory: one shuffled epoch of ShardReader (batch 256,
  verify off) with every batch copied to the GPU, pinned + ``non_blocking`` and plain
  pageable copies, at 64² and 224²: images/s and MB/s.
* (c) the fraction of step time the GPU waits for data, in-process: ShardReader →
  ``engine.to_model`` → ``cnn`` forward/backward/AdamW, one epoch at 64² and at 224². CUDA
  events around each step give the GPU's idle gap between the end of one step's work and
  the start of the next one's (the copy of its batch): waiting fraction = gaps / (last
  event − first event). The host's time blocked in ``next(reader)`` is reported beside it.

Rewrites the ``## GPU`` section of ``bench/RESULTS.md``.
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


def ensure_shards(rows: int, shards: int, size: tuple[int, int, int] = SIZE) -> str:
    """An image shard set (train ``rows``, val ``rows // 10``), written with pyarrow only."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from tests.shards import Extra, write_columns

    root = WORK / f"gpu-{rows}x{'x'.join(map(str, size))}-{shards}s"
    marker = root / "bench.json"
    spec = {"rows": rows, "shards": shards, "shape": list(size), "format_version": 2}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(root)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    splits = {}
    for name, n in (("train", rows), ("val", max(rows // 10, CLASSES))):
        labels = rng.integers(0, CLASSES, n).astype(np.int64)
        pixels = rng.integers(0, 256 - 8 * CLASSES, (n, *size), dtype=np.uint8)
        pixels += (8 * labels).astype(np.uint8).reshape(-1, 1, 1, 1)
        splits[name] = ({"image": pixels}, labels)
    norm = {"scale": 255.0, "mean": MEAN, "std": STD}
    image = Extra("image", "uint8", size, "image", norm)
    uri = write_columns(
        root, splits, columns=[image], classes=list(range(CLASSES)), shards=shards,
        row_group_rows=max(256, (1 << 25) // (size[0] * size[1] * size[2])),  # ~32 MB groups
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
    from pipeline.data.arrays import tensor_to_numpy

    spec = shards.column_spec("image")
    parts, labels = [], []
    for shard in shards.split("train").shards:
        t = pq.read_table(shards.shard_path(shard), columns=["image", "label"])
        parts.append(tensor_to_numpy(t.column("image"), spec))  # either layout
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


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def reader_to_gpu(uri: str, pin: bool) -> dict[str, float]:
    """(b) One shuffled epoch of ShardReader with every batch copied to the device."""
    sys.path.insert(0, str(ROOT))
    from pipeline.data.reader import ShardReader

    device, rows, nbytes = _device(), 0, 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ShardReader(uri, "train", rank=0, world_size=1, batch_size=BATCH, seed=1,
                     verify="none", pin_memory=pin and device.type == "cuda") as reader:  # fmt: skip
        for batch in reader:
            x = batch.inputs["image"].to(device, non_blocking=pin)
            batch.labels.to(device, non_blocking=pin)
            rows, nbytes = rows + x.shape[0], nbytes + x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images_s": rows / seconds, "mb_s": nbytes / seconds / 1e6}


def waiting(uri: str) -> dict[str, float]:
    """(c) One epoch of reader → to_model → cnn step; the GPU's idle gaps between steps."""
    sys.path.insert(0, str(ROOT))
    import torch.nn.functional as F

    from pipeline.data.reader import ShardReader
    from pipeline.data.shardset import ShardSet
    from pipeline.train import engine
    from pipeline.train.inputs import ModelInputs
    from pipeline.train.models import cnn

    device, shards = _device(), ShardSet.open(uri)
    cuda = device.type == "cuda"
    inputs = ModelInputs.from_shards(shards)
    h, w, c = shards.column_spec("image").shape
    torch.manual_seed(0)
    model = cnn(input_shape=(c, h, w), num_outputs=CLASSES).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    starts: list[Any] = []
    ends: list[Any] = []
    blocked, steps = 0.0, 0
    with ShardReader(shards, "train", rank=0, world_size=1, batch_size=BATCH, seed=2,
                     verify="none", pin_memory=cuda) as reader:  # fmt: skip
        it = iter(reader)
        t0 = time.perf_counter()
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            blocked += time.perf_counter() - t
            if batch is None:
                break
            if cuda:
                starts.append(torch.cuda.Event(enable_timing=True))
                starts[-1].record()
            x, y = engine.to_model(inputs, batch, device)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record()
            steps += 1
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if cuda and steps > 1:
        gaps = sum(ends[i].elapsed_time(starts[i + 1]) for i in range(steps - 1)) / 1000
        span = starts[0].elapsed_time(ends[-1]) / 1000
    else:  # the CPU smoke test: every moment blocked on the reader is a moment not computing
        gaps, span = blocked, wall
    return {"steps": steps, "wait_fraction": gaps / max(span, 1e-9), "blocked_s": blocked,
            "wall_s": wall, "images_s": steps * BATCH / wall}  # fmt: skip


def report(
    args: argparse.Namespace,
    pairs: list[tuple[dict, dict]],  # type: ignore[type-arg]
    to_gpu: dict[str, dict[str, float]],
    waits: dict[str, dict[str, float]],
    skipped: list[str],
) -> str:
    gpu = torch.cuda.is_available()
    lines = [
        f"`python bench/gpu.py --rows {args.rows} --epochs {args.epochs} --repeats "
        f"{args.repeats}` — uint8 images (8 Parquet shards, `format_version` 2, written with "
        f"pyarrow, no Spark): {args.rows:,} of 64×64×3 and {args.rows // 8:,} of 224×224×3; "
        f"built-in `cnn` (32, 64 channels), AdamW, fp32, batch {BATCH}, 1 GPU."
        + ("" if gpu else " **CPU smoke test (`--allow-cpu`), not GPU figures.**"),
    ]
    if pairs:
        lines += [
            "",
            "(a) Step time at 64²: *ours* `torchrun -m pipeline.worker` (ShardReader with "
            "pinned batches, verify auto, normalization on the device, DDP) vs *plain* (the "
            "train split held on the GPU, bare loop). Last epoch's training seconds / steps.",
            "",
            "| run | ours (ms/step) | plain (ms/step) | ratio |",
            "|---|---:|---:|---:|",
        ]
        for i, (o, p) in enumerate(pairs):
            so, sp = o["seconds"] / o["steps"], p["seconds"] / p["steps"]
            lines.append(f"| {i} | {1000 * so:.2f} | {1000 * sp:.2f} | {so / sp:.3f} |")
        ratio = statistics.median(
            (o["seconds"] / o["steps"]) / (p["seconds"] / p["steps"]) for o, p in pairs
        )
        lines += [
            "",
            f"**Median ratio ours / plain: {ratio:.3f}× (target ≤ 1.05×: "
            f"{'met' if ratio <= 1.05 else 'NOT met'})**; steps per epoch {pairs[0][0]['steps']}. "
            "Ours runs under `engine.deterministic()` (deterministic cuDNN / cuBLAS "
            "algorithms); the plain loop uses torch's defaults.",
        ]
    if to_gpu:
        lines += ["", "(b) The reader alone into GPU memory (one shuffled epoch, batch 256):", "",
                  "| images | copies | images/s | MB/s |", "|---|---|---:|---:|"]  # fmt: skip
        for key, r in to_gpu.items():
            size, how = key.split("/")
            lines.append(f"| {size} | {how} | {r['images_s']:,.0f} | {r['mb_s']:,.0f} |")
    if waits:
        lines += ["", "(c) Time the GPU waits for data (in-process reader → `to_model` → `cnn` "
                  "step, one epoch; gaps between one step's last kernel and the next one's "
                  "first, from CUDA events):", "",
                  "| images | steps | images/s | GPU waiting (fraction of step time) | host "
                  "blocked in next(reader) |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for size, r in waits.items():
            lines.append(
                f"| {size} | {r['steps']:.0f} | {r['images_s']:,.0f} | "
                f"**{100 * r['wait_fraction']:.1f} %** | {r['blocked_s']:.2f} s of "
                f"{r['wall_s']:.2f} s |"
            )
    if skipped:
        lines += [
            "",
            f"Skipped to stay within --budget-s {args.budget_s:.0f}: {', '.join(skipped)}.",
        ]
    return "\n".join([*lines, "", environment()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=450.0)
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
        print("bench/gpu.py: skipped — no CUDA GPU here (torch.cuda.is_available() is False).")
        return
    start = time.perf_counter()

    def left() -> bool:
        return time.perf_counter() - start < args.budget_s

    WORK.mkdir(parents=True, exist_ok=True)
    sets = {"64²": ensure_shards(args.rows, args.shards),
            "224²": ensure_shards(max(args.rows // 8, 2 * BATCH), args.shards, (224, 224, 3))}  # fmt: skip
    skipped: list[str] = []
    to_gpu: dict[str, dict[str, float]] = {}
    for size, uri in sets.items():
        for how, pin in (("pinned, non_blocking", True), ("pageable", False)):
            if left():
                to_gpu[f"{size}/{how}"] = reader_to_gpu(uri, pin)
            else:
                skipped.append(f"(b) {size} {how}")
    waits: dict[str, dict[str, float]] = {}
    for size, uri in sets.items():
        if left():
            waits[size] = waiting(uri)
        else:
            skipped.append(f"(c) {size}")
    pairs = []
    for run in range(args.repeats):
        if not left():
            skipped.append(f"(a) pair {run}")
            continue
        uri = sets["64²"]
        if run % 2 == 0:
            ours, base = run_ours(uri, args.epochs, str(run)), run_plain(uri, args.epochs)
        else:
            base, ours = run_plain(uri, args.epochs), run_ours(uri, args.epochs, str(run))
        pairs.append((ours, base))
        print(f"run {run}: ours {ours['seconds']:.2f} s / {ours['steps']} steps, plain "
              f"{base['seconds']:.2f} s / {base['steps']} steps", flush=True)  # fmt: skip
    text = report(args, pairs, to_gpu, waits, skipped)
    print(f"## {SECTION}\n\n{text}\n\n(total {time.perf_counter() - start:.0f} s)")
    if not args.no_write and torch.cuda.is_available():
        sys.path.insert(0, str(ROOT))
        from bench._common import write_section

        write_section(SECTION, text)


if __name__ == "__main__":
    main()
