"""TFRecord shards against Parquet shards of the same rows: writer and reader throughput.

Writer: every shard of the ``bench/reader.py`` shard set (default 1 Mi rows × 32 float32
features, 8 shards) is encoded in memory by :func:`pipeline.data.formats.tfrecord.encode_examples`
(``tf.train.Example`` protobufs, CRC32C framing, numpy only) and, alternating, written in
memory by ``pq.write_table`` (the Parquet path of the ETL's shard writer, snappy). Reader:
one epoch of :class:`ShardReader` (rank 0 of 1, shuffle on, verify off) on each format,
alternating. Ratios are medians over the pairs. Writes the "## TFRecord" section of
``bench/RESULTS.md``.

    python bench/tfrecord.py [--rows N] [--repeats R] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import environment, write_section  # noqa: E402
from bench.reader import WORK, reader_arguments, run_reader, shard_set  # noqa: E402
from pipeline.core import storage  # noqa: E402
from pipeline.data.formats import tfrecord  # noqa: E402
from pipeline.data.shardset import MANIFEST_NAME, ShardSet  # noqa: E402

SECTION = "TFRecord"


def tables(uri: str) -> list[pa.Table]:
    ss = ShardSet.open(uri)
    return [pq.read_table(ss.shard_path(s)) for s in ss.split("train").shards]


def encode(table: pa.Table) -> bytes:
    feats = table["features"].combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    return tfrecord.encode_examples(table["key"].combine_chunks(), feats, table["label"].to_numpy())


def write_parquet(table: pa.Table, row_group_rows: int) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows)
    return int(sink.getvalue().size)


def tfrecord_set(uri: str) -> str:
    """The same shard set as TFRecord (regenerated each run: the encoder is what is measured)."""
    dest = WORK / (Path(uri).name + "-tfrecord")
    manifest = json.loads((Path(uri) / MANIFEST_NAME).read_text())
    manifest["file_format"] = "tfrecord"
    shards = manifest["splits"]["train"]["shards"]
    for shard, table in zip(shards, tables(uri), strict=True):
        shard["path"] = shard["path"].replace(".parquet", ".tfrecord")
        (dest / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        data = encode(table)
        (dest / shard["path"]).write_bytes(data)
        shard["bytes"], shard["sha256"] = (
            len(data),
            storage.sha256_stream((dest / shard["path"]).open("rb"))[0],
        )
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(dest)


def measure(uri: str, tfr: str, args: argparse.Namespace) -> dict[str, list[float]]:
    shard_tables = tables(uri)
    rows = sum(len(t) for t in shard_tables)
    keys = ("enc", "enc_mb", "enc_cpu", "pq", "pq_mb", "pq_cpu", "rd_pq", "rd_tf")
    out: dict[str, list[float]] = {k: [] for k in keys}
    writers = (
        ("enc", lambda t: len(encode(t))),
        ("pq", lambda t: write_parquet(t, args.row_group_rows)),
    )
    for rep in range(args.repeats):
        for key, write in writers:
            t0, c0 = time.perf_counter(), time.process_time()
            size = sum(write(t) for t in shard_tables)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[key].append(rows / dt)
            out[f"{key}_mb"].append(size / dt / 1e6)
            out[f"{key}_cpu"].append(size / cpu / 1e6)
        for key, target in (("rd_pq", uri), ("rd_tf", tfr)):
            t0 = time.perf_counter()
            n = run_reader(target, args.batch_size, args.shuffle_buffer_rows, True, rep)
            out[key].append(n / (time.perf_counter() - t0))
    return out


def crc_mb_s(tfr: str) -> float:
    """CRC32C MB per CPU second over the first shard's records (best of 3)."""
    shard = ShardSet.open(tfr).split("train").shards[0]
    data = np.frombuffer(Path(tfr, shard.path).read_bytes(), np.uint8)
    starts, lengths, _ = tfrecord._scan(data, shard.path, 0, final=True)
    best = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        tfrecord.crc32c_many(data, starts + 12, lengths)
        best = min(best, time.process_time() - c0)
    return float(lengths.sum()) / best / 1e6


def report(
    args: argparse.Namespace,
    res: dict[str, list[float]],
    crc: float,
    sizes: tuple[int, int],
    load: tuple[float, float],
) -> str:
    med = {k: statistics.median(v) for k, v in res.items()}
    enc_ratio = statistics.median(a / b for a, b in zip(res["enc"], res["pq"], strict=True))
    rd_ratio = statistics.median(a / b for a, b in zip(res["rd_tf"], res["rd_pq"], strict=True))
    return "\n".join(
        [
            f"`python bench/tfrecord.py --rows {args.rows} --repeats {args.repeats}` — the "
            f"`bench/reader.py` shard set ({args.rows} rows × {args.dim} float32 features, "
            f"{args.shards} shards) as Parquet ({sizes[0] / 1e6:.0f} MB, snappy) and as TFRecord "
            f"({sizes[1] / 1e6:.0f} MB, uncompressed `tf.train.Example`); alternating in one "
            f"process, {args.repeats} repetitions, medians (ratios: median of per-pair ratios).",
            "",
            "| what | TFRecord | Parquet | ratio TFRecord / Parquet |",
            "|---|---:|---:|---:|",
            f"| writer, rows/s (in memory) | {med['enc']:,.0f} | {med['pq']:,.0f} | {enc_ratio:.2f}× |",
            f"| writer, MB/s of output | {med['enc_mb']:.0f} | {med['pq_mb']:.0f} | |",
            f"| writer, MB of output per CPU second | {med['enc_cpu']:.0f} | "
            f"{med['pq_cpu']:.0f} | |",
            f"| ShardReader epoch, samples/s (shuffle on, verify off) | {med['rd_tf']:,.0f} | "
            f"{med['rd_pq']:,.0f} | {rd_ratio:.2f}× |",
            "",
            f"CRC32C alone (numpy, slicing-by-8 with 16-bit tables, over one shard's records): "
            f"{crc:.0f} MB per CPU second. 1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f}.",
            "",
            environment(),
            "",
        ]
    )


def main() -> None:
    args = reader_arguments(__doc__.splitlines()[0], repeats=3).parse_args()
    uri = shard_set(args.rows, args.dim, args.shards, args.row_group_rows)
    tfr = tfrecord_set(uri)
    pq_bytes, tf_bytes = (
        sum(s.bytes for s in ShardSet.open(u).split("train").shards) for u in (uri, tfr)
    )
    load_before = os.getloadavg()[0]
    res = measure(uri, tfr, args)
    load = (load_before, os.getloadavg()[0])
    text = report(args, res, crc_mb_s(tfr), (pq_bytes, tf_bytes), load)
    print(f"## {SECTION}\n\n{text}")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
