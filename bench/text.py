"""Text columns: ETL tokenization throughput, and reader + step time with fixed vs per-batch
padding.

    python bench/text.py [--rows 200000] [--pairs 3] [--shard-rows 20000] [--repeats 3]
                         [--executors 1,2] [--no-write]

a. Tokenization of make-data's ``review`` column (``--rows`` texts, 5–44 pseudo-words) with
   the WordPiece tokenizer the ETL trains on it (``max_length`` 64): the ETL's executor step
   (:func:`preprocessing.features.encode_texts` over a scan of the texts in 8 Parquet files,
   ``local[N]`` for each N of ``--executors``, forced by Spark's ``noop`` sink) vs a
   single-process loop of the same batch encode
   (:func:`preprocessing.features.text.encode_ids`, ``Tokenizer.encode_batch`` + padding, in
   batches of 10,000) over the same texts in a Python list, run in a subprocess twice: with
   ``TOKENIZERS_PARALLELISM=false`` (one thread: the baseline of the target ≥ 1.5×) and with
   the library's default thread pool (every core). The Spark step and the baselines
   alternate; the headline is the median ratio of the pairs at ``local[2]``; texts/s per core
   at 1 and 2 executors show the scaling.
b. One ETL of ``--shard-rows`` make-data rows with ``review`` at ``max_length`` 128; a
   ``ShardReader`` (rank 0 of 1, batch 256, shuffle) over its train split with
   ``text_padding`` ``fixed`` and ``batch``: the reader alone (ms per batch, a whole epoch)
   and the reader plus a training step (forward, backward, AdamW) of the ``text`` model,
   embedding bag (an epoch) and one-layer Transformer (dim 64, the first 12 batches), on the
   CPU; ``--repeats`` alternating runs of each, the median.

Data are generated under ``bench/_work/``. Rewrites the ``## Text`` section of RESULTS.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import environment, spark_session, write_section  # noqa: E402

SECTION = "Text"
WORK = REPO / "bench" / "_work"
BATCH = 10_000
LENGTH = 64


def _etl_cfg(raw: str, out: str, max_length: int) -> Any:
    from preprocessing.config import EtlConfig
    from preprocessing.make_data import demo_etl_section

    section = demo_etl_section(raw, out, "parquet", text=True)
    section.update(numeric=["f0"], categorical=[], onehot=[], num_shards=2)
    section["schema"] = {c: section["schema"][c] for c in ("id", "f0", "review", "label")}
    section["texts"] = {"review": {"max_length": max_length}}
    return EtlConfig.from_mapping(section)


def baseline(texts_file: str, tokenizer_file: str) -> None:
    """The single-process loop (run in a subprocess); prints rows and seconds as JSON."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from preprocessing.features.text import encode_ids

    texts = pq.read_table(texts_file, columns=["review"]).column("review").to_pylist()
    tok = Tokenizer.from_file(tokenizer_file)
    started = time.perf_counter()
    cut = 0
    for i in range(0, len(texts), BATCH):
        _, flags = encode_ids(tok, texts[i : i + BATCH], LENGTH, 0)
        cut += int(flags.sum())
    print(json.dumps({"rows": len(texts), "s": time.perf_counter() - started, "cut": cut}))


def _run_baseline(texts: Path, tokenizer: Path, threads: bool) -> float:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if threads else "false")
    code = f"from bench.text import baseline; baseline({str(texts)!r}, {str(tokenizer)!r})"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True, text=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["s"])


def bench_tokenize(spark: Any, rows: int, pairs: int) -> dict[str, Any]:
    from preprocessing.features import encode_texts, fit_texts
    from preprocessing.make_data import make_data

    raw = WORK / f"text-{rows}"
    if not (raw / "_SUCCESS").exists():
        make_data(spark, rows, str(raw), seed=3, fmt="parquet", text=True, dirty_fraction=0.0)
    cfg = _etl_cfg(str(raw), str(WORK / "text-unused"), LENGTH)
    # The texts as 8 Parquet files (one partition each, as a real input has several), and as
    # one file for the baseline; written once, not timed.
    files = WORK / f"text-{rows}-reviews"
    if not (files / "_SUCCESS").exists():
        texts = spark.read.parquet(str(raw)).select("id", "review")
        texts.repartition(8).write.parquet(str(files))
    df = spark.read.parquet(str(files))
    texts_file = WORK / f"text-{rows}-reviews.parquet"
    if not texts_file.exists():
        df.select("review").toPandas().to_parquet(texts_file)
    fitted = fit_texts(df, cfg)
    tokenizer = WORK / "text-tokenizer.json"
    tokenizer.write_text(fitted["review"].tokenizer_json)
    encode_texts(df.limit(1000), fitted, count=True).write.format("noop").mode("overwrite").save()
    spark_s, single_s, threads_s = [], [], []
    for _ in range(pairs):
        started = time.perf_counter()
        encode_texts(df, fitted, count=True).write.format("noop").mode("overwrite").save()
        spark_s.append(time.perf_counter() - started)
        single_s.append(_run_baseline(texts_file, tokenizer, threads=False))
        threads_s.append(_run_baseline(texts_file, tokenizer, threads=True))
    return {
        "rows": rows,
        "spark_s": spark_s,
        "single_s": single_s,
        "threads_s": threads_s,
        "ratio_single": statistics.median(a / b for a, b in zip(single_s, spark_s, strict=True)),
        "ratio_threads": statistics.median(a / b for a, b in zip(threads_s, spark_s, strict=True)),
        "vocab": fitted["review"].spec.text["vocab_size"] if fitted["review"].spec.text else 0,
    }


def _steps(uri: str, padding: Any, encoder: str | None, limit: int) -> tuple[float, int, float]:
    """ms per batch over the first ``limit`` batches of an epoch, batches, mean batch width;
    ``encoder`` None: the reader only."""
    import torch

    from pipeline.data.reader import ShardReader
    from pipeline.train.inputs import ModelInputs
    from pipeline.train.models import build_model

    reader = ShardReader(
        uri, "train", rank=0, world_size=1, batch_size=256, verify="none", text_padding=padding
    )
    model, opt, inputs = None, None, ModelInputs(reader.inputs)
    if encoder is not None:
        torch.manual_seed(0)
        model = build_model(
            "pipeline.train.models:text",
            input_shape=inputs.input_shape,
            num_outputs=2,
            args={"encoder": encoder, "dim": 64, "layers": 1, "heads": 4},
            inputs=inputs.spec(),
            vocab=inputs.vocab(),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    widths = []
    started = time.perf_counter()
    with reader:
        for batch in reader:
            if len(widths) == limit:
                break
            widths.append(batch.inputs["review"].shape[1])
            if model is not None and opt is not None:
                x, y = inputs.prepare(batch, torch.device("cpu"))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    seconds = time.perf_counter() - started
    return 1000 * seconds / len(widths), len(widths), statistics.mean(widths)


def bench_padding(spark: Any, rows: int, repeats: int) -> dict[str, Any]:
    from preprocessing.etl import run_etl
    from preprocessing.make_data import make_data

    raw = WORK / f"text-shards-raw-{rows}"
    if not (raw / "_SUCCESS").exists():
        make_data(spark, rows, str(raw), seed=4, fmt="parquet", text=True, dirty_fraction=0.0)
    uri = str(WORK / f"text-shards-{rows}")
    run_etl(spark, _etl_cfg(str(raw), uri, 128))
    out: dict[str, Any] = {}
    for what, limit in ((None, 10**9), ("bag", 10**9), ("transformer", 12)):
        _steps(uri, "fixed", what, 2)  # warm-up (page cache, torch kernels)
        runs: dict[str, list[tuple[float, int, float]]] = {"fixed": [], "batch": []}
        for _ in range(repeats):  # alternating; the median ms per batch of each
            for padding in ("fixed", "batch"):
                runs[padding].append(_steps(uri, padding, what, limit))
        for padding, rs in runs.items():
            ms = statistics.median(r[0] for r in rs)
            out[f"{what or 'reader'}/{padding}"] = (ms, rs[0][1], rs[0][2])
    return out


def report(
    toks: dict[int, dict[str, Any]], pad: dict[str, Any], shard_rows: int, load: tuple[float, float]
) -> str:
    def secs(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    by_cores = {c: t["rows"] / statistics.median(t["spark_s"]) for c, t in toks.items()}
    tok = toks[max(toks)]
    single = [t for c in toks for t in toks[c]["single_s"]]
    pool = [t for c in toks for t in toks[c]["threads_s"]]
    lines = [
        environment(),
        f"Load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f} (2 CPUs).",
        "",
        f"### a. Tokenization: {tok['rows']:,} make-data reviews, WordPiece "
        f"(vocabulary {tok['vocab']}), max_length {LENGTH}",
        "",
        "| run | seconds per pass | texts/s (median) | texts/s per core | ETL faster by |",
        "|---|---|---:|---:|---|",
        *(
            f"| ETL step on local[{c}] (`encode_texts`, 8 Parquet files → noop) | "
            f"{secs(t['spark_s'])} | {by_cores[c]:,.0f} | {by_cores[c] / c:,.0f} | "
            f"{t['ratio_single']:.2f}× one thread, {t['ratio_threads']:.2f}× the pool |"
            for c, t in sorted(toks.items())
        ),
        f"| single process, `TOKENIZERS_PARALLELISM=false` | {secs(single)} | "
        f"{tok['rows'] / statistics.median(single):,.0f} | "
        f"{tok['rows'] / statistics.median(single):,.0f} | — |",
        f"| single process, tokenizers' own thread pool (2 threads) | {secs(pool)} | "
        f"{tok['rows'] / statistics.median(pool):,.0f} | "
        f"{tok['rows'] / statistics.median(pool) / 2:,.0f} | — |",
        "",
        *(
            [
                f"Scaling of the ETL step: local[2] / local[1] = {by_cores[2] / by_cores[1]:.2f}×.",
                "",
            ]
            if 1 in by_cores and 2 in by_cores
            else []
        ),
        f"### b. Reader and training step, fixed vs per-batch padding ({shard_rows:,} rows, "
        "max_length 128, batch 256, CPU, median of alternating runs)",
        "",
        "| what | fixed: ms / batch | per-batch: ms / batch | speed-up | mean width fixed → batch |",
        "|---|---|---|---|---|",
    ]
    met = "met" if tok["ratio_single"] >= 1.5 else "**not met** in this run"
    met_pool = "met" if tok["ratio_threads"] >= 1.0 else "**not met** in this run"
    lines.insert(
        len(lines) - 4,  # after table a and its blank line
        f"At local[2] the ETL is {tok['ratio_single']:.2f}× one thread (target ≥ 1.5×: {met}) and "
        f"{tok['ratio_threads']:.2f}× tokenizers' thread pool (target ≥ 1.0×: {met_pool}). The "
        "ratios are medians of the pairs alternating with that executor count. Both sides run the same `encode_batch` + padding code; the ETL side adds the "
        "Parquet scan and the Arrow round trip to the Python workers.\n",
    )
    for what in ("reader", "bag", "transformer"):
        f, b = pad[f"{what}/fixed"], pad[f"{what}/batch"]
        name = {"reader": "reader alone", "bag": "reader + step, embedding bag"}.get(
            what, "reader + step, Transformer (1 layer)"
        )
        lines.append(
            f"| {name} | {f[0]:.2f} | {b[0]:.2f} | {f[0] / b[0]:.2f}× | {f[2]:.0f} → {b[2]:.1f} |"
        )
    lines += [
        "",
        "Per-batch padding keeps the rows of every batch (equal steps, shuffle and resume "
        "unchanged) and only drops trailing all-pad positions, so it is the reader's default "
        '(`text_padding="batch"`); `"fixed"` keeps `max_length`.',
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--executors", default="1,2", help="local[N] for each N, in turn")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    toks = {}
    for cores in sorted(int(c) for c in args.executors.split(",")):
        spark = spark_session("4g", f"local[{cores}]")
        toks[cores] = bench_tokenize(spark, args.rows, args.pairs)
        if cores != max(toks):
            spark.stop()
    pad = bench_padding(spark, args.shard_rows, args.repeats)
    text = report(toks, pad, args.shard_rows, (load_before, os.getloadavg()[0]))
    print(f"## {SECTION}\n\n{text}")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
