"""The tabular feature fit equals Spark ML's Imputer → StringIndexer → OneHotEncoder →
VectorAssembler → StandardScaler pipeline, and models saved that way still apply."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preprocessing.config import EtlConfig
from preprocessing.features import apply_features, fit_features

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

# Ties on purpose: equal counts order by label in code-point (UTF-8 byte) order, where U+FF21
# sorts before U+1F600 (in Java's UTF-16 order it would not: surrogates D83D DE00 come first).
_CITIES = ["lyon", "paris", "\uff21", "\U0001f600", "nice", None]


def _rows(n: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    return [
        {
            "f0": None if i % 7 == 0 else rng.gauss(5.0, 2.0),
            "f1": 4.25,  # constant: standard deviation 0
            "f2": None if i % 3 == 0 else float(rng.randint(0, 9)),
            "city": _CITIES[i % len(_CITIES)] if i % 11 else "lyon",
            "size": rng.choice(["s", "m", "l", None]),
        }
        for i in range(n)
    ]


def _spark_ml(train: Any, cfg: EtlConfig) -> Any:
    """The pipeline the ETL fitted before it computed the statistics itself."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import (
        Imputer,
        OneHotEncoder,
        StandardScaler,
        StringIndexer,
        VectorAssembler,
    )

    num, cat = list(cfg.numeric), list(cfg.categorical)
    return Pipeline(
        stages=[
            Imputer(
                inputCols=num, outputCols=[f"_imp_{c}" for c in num], strategy=cfg.impute_strategy
            ),
            StringIndexer(
                inputCols=cat, outputCols=[f"_idx_{c}" for c in cat], handleInvalid="keep"
            ),
            OneHotEncoder(
                inputCols=[f"_idx_{c}" for c in cfg.onehot],
                outputCols=[f"_ohe_{c}" for c in cfg.onehot],
                dropLast=False,
            ),
            VectorAssembler(
                inputCols=[f"_imp_{c}" for c in num]
                + [f"_ohe_{c}" if c in cfg.onehot else f"_idx_{c}" for c in cat],
                outputCol="_vec",
            ),
            StandardScaler(inputCol="_vec", outputCol="_scaled", withMean=True, withStd=True),
        ]
    ).fit(train)


def _features(model: Any, df: Any) -> np.ndarray:
    rows = apply_features(model, df).orderBy("i").select("features").collect()
    return np.array([r["features"] for r in rows], dtype=np.float32)


@pytest.mark.parametrize("strategy", ["median", "mean"])
def test_fit_equals_spark_ml_and_both_models_apply(
    spark: Any, tmp_path: Path, strategy: str
) -> None:
    from pyspark.ml import PipelineModel

    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "unused"), "format": "csv"},
            "schema": {
                **dict.fromkeys(["f0", "f1", "f2"], "double"),
                **dict.fromkeys(["city", "size"], "string"),
                "i": "long",
                "label": "int",
            },
            "key": "i",
            "label": "label",
            "numeric": ["f0", "f1", "f2"],
            "categorical": ["city", "size"],
            "onehot": ["city"],
            "impute_strategy": strategy,
            "output": str(tmp_path / "out"),
        }
    )
    rows = [dict(r, i=i) for i, r in enumerate(_rows(400))]
    schema = "f0 double, f1 double, f2 double, city string, size string, i long"
    train = spark.createDataFrame(rows, schema).repartition(3)
    fitted = fit_features(train, cfg)
    reference = _spark_ml(train, cfg)

    imputer, indexer, scaler = reference.stages[0], reference.stages[1], reference.stages[-1]
    surrogates = imputer.surrogateDF.collect()[0].asDict()
    numeric = fitted.stats["numeric"]
    assert {c: numeric[c]["impute_value"] for c in cfg.numeric} == pytest.approx(
        surrogates, rel=1e-12
    )
    levels = [fitted.stats["categorical"][c]["levels"] for c in cfg.categorical]
    assert levels == [len(lv) for lv in indexer.labelsArray]
    assert fitted.stats["categorical"]["city"]["top"] == list(indexer.labelsArray[0])[:5]
    assert [numeric[c]["train_std"] for c in cfg.numeric] == pytest.approx(
        scaler.std.toArray()[:3].tolist(), rel=1e-9, abs=1e-12
    )
    assert fitted.dim == len(scaler.mean) == 3 + len(indexer.labelsArray[0]) + 1 + 1
    assert fitted.names[3:5] == ["city=lyon", f"city={indexer.labelsArray[0][1]}"]

    # Saved and loaded, as scoring loads it; unseen levels go to the unknown slot in both.
    fitted.model.write().save(str(tmp_path / "model"))
    loaded = PipelineModel.load(str(tmp_path / "model"))
    scoring = [dict(r, i=i, city="brest" if i % 5 == 0 else r["city"]) for i, r in enumerate(rows)]
    df = spark.createDataFrame(scoring, schema)
    ours, theirs = _features(loaded, df), _features(reference, df)
    assert ours.shape == theirs.shape == (len(rows), fitted.dim)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert np.allclose(ours[:, :3].mean(axis=0)[[0, 2]], 0.0, atol=0.2)
    assert (ours[:, 1] == 0.0).all()  # the constant column scales to 0, as StandardScaler does


def test_a_numeric_column_without_values_in_train_is_named(spark: Any, tmp_path: Path) -> None:
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": str(tmp_path / "unused"), "format": "csv"},
            "schema": {"f0": "double", "f1": "double", "i": "long", "label": "int"},
            "key": "i",
            "label": "label",
            "numeric": ["f0", "f1"],
            "output": str(tmp_path / "out"),
        }
    )
    rows = [{"f0": float(i), "f1": None, "i": i} for i in range(20)]
    train = spark.createDataFrame(rows, "f0 double, f1 double, i long")
    with pytest.raises(ValueError, match="numeric column 'f1' has no value in the train split"):
        fit_features(train, cfg)
