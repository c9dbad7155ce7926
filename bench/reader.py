"""ShardReader throughput per rank, per tensor kind, against the memory-speed read and peers.

    python bench/reader.py [--repeats 3] [--cores 1] [--kinds img64,img224,tabular,tokens]
                           [--before OLD_TREE] [--peers mosaic,jpeg] [--no-write]

Every kind is one shard set written by the ETL's own Parquet writer (``format_version`` 2,
tensor columns as ``fixed_size_binary``; :mod:`pipeline.data.formats.parquet`) under
``bench/_work/reader2-*``, generated once and reused:

* ``img64``: 16,000 uint8 [64, 64, 3] images, row groups of 2,048 (the issue's set);
* ``img224``: 2,000 uint8 [224, 224, 3] images, row groups of 256;
* ``tabular``: 1,000,000 rows of the float32 [33] ``features`` vector, row groups of 65,536;
* ``tokens``: 200,000 rows of int32 [128] token ids (random lengths, pad 0), 65,536-row
  groups, read with the default per-batch padding.

Per repetition, alternating in one process pinned to ``--cores`` CPUs (default 1: the
figure per rank on one core): the **anchor** — ``pq.read_table`` of each file's tensor
column and label + ``np.frombuffer`` of the column's buffer, the memory-speed read of the
same bytes — and **ours**, one epoch of ``ShardReader`` rank 0 of 1, batch 256, shuffle on
(a new seed each time), verify off, every batch consumed. Ratio = ours / anchor per pair,
median (target ≥ 0.8×; images also ≥ 1 GB/s of tensor bytes).

``--before OLD_TREE`` also times the reader of an older checkout (e.g. a worktree of
cb86e62) on a ``format_version`` 1 copy of each set (``fixed_size_list``), in a subprocess
with that tree on ``PYTHONPATH``, alternating with ours: the before/after figures.

``--peers`` runs :mod:`bench._peers`: Mosaic Streaming over MDS copies of the image sets
(``mosaic``), and the ETL once + 10 epochs of our reader vs 10 epochs of a JPEG
``DataLoader`` (``jpeg``). Rewrites the ``## Reader`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import environment, write_section  # noqa: E402
from pipeline.data.columns import ColumnSpec, arrow_schema  # noqa: E402
from pipeline.data.formats import get_format  # noqa: E402
from pipeline.data.reader import ShardReader  # noqa: E402
from pipeline.data.shardset import MANIFEST_NAME, ShardSet  # noqa: E402
from tests.shards import Extra, shard_entry, write_manifest  # noqa: E402

WORK = REPO / "bench" / "_work"
SECTION = "Reader"
BATCH = 256
# kind → (column, dtype, shape, rows, row group rows, shards, column kind)
KINDS: dict[str, tuple[str, str, tuple[int, ...], int, int, int, str]] = {
    "img64": ("image", "uint8", (64, 64, 3), 16_000, 2048, 4, "image"),
    "img224": ("image", "uint8", (224, 224, 3), 2_000, 256, 4, "image"),
    "tabular": ("features", "float32", (33,), 1_000_000, 65536, 4, "tabular"),
    "tokens": ("tokens", "int32", (128,), 200_000, 65536, 4, "text"),
}
TEXT = {"vocab_size": 30000, "pad_id": 0, "tokenizer": "text/tokens/tokenizer.json"}


def _values(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    _, dtype, shape, *_ = KINDS[kind]
    if dtype == "uint8":  # smooth-ish pixels, not pure noise (compresses like photos a bit)
        base = rng.integers(0, 256, (n, 1, 1, shape[2]), dtype=np.int64)
        noise = rng.integers(-24, 25, (n, *shape), dtype=np.int64)
        return np.clip(base + noise, 0, 255).astype(np.uint8)
    if dtype == "float32":
        return rng.standard_normal((n, *shape)).astype(np.float32)
    lengths = rng.integers(8, shape[0] + 1, n)
    ids = rng.integers(1, TEXT["vocab_size"], (n, *shape), dtype=np.int64).astype(np.int32)
    ids[np.arange(shape[0])[None, :] >= lengths[:, None]] = 0
    return ids


def shard_set(kind: str, layout: str = "binary") -> str:
    """The kind's shard set in ``layout`` (``list``: a format_version 1 copy); reused."""
    name, dtype, shape, rows, rg, shards, ckind = KINDS[kind]
    root = WORK / f"reader2-{kind}-{layout}"
    spec = {"kind": kind, "rows": rows, "rg": rg, "shards": shards, "layout": layout, "v": 2}
    marker = root / "bench.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(root)
    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    column = ColumnSpec(name, dtype, shape, ckind, text=TEXT if ckind == "text" else None)
    key, label = ColumnSpec("key", "int64", kind="key"), ColumnSpec("label", "int64", kind="label")
    schema = arrow_schema([key, column, label], layout=layout)
    fmt, fs = get_format("parquet"), pafs.LocalFileSystem()
    (root / "train").mkdir(parents=True, exist_ok=True)
    entries, first = [], 0
    for i in range(shards):
        n = rows // shards
        x = _values(kind, rng, n)
        if layout == "binary":  # the row-major little-endian bytes, as the ETL writes them
            values = pa.Array.from_buffers(schema.field(name).type, n, [None, pa.py_buffer(x)])
        else:
            values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x[0].size)
        batch = pa.record_batch(
            [pa.array(np.arange(first, first + n)), values, pa.array(rng.integers(0, 10, n))],
            schema=schema,
        )
        rel = f"train/part-{i:05d}-gbench.parquet"
        fmt.write(fs, str(root / rel), [batch], rg, schema)
        entries.append(shard_entry(root, rel, n))
        first += n
    features = name == "features"
    extra = [] if features else [Extra(name, dtype, shape, ckind)]
    write_manifest(root, {"train": entries}, dim=shape[0] if features else 0, classes=list(range(10)),
                   row_group_rows=rg, extra=extra, features=features,
                   format_version=1 if layout == "list" else None)  # fmt: skip
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    for entry in manifest["schema"]:
        if entry["name"] == name:
            entry["kind"] = ckind
            if ckind == "text":
                entry["text"] = TEXT
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    marker.write_text(json.dumps(spec))
    print(f"generated {kind} ({layout}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return str(root)


def row_bytes(kind: str) -> int:
    _, dtype, shape, *_ = KINDS[kind]
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def run_anchor(uri: str, kind: str) -> int:
    """pq.read_table of the tensor column and label, np.frombuffer per chunk; rows read."""
    name, dtype, shape, *_ = KINDS[kind]
    ss, rows = ShardSet.open(uri), 0
    for shard in ss.split("train").shards:
        table = pq.read_table(ss.shard_path(shard), columns=[name, "label"])
        for chunk in table.column(name).chunks:
            x = np.frombuffer(chunk.buffers()[1], dtype, count=len(chunk) * int(np.prod(shape)))
            rows += len(x.reshape(len(chunk), *shape))
        for chunk in table.column("label").chunks:
            chunk.to_numpy()
    return rows


def run_ours(uri: str, seed: int) -> int:
    """One shuffled epoch of rank 0 of 1, every batch consumed; rows yielded."""
    rows = 0
    with ShardReader(uri, "train", rank=0, world_size=1, batch_size=BATCH, seed=seed,
                     verify="none") as reader:  # fmt: skip
        for batch in reader:
            rows += len(batch.labels)
    return rows


BEFORE = """
import sys, time, json
from pipeline.data.reader import ShardReader
uri, seed, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter(); rows = 0
with ShardReader(uri, "train", rank=0, world_size=1, batch_size=batch, seed=seed, verify="none") as r:
    for b in r:
        rows += len(b.labels)
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t}))
"""


def run_before(tree: str, uri: str, seed: int, cores: set[int]) -> float:
    """Samples/s of the older tree's reader on ``uri`` (a subprocess, same CPU set)."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [sys.executable, "-c", BEFORE, uri, str(seed), str(BATCH)], env=env, cwd=tree, check=True,
        capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cores),
    ).stdout  # fmt: skip
    res = json.loads(out.strip().splitlines()[-1])
    return float(res["rows"]) / float(res["seconds"])


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    rows = fn(*args)
    return rows / (time.perf_counter() - t0)


def bench_kind(kind: str, repeats: int, before: str | None, cores: set[int]) -> dict[str, Any]:
    uri = shard_set(kind)
    old = shard_set(kind, "list") if before else None
    run_anchor(uri, kind)  # warm the page cache and both paths
    run_ours(uri, 0)
    res: dict[str, list[float]] = {"anchor": [], "ours": [], "before": []}
    for rep in range(repeats):
        pair = [("anchor", run_anchor, (uri, kind)), ("ours", run_ours, (uri, rep + 1))]
        for name, fn, args in pair if rep % 2 == 0 else pair[::-1]:
            res[name].append(timed(fn, *args))
        if before and old:
            res["before"].append(run_before(before, old, rep + 1, cores))
    return {"kind": kind, "uri": uri, "bytes": row_bytes(kind), **res}


def summary(r: dict[str, Any]) -> dict[str, float]:
    ratios = [o / a for o, a in zip(r["ours"], r["anchor"], strict=True)]
    out = {
        "anchor": statistics.median(r["anchor"]),
        "ours": statistics.median(r["ours"]),
        "ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }
    if r["before"]:
        out["before"] = statistics.median(r["before"])
        out["after_vs_before"] = statistics.median(
            o / b for o, b in zip(r["ours"], r["before"], strict=True)
        )
    return out


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| kind | row | anchor rows/s | ours rows/s | ours MB/s | ours / anchor (min–max) "
        "| target | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        s = summary(r)
        _, dtype, shape, *_ = KINDS[r["kind"]]
        mbs = s["ours"] * r["bytes"] / 1e6
        target = "≥ 0.8× and ≥ 1,000 MB/s" if dtype == "uint8" else "≥ 0.8×"
        met = s["ratio"] >= 0.8 and (dtype != "uint8" or mbs >= 1000)
        lines.append(
            f"| {r['kind']} | {dtype} {list(shape)} | {s['anchor']:,.0f} | {s['ours']:,.0f} | "
            f"{mbs:,.0f} | **{s['ratio']:.2f}×** ({s['min_ratio']:.2f}–{s['max_ratio']:.2f}) | "
            f"{target} | {'met' if met else 'NOT met'} |"
        )
    return lines


def before_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["before"]]
    if not rows:
        return []
    lines = [
        "",
        "Before / after (same rows; *before* = the reader of the older tree on a "
        "`format_version` 1 copy, `fixed_size_list` columns, in a subprocess on the same CPUs):",
        "",
        "| kind | before rows/s | before MB/s | after rows/s | after MB/s | after / before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = summary(r)
        lines.append(
            f"| {r['kind']} | {s['before']:,.0f} | {s['before'] * r['bytes'] / 1e6:,.0f} | "
            f"{s['ours']:,.0f} | {s['ours'] * r['bytes'] / 1e6:,.0f} | "
            f"{s['after_vs_before']:.1f}× |"
        )
    return lines


def main() -> None:
    global BATCH  # one knob for the whole run (the helpers read it)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=1, help="CPUs the process may use")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--before", help="an older checkout whose reader to time (v1 copies)")
    ap.add_argument("--peers", default="", help="mosaic,jpeg (bench/_peers.py)")
    ap.add_argument("--jpeg-images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=BATCH, help="batch size of our reader")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    BATCH = args.batch
    cores = set(sorted(os.sched_getaffinity(0))[: args.cores])
    os.sched_setaffinity(0, cores)
    load = [os.getloadavg()]
    results = [bench_kind(k, args.repeats, args.before, cores) for k in args.kinds.split(",")]
    load.append(os.getloadavg())
    lines = [
        f"`python bench/reader.py --repeats {args.repeats} --cores {args.cores}"
        + (" --before <worktree of cb86e62>" if args.before else "")
        + (f" --peers {args.peers}" if args.peers else "")
        + f"`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Per rank (rank 0 of 1), "
        f"the process pinned to {len(cores)} CPU(s); batch {BATCH}, shuffle on (new seed each "
        "repetition), verify off, every batch consumed. *Anchor*: `pq.read_table` of the "
        "tensor column and label + `np.frombuffer` per chunk, the memory-speed read of the "
        "same files. Alternating, median of per-pair ratios. 1-minute load average before/"
        f"after: {load[0][0]:.1f}/{load[1][0]:.1f} (2 CPUs shared with other engineers' tests).",
        "",
        *table(results),
        *before_table(results),
    ]
    if args.peers:
        from bench import _peers

        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) | set(range(os.cpu_count() or 1)))
        lines += ["", *_peers.run(args.peers.split(","), results, args.jpeg_images)]
    lines += ["", environment(), ""]
    text = "\n".join(lines)
    print(f"## {SECTION}\n\n{text}")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
