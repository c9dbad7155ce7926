"""The ETL stage: raw table → validated, split, featurized, balanced shards + manifest.

Passes over the data: one read that is validated, split and cached; one aggregation that
counts everything the manifest and the balance plan need (rows by split, reason, column,
input partition and — for classification — label); the quarantine write; on the cached
train split, the tabular statistics (one aggregation and one count of the categorical
levels), one aggregation for the array statistics and, per text column without a given
tokenizer, one bounded sample gathered to train it; one shuffle that writes the shards,
tokenizing text columns in its map stage. The manifest is committed last; old generations
are deleted only after the commit.

Images are decoded once, by the shard writers (:mod:`preprocessing.shards`): the cache and
the shuffle carry each image's path or encoded bytes, and the pixels go from Pillow straight
into the shard. That needs every image to decode, as the balance plan is made first. When one
does not, the writers' output is removed and the ETL runs again decoding during validation
(:func:`~preprocessing.read.validation.validate`), where the row is quarantined before the
plan is made; a shard set whose last build quarantined an image that way is rebuilt that way
from the start. Both placements give the same shards, byte for byte, and the same schema,
statistics and counts in the manifest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.core import storage
from pipeline.core.configbase import to_dict
from pipeline.core.outputs import check_disjoint, check_output_dir
from pipeline.core.redact import redact
from pipeline.data.columns import arrow_schema
from pipeline.data.formats import get_format
from pipeline.data.manifest import Label, Manifest, Quarantine, Reconciliation
from pipeline.data.shardset import FEATURES_COLUMN, KEY_COLUMN, LABEL_COLUMN, SPLITS
from preprocessing import manifest as mf
from preprocessing.config import EtlConfig
from preprocessing.features import (
    FittedFeatures,
    FittedTensors,
    apply_features,
    fit_features,
    fit_tensors,
    tensor_inputs,
)
from preprocessing.features.image import image_normalize
from preprocessing.read import (
    CORRUPT,
    REASON,
    REASON_COLUMN,
    SOURCE,
    RawInput,
    quarantined_columns,
    read_raw,
    validate,
)
from preprocessing.read.imagedecode import IMAGE_REASONS
from preprocessing.read.images import ARROW_BATCH_ROWS, image_spec
from preprocessing.shards import (
    BUCKET,
    SPLIT,
    ImagesFailedToDecode,
    ShardPlan,
    assign_split,
    shard_columns,
    with_buckets,
    write_shards,
)

__all__ = ["EtlError", "EtlResult", "run_etl"]

log = logging.getLogger(__name__)


class EtlError(RuntimeError):
    """The ETL cannot produce a usable shard set from this input (message says why)."""


@dataclass(frozen=True)
class EtlResult:
    """What an ETL run did."""

    output: str
    status: str  # "built" | "up_to_date"
    manifest: dict[str, Any]
    seconds: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)  # wall seconds per phase

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        m = self.manifest
        rec = m["reconciliation"]
        lines = [
            f"shard set {self.output}: {'up to date (nothing to do)' if self.status == 'up_to_date' else 'built'}"
            + (f" in {self.seconds:.1f}s" if self.status == "built" else ""),
            f"  rows_in={rec['rows_in']} rows_ok={rec['rows_ok']} rows_quarantined={rec['rows_quarantined']}",
            "  splits: " + ", ".join(f"{s}={m['splits'][s]['rows']}" for s in SPLITS),
        ]
        by_reason = m["quarantine"]["by_reason"]
        if by_reason:
            lines.append("  quarantine: " + ", ".join(f"{r}={n}" for r, n in by_reason.items()))
        return "\n".join(lines)


@dataclass
class _Tally:
    """Counts from the single aggregation pass."""

    rows_in: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_column: Counter[str] = field(default_factory=Counter)
    plan_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    labels: set[Any] = field(default_factory=set)
    train_values: Counter[str] = field(default_factory=Counter)  # non-null numeric values

    @property
    def rows_quarantined(self) -> int:
        return sum(self.by_reason.values())


# The validation projection is wide (a check per column). HotSpot does not JIT-compile
# methods over 8000 bytecodes, so Spark's default 64 KB limit on generated methods leaves
# that stage interpreted; measured on 1 M make-data rows: 14.5 s → 9.0 s for validation.
# The cached rows are mostly doubles, which the columnar cache stores as they are anyway;
# not compressing the rest took building the cache from 15.0 s to 12.7 s (26.6 → 23.0 CPU s)
# on 1 M make-data rows, for a cache 7 % larger (156 MB instead of 146 MB).
_ETL_SQL_CONF = {
    "spark.sql.codegen.hugeMethodLimit": "8000",
    "spark.sql.inMemoryColumnarStorage.compressed": "false",
}


@contextmanager
def _sql_conf(spark: SparkSession, conf: dict[str, str]) -> Iterator[None]:
    """Set session SQL confs for the block, restoring the caller's values afterwards."""
    previous: dict[str, str | None] = {k: spark.conf.get(k, None) for k in conf}
    for k, v in conf.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, old in previous.items():
            if old is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, old)


class _PhaseTimer:
    """Wall seconds per ETL phase (logged, and recorded in the manifest as ``timings_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        log.info("etl phase %s: %.1fs", name, self.seconds[name])


def _tally(df: DataFrame, cfg: EtlConfig) -> _Tally:
    label = (
        F.when(F.col(REASON).isNull(), F.col(cfg.label))
        if cfg.resolved_task == "classification"
        else F.lit(None)
    )
    rows = (
        df.groupBy(
            F.spark_partition_id().alias("pid"),
            F.col(SPLIT),
            F.col(REASON),
            F.col(REASON_COLUMN),
            label.alias("lbl"),
        )
        .agg(
            F.count(F.lit(1)).alias("count"),
            *[F.count(F.col(c)).alias(f"_n_{i}") for i, c in enumerate(cfg.numeric)],
        )
        .collect()
    )
    t = _Tally()
    for r in rows:
        n = int(r["count"])
        t.rows_in += n
        if r[REASON] is not None:
            t.by_reason[r[REASON]] += n
            if r[REASON_COLUMN]:
                t.by_column[r[REASON_COLUMN]] += n
            continue
        key = (r[SPLIT], int(r["pid"]))
        t.plan_counts[key] = t.plan_counts.get(key, 0) + n
        if r[SPLIT] == "train":
            for i, c in enumerate(cfg.numeric):
                t.train_values[c] += int(r[f"_n_{i}"])
        if r["lbl"] is not None:
            t.labels.add(r["lbl"])
    return t


def run_etl(spark: SparkSession, cfg: EtlConfig, *, force: bool = False) -> EtlResult:
    """Run the ETL; a no-op (status ``up_to_date``) when inputs and config are unchanged."""
    started = time.monotonic()
    timer = _PhaseTimer()
    _check_output(cfg)
    with timer("read_header_fingerprint"):
        raw = read_raw(spark, cfg)
        cfg_dict = to_dict(cfg)
        inputs = tensor_inputs(cfg)  # e.g. a provided tokenizer.json is an input too
        fp_config = {**cfg_dict, **inputs} if inputs else cfg_dict
        fp = mf.fingerprint(raw, cfg, fp_config)
        existing = mf.read_existing(cfg.output)
    if (
        not force
        and existing is not None
        and mf.is_up_to_date(cfg.output, existing, fp["combined"])
    ):
        return EtlResult(cfg.output, "up_to_date", existing)
    generation = uuid.uuid4().hex[:10]
    conf = dict(_ETL_SQL_CONF)
    if cfg.images:
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = ARROW_BATCH_ROWS
    build = _Build(cfg, generation, cfg_dict, fp, timer)
    with _sql_conf(spark, conf):
        manifest = _build_shards(build, raw, _decode_in_writers(cfg, existing))
    with timer("commit"):
        mf.commit_manifest(cfg.output, manifest)
    with timer("cleanup"):
        removed = mf.cleanup_generations(cfg.output, generation)
    log.info("committed generation %s; removed %d old entries", generation, removed)
    return EtlResult(
        cfg.output, "built", manifest.to_json(), time.monotonic() - started, timer.seconds
    )


@dataclass(frozen=True)
class _Build:
    """What every attempt at building one generation of the shard set shares."""

    cfg: EtlConfig
    generation: str
    cfg_dict: dict[str, Any]
    fp: dict[str, str]
    timer: _PhaseTimer


def _decode_in_writers(cfg: EtlConfig, existing: dict[str, Any] | None) -> bool:
    """Decode the images in the shard writers (see the module docstring).

    Not when the last build of this output quarantined an image for what decoding found: it
    would most likely fail again, so the images are decoded during validation from the start.
    """
    if not cfg.images:
        return False
    by_reason = (existing or {}).get("quarantine", {}).get("by_reason", {})
    return not any(r in by_reason for r in IMAGE_REASONS)


@contextmanager
def _validated(build: _Build, raw: RawInput, *, decode_images: bool) -> Iterator[DataFrame]:
    """The validated, split input, cached for the block."""
    validated = assign_split(validate(raw, build.cfg, decode_images=decode_images), build.cfg)
    validated = validated.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        yield validated
    finally:
        validated.unpersist()


def _build_shards(build: _Build, raw: RawInput, in_writers: bool) -> Manifest:
    """Build with the images decoded in the writers (``in_writers``) or during validation."""
    if build.cfg.images:
        where = "the shard writers" if in_writers else "validation (the last build quarantined one)"
        log.info("decoding the images of %s in %s", build.cfg.input.path, where)
    if in_writers:
        started = time.perf_counter()
        try:
            with _validated(build, raw, decode_images=False) as validated:
                return _build(build, validated, in_writers=True)
        except ImagesFailedToDecode as failed:
            log.warning(
                "%d image(s) of %s did not decode in the shard writers; nothing they wrote is "
                "kept. Decoding the images during validation instead, which quarantines those "
                "rows (the next build of %s does so from the start)",
                failed.count,
                build.cfg.input.path,
                build.cfg.output,
            )
            spent = round(time.perf_counter() - started, 3)
            build.timer.seconds["images_failed_in_writers"] = spent
    with _validated(build, raw, decode_images=True) as validated:
        return _build(build, validated, in_writers=False)


def _build(build: _Build, validated: DataFrame, in_writers: bool) -> Manifest:
    cfg, timer, generation = build.cfg, build.timer, build.generation
    with timer("read_validate_count"):
        tally = _tally(validated, cfg)
    quarantine_rel = f"quarantine/{generation}"
    if tally.rows_quarantined:
        with timer("quarantine"):
            _write_quarantine(validated, cfg, storage.join(cfg.output, quarantine_rel))
    classes = _classes(cfg, tally)
    plan = ShardPlan(tally.plan_counts, cfg.num_shards)
    _check_trainable(cfg, tally, plan, storage.join(cfg.output, quarantine_rel))
    ok = validated.filter(F.col(REASON).isNull())
    train = ok.filter(F.col(SPLIT) == "train")
    later = list(cfg.images) if in_writers else []
    with timer("fit_features"):
        fitted = fit_features(train, cfg)
        tensors = fit_tensors(train, cfg, later)
    _warn_text_like(cfg, fitted, plan.split_rows("train"))
    features_rel = f"features/{generation}"
    with timer("save_features"):
        fitted.model.write().overwrite().save(storage.join(cfg.output, features_rel))
        tensors.save(storage.join(cfg.output, features_rel))
    encoded = _encoded(ok, cfg, fitted, classes, plan, tensors)
    dim = fitted.dim if cfg.has_tabular else None
    columns = shard_columns(dim, cfg.dtype(cfg.key), cfg.resolved_task, tensors.specs)
    with timer("write_shards"):
        schema = arrow_schema(columns, layout=get_format(cfg.format).tensor_layout)
        images = {c: image_spec(cfg, c) for c in later}
        written = write_shards(encoded, plan, cfg, schema, generation, images)
    if later:  # the image statistics the writers summed
        sums = written.train_image_sums
        tensors = tensors.with_normalize({c: image_normalize(cfg, c, sums[c]) for c in later})
        columns = shard_columns(dim, cfg.dtype(cfg.key), cfg.resolved_task, tensors.specs)
    rows_ok = sum(plan.split_rows(s) for s in SPLITS)
    if rows_ok + tally.rows_quarantined != tally.rows_in:  # pragma: no cover - invariant
        raise AssertionError("reconciliation failed: rows_ok + rows_quarantined != rows_in")
    return mf.build_manifest(
        generation=generation,
        config=redact(build.cfg_dict, "etl"),
        file_format=cfg.format,
        fingerprint=build.fp,
        schema=[c.to_manifest() for c in columns],
        feature_names=fitted.names,
        label=Label(cfg.label, cfg.resolved_task, None if classes is None else tuple(classes)),
        row_group_rows=cfg.row_group_rows,
        quarantine=Quarantine(
            rows=tally.rows_quarantined,
            by_reason=dict(sorted(tally.by_reason.items())),
            by_column=dict(sorted(tally.by_column.items())),
            path=quarantine_rel if tally.rows_quarantined else None,
        ),
        reconciliation=Reconciliation(tally.rows_in, rows_ok, tally.rows_quarantined),
        feature_stats=fitted.stats,
        features_model=features_rel,
        text={c: {"truncated": n} for c, n in written.truncated.items()} or None,
        timings_s=dict(timer.seconds),  # up to here; EtlResult.timings_s has all phases
        splits=written.splits,
    )


def _encoded(
    ok: DataFrame,
    cfg: EtlConfig,
    fitted: FittedFeatures,
    classes: list[Any] | None,
    plan: ShardPlan,
    tensors: FittedTensors,
) -> DataFrame:
    """The good rows as shard rows: key, features, tensors, encoded label, shard bucket.

    Each tensor kind encodes its columns (text: token ids, with their ``_trunc_`` flags,
    counted by the writers).
    """
    used = dict.fromkeys([cfg.key, cfg.label, *cfg.numeric, *cfg.categorical, *cfg.tensor_columns])
    bucketed = with_buckets(ok.select(*used, SPLIT), plan)  # before featurizing: see with_buckets
    features = [F.col(FEATURES_COLUMN)] if cfg.has_tabular else []
    rows = apply_features(fitted.model, bucketed).select(
        F.col(cfg.key).alias(KEY_COLUMN),
        *features,
        *[F.col(c) for c in cfg.tensor_columns],
        _encode_label(cfg, classes).alias(LABEL_COLUMN),
        F.col(BUCKET),
    )
    return tensors.encode(rows)


TEXT_LIKE_LEVELS = 0.9
"""A categorical column with more train levels than this fraction of the train rows is
probably free text: the ETL warns (``etl.texts`` would tokenize it)."""


def _warn_text_like(cfg: EtlConfig, fitted: FittedFeatures, train_rows: int) -> None:
    """Warn about categorical columns whose train levels are nearly one per row."""
    levels = fitted.stats.get("categorical", {})
    for c in cfg.categorical:
        n = int(levels[c]["levels"])
        if train_rows >= 20 and n > TEXT_LIKE_LEVELS * train_rows:
            log.warning(
                "categorical column %r has %d distinct values in %d train rows: almost every "
                "row is its own category, so a model learns nothing from it. If it holds free "
                "text, declare it under etl.texts (tokenized) instead of etl.categorical",
                c,
                n,
                train_rows,
            )


def _check_trainable(cfg: EtlConfig, tally: _Tally, plan: ShardPlan, quarantine: str) -> None:
    """Raise :class:`EtlError` when the train split cannot fit the features."""
    if plan.split_rows("train") == 0:
        kept = f", see {quarantine}" if tally.rows_quarantined else ""
        raise EtlError(
            f"no valid rows in the train split of {cfg.input.path} (rows_in={tally.rows_in}, "
            f"quarantined={tally.rows_quarantined}: {dict(tally.by_reason)}{kept}); "
            "nothing to fit features on"
        )
    _check_numeric_values(cfg, tally, plan.split_rows("train"))


def _check_output(cfg: EtlConfig) -> None:
    """``etl.output`` follows :mod:`pipeline.core.outputs` and is not inside ``etl.input.path``."""
    inputs = {} if cfg.input.format == "table" else {"etl.input.path": cfg.input.path}
    check_disjoint({"etl.output": cfg.output}, inputs)
    check_output_dir("etl.output", cfg.output, "shardset")


def _check_numeric_values(cfg: EtlConfig, tally: _Tally, train_rows: int) -> None:
    """A numeric column with no value in train cannot be imputed or standardized."""
    empty = [c for c in cfg.numeric if tally.train_values[c] == 0]
    if empty:
        raise EtlError(
            f"numeric column(s) {empty} of {cfg.input.path} have no finite value in the "
            f"{train_rows} good train rows: nothing to impute or standardize with (is the "
            "column absent from the input, or always empty?)"
        )


def _classes(cfg: EtlConfig, tally: _Tally) -> list[Any] | None:
    if cfg.resolved_task != "classification":
        return None
    if cfg.classes is not None:
        return list(cfg.classes)
    return sorted(tally.labels, key=lambda v: (str(type(v)), v))


def _encode_label(cfg: EtlConfig, classes: list[Any] | None) -> Any:
    if classes is None:
        return F.col(cfg.label).cast("float")
    values = F.array(*[F.lit(c).cast(cfg.dtype(cfg.label)) for c in classes])
    return (F.array_position(values, F.col(cfg.label)) - F.lit(1)).cast("long")


def _write_quarantine(df: DataFrame, cfg: EtlConfig, path: str) -> None:
    """Rejected rows: declared columns as read (image bytes as binary), reason, source."""
    kept = quarantined_columns(cfg)
    (
        df.filter(F.col(REASON).isNotNull())
        .select(
            *[kept[c].alias(c) for c in cfg.schema],
            F.col(REASON).alias("reason"),
            F.col(REASON_COLUMN).alias("reason_column"),
            kept[CORRUPT].alias("raw_record"),
            kept[SOURCE].alias("source_file"),
            F.col(SPLIT).alias("split"),
        )
        .write.mode("overwrite")
        .parquet(path)
    )
