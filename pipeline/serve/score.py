"""Batch scoring: a model bundle applied to a Spark DataFrame or a table, in Arrow batches.

Per row, the same steps as the ETL and the training run, so nothing differs between
training and serving:

1. the ETL's feature checks (:func:`preprocessing.read.validate_features`: the ETL's
   validation without the key and label checks, since scoring input normally has no label);
   Array columns are checked and cast to ``array<float>``, image columns decoded (the ETL's
   Pillow decoder, resize and channel conversion), exactly as the shards get them;
2. the bundle's fitted feature ``PipelineModel`` (``features/``), applied with the ETL's own
   :func:`preprocessing.features.apply_features` (only when the etl section has numeric or
   categorical columns: an array / image-only bundle has no ``features`` vector);
   text columns tokenized by :func:`preprocessing.features.encode_texts` with the tokenizers
   saved in the bundle's ``features/text/`` (the ones that encoded the shards), in
   ``mapInArrow`` batches; a row with a reason is not tokenized;
3. the network, in ``mapInArrow`` batches, fed every input column ``model.json`` records
   (:attr:`~pipeline.train.bundle.LoadedBundle.inputs`) and normalized on the way in by the
   training code itself (:func:`pipeline.train.engine.to_model`). The model is loaded once per Python worker:
   :func:`~pipeline.serve.predict.cached_bundle` keeps it in a module-level cache keyed by the bundle URI and the
   sha256 of its weights (computed on the driver), which later batches and later tasks in
   the same reused worker hit. A bundle rewritten in place gets a new digest, hence a reload.

The result keeps every input column unchanged and adds ``prediction`` (classification: the
class in the label's original values and type, e.g. ``0``/``1`` or ``"cat"``; regression: a
double), ``probability`` (classification only: ``array<float>``, one entry per class in the
order of ``model.json``'s ``classes``), ``score_error`` and ``score_error_column``. A row the
ETL would quarantine for a reason that scoring checks (those of
:data:`preprocessing.read.reasons.REASONS` whose ``scored`` is true: every reason but the key's
and the label's; same codes, same priority) gets a null prediction and the reason instead of
failing the job.

The ``etl`` section that built the training data comes from ``model.json`` (written there by
training); bundles from before it was recorded fall back to the manifest of the shard set
they were trained on.

:func:`score_table` reads a table the way the ETL reads its input (the bundle's
``etl.input`` format and options, or ``fmt``) and writes Parquet. Where the filesystem can
rename (local, HDFS) the files go to a temporary sibling ``.tmp-<uuid>-<name>`` that is
renamed to the output when Spark's job has committed, replacing an old output, so a reader
sees the old result or the complete new one. Object stores cannot rename a directory: there
Spark's committer writes in place and ``_SUCCESS`` marks a complete output.

Only :mod:`pipeline.serve.predict` (the cached model and the batch code) runs in executors.
pyspark and ``preprocessing`` are imported inside the driver-side functions, so this module
imports without Spark.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pipeline.core import storage
from pipeline.core.configbase import ConfigError, check
from pipeline.core.connect import is_connect
from pipeline.core.driver import require_driver
from pipeline.data.shardset import FEATURES_COLUMN, ShardSet, ShardSetError
from pipeline.serve.predict import (
    CLASS_INDEX,
    PREDICTION,
    PROBABILITY,
    VALUE,
    Counter,
    PredictJob,
    cached_bundle,
    predict_partition,
)
from preprocessing.config import INPUT_FORMATS as CONFIG_INPUT_FORMATS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from preprocessing.config import EtlConfig
    from preprocessing.read import RawInput

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_COLUMNS",
    "PREDICTION",
    "PROBABILITY",
    "SCORE_ERROR",
    "SCORE_ERROR_COLUMN",
    "ScoreResult",
    "cached_bundle",
    "score",
    "score_table",
]

log = logging.getLogger(__name__)

SCORE_ERROR = "score_error"
SCORE_ERROR_COLUMN = "score_error_column"
OUTPUT_COLUMNS = (PREDICTION, PROBABILITY, SCORE_ERROR, SCORE_ERROR_COLUMN)
INPUT_FORMATS = CONFIG_INPUT_FORMATS
"""``fmt`` choices: every ``etl.input.format``."""
_KEEP = "_in_"  # input columns travel under this prefix while features take their names


@dataclass(frozen=True)
class _Bundle:
    """A bundle as the driver sees it: its spec, weights digest and etl section."""

    uri: str
    spec: dict[str, Any]
    sha256: str
    etl: EtlConfig

    @property
    def task(self) -> str:
        return str(self.spec["task"])


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_table` wrote."""

    output: str
    rows: int
    errors: dict[str, int]
    """Rows with a ``score_error`` (null prediction), by reason."""
    model_loads: int | None
    """Times a Python worker loaded the model (at most one per worker and bundle version);
    None on a Spark Connect session, which has no accumulators to count them."""
    seconds: float

    @property
    def predicted(self) -> int:
        """Rows with a prediction."""
        return self.rows - sum(self.errors.values())

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"scored {self.rows} rows into {self.output} (parquet) in {self.seconds:.1f}s: "
            f"{self.predicted} predicted, {sum(self.errors.values())} with {SCORE_ERROR}"
        ]
        if self.errors:
            lines.append(
                f"  {SCORE_ERROR}: " + ", ".join(f"{r}={n}" for r, n in self.errors.items())
            )
        if self.model_loads is None:
            lines.append("  model loads not counted (Spark Connect has no accumulators)")
        else:
            lines.append(f"  model loaded {self.model_loads} time(s) in Python workers")
        return "\n".join(lines)


# -- driver side ----------------------------------------------------------------------------


def _open_bundle(uri: str) -> _Bundle:
    """Spec, weights digest and etl section of the bundle at ``uri``.

    Its model must build here (a ``ConfigError`` naming ``--model`` and the builder, see
    :func:`~pipeline.train.bundle.check_bundle_model`). A bundle whose etl section has numeric or categorical columns needs its ``features/``.
    """
    from pipeline.train.bundle import FEATURES, WEIGHTS, BundleError, check_bundle_model
    from preprocessing.config import EtlConfig

    spec = check_bundle_model(uri)  # here, not in every Python worker
    fs, root = storage.resolve(uri)
    has_features = spec.get("features") and storage.exists(fs, storage.join(root, FEATURES))
    no_features = BundleError(
        f"{uri} has no {FEATURES}/ (its shard set had no feature model): scoring raw rows "
        "needs the fitted feature PipelineModel"
    )
    try:
        etl = EtlConfig.from_mapping(_etl_section(uri, spec))
    except BundleError:
        if not has_features:  # every ETL saves a feature model, even an empty one
            raise no_features from None
        raise
    if (etl.has_tabular or etl.texts) and not has_features:
        raise no_features
    sha256, _ = storage.sha256_file(fs, storage.join(root, WEIGHTS))
    return _Bundle(uri, spec, sha256, etl)


def _etl_section(uri: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``model.json``'s ``etl``; older bundles: the config in their shard set's manifest."""
    from pipeline.train.bundle import BundleError

    if spec.get("etl"):
        return dict(spec["etl"])
    shards_uri = (spec.get("shardset") or {}).get("uri")
    try:
        shards = ShardSet.open(str(shards_uri))
    except ShardSetError as e:
        raise BundleError(
            f"{uri}/model.json has no etl section and its shard set cannot be opened ({e}); "
            "scoring needs the etl schema"
        ) from e
    log.warning("%s has no etl section; using the one in %s's manifest", uri, shards_uri)
    return dict(shards.info.config)


def score(
    spark: SparkSession,
    df: DataFrame,
    bundle: str,
    *,
    batch_size: int = 4096,
    load_counter: Counter | None = None,
) -> DataFrame:
    """Score ``df`` with the bundle at URI ``bundle`` (lazy: returns the scored DataFrame).

    ``df`` needs the feature, array and image columns of the bundle's ``etl.schema`` (any
    types that cast to the declared ones, e.g. strings; an image column holds bytes, or paths
    / URIs when declared string); the key and label may be absent. Its columns come
    back unchanged, plus :data:`OUTPUT_COLUMNS` (``probability`` for classification only).
    ``batch_size`` rows go through the network at once; ``load_counter`` (e.g.
    ``spark.sparkContext.accumulator(0)``; classic sessions only) counts model loads in the
    workers.
    Raises :class:`~pipeline.train.bundle.BundleError` for a missing or incomplete bundle and
    :class:`~preprocessing.read.SchemaMismatchError` naming absent feature columns.
    """
    from preprocessing.read import CORRUPT, RawInput, require_columns

    require_driver("pipeline.serve.score.score")
    opened = _open_bundle(bundle)
    cfg = opened.etl
    features = [*cfg.numeric, *cfg.categorical, *cfg.tensor_columns]
    require_columns(df.columns, features, f"the DataFrame to score with {bundle}")
    keep = list(df.columns)
    if CORRUPT not in df.columns:
        df = df.withColumn(CORRUPT, _null_string())
    text = all(df.schema[c].dataType.typeName() == "string" for c in features)
    return _score_raw(spark, RawInput(df, text=text), opened, keep, batch_size, load_counter)


def _score_raw(
    spark: SparkSession,
    raw: RawInput,
    opened: _Bundle,
    keep: Sequence[str],
    batch_size: int,
    load_counter: Counter | None,
) -> DataFrame:
    """Validate, featurize, predict; ``keep`` are the input columns to return unchanged."""
    from pyspark.sql import functions as F

    from preprocessing.read import REASON, REASON_COLUMN, validate_features

    taken = sorted(set(keep) & set(OUTPUT_COLUMNS))
    if taken:
        raise ValueError(f"the input already has column(s) {taken} that scoring adds; rename them")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    checked = validate_features(raw, opened.etl, keep=keep, keep_prefix=_KEEP)
    inputs = _input_names(opened)
    featurized = _featurized(spark, opened, checked).select(
        *[_KEEP + c for c in keep], *inputs, REASON, REASON_COLUMN
    )
    job = PredictJob(
        uri=opened.uri,
        sha256=opened.sha256,
        task=opened.task,
        inputs=inputs,
        batch_size=batch_size,
        reason_column=REASON,
        counter=load_counter,
    )
    predicted = _constraint_barrier(featurized).mapInArrow(
        functools.partial(predict_partition, job=job),
        _output_schema(featurized, opened.task, inputs),
    )
    return predicted.select(
        *[F.col(_KEEP + c).alias(c) for c in keep],
        *_prediction_columns(opened),
        F.col(REASON).alias(SCORE_ERROR),
        F.col(REASON_COLUMN).alias(SCORE_ERROR_COLUMN),
    )


def _input_names(opened: _Bundle) -> tuple[str, ...]:
    """The columns the network takes, as ``model.json`` records them (``features``, tensors).

    Each must be one the etl section makes: ``features`` for numeric / categorical columns,
    or an array / image column.
    """
    from pipeline.train.bundle import BundleError
    from pipeline.train.inputs import ModelInputs

    names = ModelInputs.from_spec(opened.spec).names
    etl = opened.etl
    made = {*etl.tensor_columns, *([FEATURES_COLUMN] if etl.has_tabular else [])}
    unknown = [n for n in names if n not in made]
    if unknown:
        raise BundleError(
            f"{opened.uri}: the model takes column(s) {unknown} that its etl section does not "
            f"make (it makes {sorted(made)})"
        )
    return names


def _featurized(spark: SparkSession, opened: _Bundle, checked: DataFrame) -> DataFrame:
    """``checked`` with the ``features`` vector and the text columns' token ids.

    The vector comes from the bundle's ``features/`` model (when the etl section has one), the
    ids from the tokenizers saved beside it.
    """
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from pipeline.train.bundle import FEATURES
    from pipeline.train.inputs import ModelInputs
    from preprocessing.features import apply_features, encode_texts, load_texts
    from preprocessing.read import REASON

    out = checked
    if opened.etl.has_tabular:
        model = PipelineModel.read().session(spark).load(storage.join(opened.uri, FEATURES))
        out = apply_features(model, checked)
    columns = ModelInputs.from_spec(opened.spec).columns
    specs = {c.name: c.column.spec for c in columns if c.column.kind == "text"}
    if not specs:
        return out
    # a rejected row's text (maybe 1 MB) is not tokenized; one projection for every column
    out = out.withColumns({c: F.when(F.col(REASON).isNull(), F.col(c)) for c in specs})
    return encode_texts(out, load_texts(specs, storage.join(opened.uri, FEATURES)))


def _constraint_barrier(df: DataFrame) -> DataFrame:
    """``df`` behind a one-projection ``Expand`` (an unpivot of one constant column).

    A filter on the scored DataFrame makes Spark's optimizer derive constraints through every
    projection below it, and the validation and feature projections hold expressions over
    every column: a filter on 3,000 scored make-data rows had not finished optimizing after
    10 minutes (then the driver ran out of heap). ``Expand`` is the one operator that starts
    from no constraints (PySpark 4.3), so the derivation stops there; at run time it is a
    code-generated copy of each row.
    """
    from pyspark.sql import functions as F

    one, variable, value = "_barrier", "_barrier_variable", "_barrier_value"
    expanded = df.withColumn(one, F.lit(0)).unpivot(tuple(df.columns), [one], variable, value)
    return expanded.drop(variable, value)


def _output_schema(featurized: DataFrame, task: str, inputs: Sequence[str]) -> Any:
    from pyspark.sql import types as T

    fields = [f for f in featurized.schema.fields if f.name not in inputs]
    if task == "classification":
        fields += [
            T.StructField(CLASS_INDEX, T.IntegerType(), True),
            T.StructField(PROBABILITY, T.ArrayType(T.FloatType(), False), True),
        ]
    else:
        fields.append(T.StructField(VALUE, T.DoubleType(), True))
    return T.StructType(fields)


def _prediction_columns(opened: _Bundle) -> list[Column]:
    """``prediction`` (a class in the label's declared type, or the value) [+ ``probability``]."""
    from pyspark.sql import functions as F

    if opened.task != "classification":
        return [F.col(VALUE).alias(PREDICTION)]
    dtype = opened.etl.dtype(opened.etl.label)
    classes = F.array(*[F.lit(c).cast(dtype) for c in opened.spec["classes"]])
    index = F.col(CLASS_INDEX)
    # The guard is not redundant: on PySpark 4.3, element_at(<literal array>, NULL) returns
    # the array's last element instead of NULL.
    return [
        F.when(index.isNotNull(), F.element_at(classes, index + F.lit(1))).alias(PREDICTION),
        F.col(PROBABILITY),
    ]


def _null_string() -> Column:
    from pyspark.sql import functions as F

    return F.lit(None).cast("string")


def score_table(
    spark: SparkSession,
    bundle: str,
    input: str,
    output: str,
    *,
    fmt: str | None = None,
    batch_size: int = 4096,
) -> ScoreResult:
    """Score the table at ``input`` with ``bundle`` and write Parquet to ``output``.

    ``input`` is read like the ETL's input: format ``fmt`` or the bundle's
    ``etl.input.format`` (csv, json, parquet, or a catalog table), with that section's
    options when the format is the same (an ``image_folder`` input's rows keep the file's URI
    and folder name, not the image bytes). The arguments mirror ``spark-train score``'s flags,
    and a missing bundle or input is a :class:`~pipeline.core.configbase.ConfigError` naming
    ``--model`` / ``--input``.
    """
    from pipeline.train.bundle import require_bundle
    from preprocessing.read import CORRUPT, SOURCE, missing_input_as_config_error, read_raw

    require_driver("pipeline.serve.score.score_table")
    started = time.monotonic()
    require_bundle(bundle, "--model")
    _check_output(input, output)
    opened = _open_bundle(bundle)
    cfg = _input_config(opened.etl, input, fmt)
    counter = None if is_connect(spark) else spark.sparkContext.accumulator(0)
    # not just the read: under Spark Connect a missing input surfaces when the plan is analysed
    with missing_input_as_config_error("--input"):
        raw = read_raw(spark, cfg, for_scoring=True, source="--input")
        raw = dataclasses.replace(raw, df=raw.df.drop(SOURCE))
        # An image folder's rows are (path, folder, bytes): the bytes are not copied out.
        images = set(cfg.images) if cfg.input.format == "image_folder" else set()
        keep = [c for c in raw.df.columns if c != CORRUPT and c not in images]
        scored = _score_raw(spark, raw, opened, keep, batch_size, counter)
    _write_parquet(scored, output)
    counts = spark.read.parquet(output).groupBy(SCORE_ERROR).count().collect()
    errors = {str(r[SCORE_ERROR]): int(r["count"]) for r in counts if r[SCORE_ERROR] is not None}
    return ScoreResult(
        output=output,
        rows=sum(int(r["count"]) for r in counts),
        errors=dict(sorted(errors.items())),
        model_loads=None if counter is None else int(counter.value),
        seconds=round(time.monotonic() - started, 3),
    )


def _input_config(etl: EtlConfig, path: str, fmt: str | None) -> EtlConfig:
    """``etl`` reading ``path`` (as ``fmt``; the training input's options only for its format)."""
    inp = etl.input
    if fmt is None or fmt == inp.format:
        return dataclasses.replace(etl, input=dataclasses.replace(inp, path=path))
    check(fmt in INPUT_FORMATS, "--format", f"must be one of {INPUT_FORMATS}, got {fmt!r}")
    try:
        new_input = dataclasses.replace(inp, path=path, format=cast(Any, fmt), options={})
        return dataclasses.replace(etl, input=new_input)
    except ConfigError as e:  # e.g. image_folder for a bundle whose columns it cannot make
        raise ConfigError("--format", f"{fmt} does not fit the bundle's etl section: {e}") from e


def _check_output(input: str, output: str) -> None:
    """``--output`` follows :mod:`pipeline.core.outputs` (it is replaced as a whole).

    It must be new, empty or an earlier scored table, and not hold or lie inside the input.
    """
    from pipeline.core.outputs import check_disjoint, check_output_dir

    check_disjoint({"--output": output, "--input": input})
    check_output_dir("--output", output, "table")


def _write_parquet(df: DataFrame, output: str) -> None:
    """Write ``df`` as Parquet into a temporary sibling, renamed to ``output`` once complete."""
    fs, final = storage.resolve(output)
    with storage.atomic_dir(fs, final) as target:
        df.write.mode("overwrite").parquet(_as_uri(output, final, target))


def _as_uri(output: str, final: str, path: str) -> str:
    """``path`` (a pyarrow filesystem path beside ``final``) as a URI Spark can write to."""
    if "://" not in output:
        return path
    base, tail = output.rstrip("/"), final.rstrip("/")
    if not base.endswith(tail):
        raise ValueError(f"cannot derive a Spark URI for {path} from output {output!r}")
    return base[: len(base) - len(tail)] + path
