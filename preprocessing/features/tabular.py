"""Tabular features: numeric and categorical columns, fitted on the train split only.

Numeric columns are imputed with the train median (or mean) of their values; categorical
columns become their frequency rank (``StringIndexerModel``, ``handleInvalid='keep'``: null
and unseen levels map to one extra index; one model for all columns, each with its own labels) and, for ``etl.onehot`` columns, one slot per
level plus the unknown slot. The vector holds the numeric columns first, then each
categorical column (its index, or its one-hot block), in declared order.

The result equals what Spark ML's ``Imputer`` / ``StringIndexer`` / ``OneHotEncoder`` /
``VectorAssembler`` / ``StandardScaler`` pipeline fits (the same medians, labels, means and
standard deviations up to rounding), from two passes over the train rows instead of one per
estimator:

* one aggregation of the numeric columns unpivoted (one group per column): per column its
  count, mean and sample variance of the values present and the imputation value — the
  median is ``percentile_approx(c, 0.5, 1000)``, which is what ``Imputer`` computes
  (``approxQuantile`` with its default relative error 0.001: the value's rank is within
  0.1 % of the row count of the true median's);
* one count of every categorical level (a ``posexplode`` and a ``groupBy``); labels ordered
  as ``StringIndexer`` orders them: by count, descending, ties by label in code-point order
  (Spark compares the UTF-8 bytes).

The moments of an imputed column follow from those of its values and the number of rows
imputed (the pooled-variance identity); those of an index or one-hot slot follow exactly
from the level counts.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from pyspark.ml.feature import StringIndexerModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.utils import is_remote

from preprocessing.config import EtlConfig
from preprocessing.features.kind import FeatureKind, FittedKind, Slot
from preprocessing.sqltext import quote, sql_double

__all__ = ["MEDIAN_ACCURACY", "TABULAR", "UNKNOWN_LEVEL"]

UNKNOWN_LEVEL = "__unknown__"
"""Name of the one-hot slot that null and unseen levels map to."""

MEDIAN_ACCURACY = 1000
"""``percentile_approx`` accuracy of the median: 1 / ``Imputer``'s default relative error."""


def _idx(c: str) -> str:
    return f"_idx_{c}"


def _numeric_stats(
    train: DataFrame, cfg: EtlConfig
) -> tuple[int, dict[str, tuple[int, float, float, float]]]:
    """Train row count and, per numeric column: (values, mean, M2, imputation value).

    One ``groupBy`` over the columns unpivoted (a ``posexplode`` of the numeric values, one
    group per column), not one aggregation with four functions per column: Spark plans and
    generates code per aggregate function, so on 500 columns the wide form took 8-25 s for 200
    rows and ran out of a 1 GiB heap on 100,000 (measured: 100,000 × 500, 49-92 s wide vs
    25-30 s unpivoted; 1 M × 12, 4.3-5.6 s vs 3.9-4.6 s).
    """
    if not cfg.numeric:
        return train.count(), {}
    fill = (
        F.percentile_approx("x", 0.5, MEDIAN_ACCURACY)
        if cfg.impute_strategy == "median"
        else F.avg("x")
    )
    values = F.array(*[F.col(c).cast("double") for c in cfg.numeric])
    rows = (
        train.select(F.posexplode(values).alias("i", "x"))
        .groupBy("i")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.count("x").alias("k"),
            F.avg("x").alias("m"),
            F.var_samp("x").alias("v"),
            fill.alias("f"),
        )
        .collect()
    )
    by_index = {int(r["i"]): r for r in rows}
    out = {}
    for i, c in enumerate(cfg.numeric):
        row = by_index.get(i)
        if row is None or row["k"] == 0:
            raise ValueError(f"numeric column {c!r} has no value in the train split to fit on")
        k, var = int(row["k"]), row["v"]
        m2 = float(var) * (k - 1) if k > 1 and var is not None else 0.0
        out[c] = (k, float(row["m"]), m2, float(row["f"]))
    return int(rows[0]["n"]), out


def _level_counts(train: DataFrame, columns: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Rows per non-null level of each column, in one job."""
    counts: dict[str, dict[str, int]] = {c: {} for c in columns}
    if not columns:
        return counts
    pairs = train.select(
        F.posexplode(F.array(*[F.col(c).cast("string") for c in columns])).alias("i", "level")
    ).where(F.col("level").isNotNull())
    for r in pairs.groupBy("i", "level").count().collect():
        counts[columns[int(r["i"])]][r["level"]] = int(r["count"])
    return counts


def _frequency_order(counts: dict[str, int]) -> list[str]:
    """Labels as ``StringIndexer(stringOrderType='frequencyDesc')`` orders them."""
    return sorted(counts, key=lambda lv: (-counts[lv], lv))


def _moments(values: dict[int, int], n: int) -> tuple[float, float]:
    """Exact mean and sample std of a slot taking value ``v`` on ``values[v]`` of ``n`` rows."""
    s = sum(v * k for v, k in values.items())
    q = sum(v * v * k for v, k in values.items())
    var = Fraction(n * q - s * s, n * (n - 1)) if n > 1 else Fraction(0)
    return float(Fraction(s, n)), math.sqrt(var)


def _numeric_slot(c: str, n: int, stats: tuple[int, float, float, float]) -> Slot:
    k, mean_k, m2_k, fill = stats
    mean = (k * mean_k + (n - k) * fill) / n
    m2 = m2_k + (fill - mean_k) ** 2 * k * (n - k) / n
    std = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
    value = f"coalesce(nanvl({quote(c)}, CAST(NULL AS DOUBLE)), {sql_double(fill)})"
    return Slot(c, value, mean, std)


def _categorical_slots(
    c: str, labels: list[str], counts: dict[str, int], n: int, onehot: bool
) -> list[Slot]:
    per_index = [counts[lv] for lv in labels]
    per_index.append(n - sum(per_index))  # null in train: the extra index
    index = quote(_idx(c))
    if not onehot:
        mean, std = _moments(dict(enumerate(per_index)), n)
        return [Slot(c, index, mean, std)]
    slots = []
    for j, (name, k) in enumerate(zip([*labels, UNKNOWN_LEVEL], per_index, strict=True)):
        mean, std = _moments({1: k, 0: n - k}, n)
        slots.append(Slot(f"{c}={name}", f"IF({index} = {j}, 1.0D, 0.0D)", mean, std))
    return slots


def _indexer(labels: dict[str, list[str]]) -> StringIndexerModel:
    """One ``StringIndexerModel`` for every categorical column (``handleInvalid='keep'``).

    One stage, however many columns: a stage per column would nest the plan one level per
    column (Spark Connect sends a plan as nested protobuf messages, with a depth limit of
    about 100; a classic driver spends seconds analyzing such a stack of projections). Each
    column keeps its own labels (ragged arrays): ``from_arrays_of_labels`` pads shorter label
    arrays with nulls on a classic session, and a null label would take nulls away from the
    extra index, so the classic path builds the ``String[][]`` itself, in O(columns) Py4J
    calls: each column's labels cross as one string, joined by a character none of them
    holds, and are split in the JVM (``from_labels`` set the Java array one label per Py4J
    call: 5.5 s for the 20,000 levels of a make-data column). Spark Connect sends the ragged
    lists in one message as they are.
    """
    columns = list(labels)
    if is_remote():
        model = StringIndexerModel.from_arrays_of_labels([labels[c] for c in columns], columns)
    else:
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        assert sc is not None and sc._jvm is not None and sc._gateway is not None, "classic"
        jvm, gateway = sc._jvm, sc._gateway
        regex = jvm.java.util.regex.Pattern
        outer = gateway.new_array(jvm.java.lang.String, len(columns), 0)
        for i, c in enumerate(columns):
            joined = "".join(labels[c])
            sep = next(chr(x) for x in range(0xE000, 0x110000) if chr(x) not in joined)
            if labels[c]:  # a Java String[] of the labels
                outer[i] = regex.compile(regex.quote(sep)).split(sep.join(labels[c]), -1)
        model = StringIndexerModel(jvm.org.apache.spark.ml.feature.StringIndexerModel(outer))
        model.setInputCols(columns)
    return model.setOutputCols([_idx(c) for c in columns]).setHandleInvalid("keep")


def _fit(train: DataFrame, cfg: EtlConfig) -> FittedKind | None:
    if not cfg.has_tabular:
        return None
    n, numeric = _numeric_stats(train, cfg)
    counts = _level_counts(train, cfg.categorical)
    labels = {c: _frequency_order(counts[c]) for c in cfg.categorical}
    stages: list[Any] = [_indexer(labels)] if cfg.categorical else []
    slots = [_numeric_slot(c, n, numeric[c]) for c in cfg.numeric]
    for c in cfg.categorical:
        slots += _categorical_slots(c, labels[c], counts[c], n, c in cfg.onehot)
    stats: dict[str, Any] = {
        "impute_strategy": cfg.impute_strategy,
        "numeric": {
            c: {"train_mean": s.mean, "train_std": s.std, "impute_value": numeric[c][3]}
            for c, s in zip(cfg.numeric, slots, strict=False)
        },
        "categorical": {
            c: {"levels": len(labels[c]), "top": labels[c][:5], "onehot": c in cfg.onehot}
            for c in cfg.categorical
        },
    }
    return FittedKind(stages=stages, slots=slots, stats=stats)


TABULAR = FeatureKind(name="tabular", fit=_fit, intermediate_prefixes=("_idx_",))
"""The numeric + categorical kind (:data:`~preprocessing.features.assemble.KINDS`)."""
