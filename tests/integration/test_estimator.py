"""``TorchEstimator.fit(df)`` → ``TorchModel``: transform, save / load, and early config errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pipeline import ConfigError, TorchEstimator, TorchModel, TrainConfig

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

ROWS = 400
TRAIN = {
    "model": {"args": {"hidden": [16]}},
    "num_workers": 2,
    "epochs": 2,
    "batch_size": 64,
    "timeout_s": 120,
}


def _frame(spark: Any) -> Any:
    """Seeded rows: a key, two numbers, a category, a 3-element array and a binary label."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):
        x = rng.normal(size=2)
        emb = rng.normal(size=3).astype("float32")
        city = ["north", "south", "east"][i % 3]
        label = int(x[0] + emb.sum() + (city == "east") > 0.5)
        rows.append((i, float(x[0]), float(x[1]), city, emb.tolist(), label))
    schema = "id long, x0 double, x1 double, city string, emb array<float>, y int"
    return spark.createDataFrame(rows, schema)


def _estimator(work: Path, **columns: Any) -> TorchEstimator:
    declared: dict[str, Any] = {
        "label": "y",
        "key": "id",
        "numeric": ["x0", "x1"],
        "categorical": ["city"],
        "arrays": {"emb": {"shape": [3]}},
        **columns,
    }
    return TorchEstimator(**declared, etl={"num_shards": 2}, train=TRAIN, work_dir=str(work))


def _predictions(df: Any) -> list[tuple[Any, ...]]:
    rows = df.select("id", "prediction", "probability", "score_error").orderBy("id").collect()
    return [tuple(r) for r in rows]


def test_fit_transform_save_load(spark: Any, tmp_path: Path) -> None:
    from pipeline.serve.score import score_table

    df = _frame(spark)
    estimator = _estimator(tmp_path / "work")
    etl_cfg, train_cfg = estimator.configs(df)  # what fit runs: types from the DataFrame
    assert etl_cfg.schema["emb"] == "array<float>" and etl_cfg.schema["id"] == "bigint"
    assert train_cfg.task == "classification" and train_cfg.dataset == etl_cfg.output
    model = estimator.fit(df)
    assert model.etl_result is not None
    assert model.etl_result.manifest["reconciliation"]["rows_in"] == ROWS
    assert [e["epoch"] for e in model.history] == [0, 1]
    assert all(e["val_loss"] > 0 for e in model.history)
    assert model.classes == [0, 1]
    fit_dirs = list((tmp_path / "work").glob("TorchEstimator_*/fit-*"))
    assert [p.name for p in fit_dirs[0].iterdir()] == ["model"], "checkpoints are removed"
    views = [t.name for t in spark.catalog.listTables() if t.name.startswith("spark_train_input")]
    assert not views, "the input's temp view is dropped"

    scored = model.transform(df)
    assert scored.columns[: len(df.columns)] == df.columns
    first = _predictions(scored)
    assert len(first) == ROWS and all(r[1] in (0, 1) and r[3] is None for r in first)

    saved = str(tmp_path / "saved")
    model.write().save(saved)
    with pytest.raises(ConfigError, match="overwrite"):
        model.write().save(saved)
    model.setBatchSize(7).write().overwrite().save(saved)
    loaded = TorchModel.load(saved)
    assert loaded.history == model.history and loaded.bundle == saved
    assert _predictions(loaded.transform(df)) == first

    # the saved model is an ordinary bundle: what `spark-train score` runs
    df.drop("y").write.parquet(str(tmp_path / "new"))
    result = score_table(spark, saved, str(tmp_path / "new"), str(tmp_path / "out"), fmt="parquet")
    assert result.rows == ROWS and result.predicted == ROWS
    rescored = spark.read.parquet(str(tmp_path / "out"))
    assert _predictions(rescored) == first


@pytest.mark.parametrize(
    ("columns", "key", "message"),
    [
        ({"numeric": ["x0", "nope"]}, "etl.numeric", "'nope' is not in the DataFrame"),
        ({"label": "target"}, "etl.label", "'target' is not in the DataFrame"),
        ({"numeric": ["x0", "city"]}, "etl.numeric", "non-numeric type string"),
        ({"arrays": {}, "numeric": ["x0", "emb"]}, "etl.numeric", "non-numeric type array"),
        ({"arrays": {"emb": {"shape": [0]}}}, "etl.arrays.emb.shape", "must be >= 1"),
        ({"schema": {"x0": "complex"}}, "etl.schema.x0", "unsupported type 'complex'"),
    ],
)
def test_bad_column_declarations_fail_before_any_spark_job(
    spark: Any, tmp_path: Path, columns: dict[str, Any], key: str, message: str
) -> None:
    df = _frame(spark)
    sc = spark.sparkContext
    group = f"estimator-check-{os.getpid()}-{key}"
    sc.setJobGroup(group, "must stay empty")
    try:
        with pytest.raises(ConfigError, match=message) as info:
            _estimator(tmp_path / "work", **columns).fit(df)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert info.value.key == key
    assert sc.statusTracker().getJobIdsForGroup(group) == []
    assert not (tmp_path / "work").exists()


def test_settings_the_estimator_owns_and_bad_train_keys_fail_at_construction(
    tmp_path: Path,
) -> None:
    cases = [
        ({"etl": {"input": {"path": "x"}}}, "etl.input"),
        ({"etl": {"label": "z"}}, "etl.label"),  # also given as a keyword argument
        ({"etl": {"shards": 2}}, "etl.shards"),
        ({"train": {"output": "m"}}, "train.output"),
        ({"train": {"checkpoint": {"dir": "c"}}}, "train.checkpoint.dir"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"optimizer": {"lr": "fast"}}}, "train.optimizer.lr"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ConfigError) as info:
            TorchEstimator(label="y", key="id", numeric=["x0"], work_dir=str(tmp_path), **kwargs)
        assert info.value.key == key, (kwargs, str(info.value))
    with pytest.raises(ConfigError, match="is required") as info:
        TorchEstimator(label="y", numeric=["x0"])
    assert info.value.key == "etl.key"
    # Spark ML params: a TrainConfig, param maps, copies
    est = TorchEstimator(label="y", key="id", numeric=["x0"], train=TrainConfig(epochs=3))
    assert est.getTrain()["epochs"] == 3 and "output" not in est.getTrain()
    other = est.copy({est.train: {"epochs": 1}, est.workDir: str(tmp_path)})
    assert other.getTrain() == {"epochs": 1} and other.getWorkDir() == str(tmp_path)
    assert est.getTrain()["epochs"] == 3 and "workDir" in est.explainParams()


def test_text_columns_are_declared_like_the_other_kinds(spark: Any, tmp_path: Path) -> None:
    """``texts=`` (or ``etl={"texts": ...}``) types the column from the DataFrame."""
    df = spark.createDataFrame(
        [(1, "a fine day", 0), (2, "rain", 1)], "id long, review string, y int"
    )
    for kwargs in ({"texts": {"review": {"max_length": 8}}}, {"etl": {"texts": {"review": {}}}}):
        estimator = TorchEstimator(label="y", key="id", work_dir=str(tmp_path), **kwargs)
        etl_cfg, _ = estimator.configs(df)
        assert list(etl_cfg.texts) == ["review"] and etl_cfg.schema["review"] == "string"
