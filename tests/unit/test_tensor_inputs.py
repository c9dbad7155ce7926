"""Tensor columns end to end on the training side, without Spark or a process group.

The reader's dict batches (stored dtypes and shapes, uint8 kept, equal steps, exact resume),
the device step (copy, then normalize, channels-first) against a numpy reference, the model
input spec and builders, bundles that record their inputs, and ``evaluate`` on them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data.arrays import InputColumn, input_columns
from pipeline.data.reader import Batch, ShardReader
from pipeline.data.shardset import MANIFEST_NAME, ShardSet, ShardSetError
from pipeline.serve.evaluate import evaluate_bundle
from pipeline.train import bundle, engine
from pipeline.train.bundle import BundleError, load_bundle
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import ModelInputs
from pipeline.train.models import BuilderError, build_model, cnn
from tests.shards import Extra, make_shardset, read_columns

CPU = torch.device("cpu")
NORM = {"scale": 255.0, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
IMAGE = Extra("image", "uint8", (4, 5, 3), "image", NORM)
ARRAY = Extra("arr", "float32", (2, 3), "array", {"scale": 1.0, "mean": [1.0, 2.0, 3.0], "std": [2.0, 2.0, 4.0]})  # fmt: skip
ROWS = {"train": [50, 0, 31], "val": [10]}


@pytest.fixture(scope="module")
def tensors(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tensors")
    return make_shardset(root, rows_per_shard=ROWS, row_group_rows=16, seed=5, extra=[IMAGE, ARRAY])


@pytest.fixture(scope="module")
def images_only(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("images")
    return make_shardset(
        root, rows_per_shard=ROWS, row_group_rows=16, seed=6, extra=[IMAGE], features=False
    )


def _epoch(uri: str, **kw: Any) -> list[Batch]:
    args = {"rank": 0, "world_size": 1, "batch_size": 8, **kw}
    with ShardReader(uri, "train", **args) as reader:
        return list(reader)


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.inputs.keys() == y.inputs.keys()
        and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
        and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )


# -- the reader ---------------------------------------------------------------------------------
def test_batches_map_every_input_column_in_its_stored_dtype_and_shape(tensors: str) -> None:
    batches = _epoch(tensors, shuffle=False)
    first = batches[0]
    assert list(first.inputs) == ["features", "image", "arr"]
    assert first.inputs["image"].dtype == torch.uint8 and first.inputs["image"].shape == (
        8,
        4,
        5,
        3,
    )
    assert first.inputs["arr"].dtype == torch.float32 and first.inputs["arr"].shape == (8, 2, 3)
    assert first.features is first.inputs["features"] and first.features.shape == (8, 8)
    assert all(t.is_contiguous() for b in batches for t in b.inputs.values())
    stored = read_columns(tensors, "train")
    for name in ("features", "image", "arr"):
        got = torch.cat([b.inputs[name] for b in batches]).numpy()
        assert got.tobytes() == stored[name].tobytes()  # manifest order, no shuffle
    assert torch.cat([b.labels for b in batches]).numpy().tolist() == stored["label"].tolist()


def test_rows_keep_their_columns_together_when_shuffled(tensors: str) -> None:
    stored = read_columns(tensors, "train")
    row_of = {f.tobytes(): i for i, f in enumerate(stored["features"])}
    for b in _epoch(tensors, seed=3):
        rows = [row_of[f.tobytes()] for f in b.features.numpy()]
        assert b.inputs["image"].numpy().tobytes() == stored["image"][rows].tobytes()
        assert b.inputs["arr"].numpy().tobytes() == stored["arr"][rows].tobytes()


@pytest.mark.parametrize("world_size", [2, 3])
def test_equal_steps_per_rank_with_images(images_only: str, world_size: int) -> None:
    steps = []
    for rank in range(world_size):
        batches = _epoch(images_only, rank=rank, world_size=world_size, batch_size=5)
        steps.append(len(batches))
        assert all(list(b.inputs) == ["image"] for b in batches)
        assert all(b.inputs["image"].dtype == torch.uint8 for b in batches)
    assert len(set(steps)) == 1 and steps[0] == -(-(81 // world_size) // 5)


@pytest.mark.parametrize("consumed", [0, 3, 6])  # of 7 batches
def test_resume_mid_epoch_is_exact_with_images(images_only: str, consumed: int) -> None:
    kw = {"rank": 1, "world_size": 2, "batch_size": 6, "seed": 9, "shuffle_buffer_rows": 16}
    with ShardReader(images_only, "train", **kw) as reader:  # type: ignore[arg-type]
        reader.set_epoch(1)
        whole = list(reader)
        reader.set_epoch(1)
        it = iter(reader)
        for _ in range(consumed):
            next(it)
        state = reader.state_dict()
    with ShardReader(images_only, "train", **kw) as resumed:  # type: ignore[arg-type]
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        assert _same(list(resumed), whole[consumed:])


def test_the_shuffle_window_is_bounded_in_bytes(tensors: str) -> None:
    row = 8 * 4 + 4 * 5 * 3 + 6 * 4  # features, image, arr
    kw: dict[str, Any] = {"rank": 0, "world_size": 1, "batch_size": 4}
    with ShardReader(tensors, "train", shuffle_buffer_bytes=row * 13, **kw) as reader:
        assert reader._window_rows == 12  # 13 rows fit: whole batches of 4
    with ShardReader(tensors, "train", shuffle_buffer_bytes=1, **kw) as reader:
        assert reader._window_rows == 4  # at least one batch
        assert len(list(reader)) == 21
    with ShardReader(tensors, "train", shuffle_buffer_rows=8, **kw) as reader:
        assert reader._window_rows == 8  # the row bound when it is the smaller


def test_old_manifests_have_one_input_the_features(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path, rows_per_shard={"train": [20]})
    schema = json.loads((tmp_path / MANIFEST_NAME).read_text())["schema"]
    assert all("kind" not in e for e in schema)  # written as before the new keys
    (only,) = input_columns(ShardSet.open(uri))
    assert only.name == "features" and only.kind is None and only.normalize is None


def test_unreadable_input_columns_are_named(tmp_path: Path) -> None:
    uri = make_shardset(tmp_path, rows_per_shard={"train": [20]}, extra=[IMAGE])
    path = tmp_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["schema"][2].update(shape=[20, 3], normalize=None)  # an image must be [H, W, C]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match=r"image column 'image' has shape \[20, 3\]"):
        ShardReader(uri, "train", rank=0, world_size=1, batch_size=4)


# -- the device step ------------------------------------------------------------------------------
def _reference(column: InputColumn, x: np.ndarray) -> np.ndarray:
    """What the device step computes, in numpy."""
    norm = column.normalize
    if norm is not None or column.kind == "image":
        x = x.astype(np.float32)
    if norm is not None:
        mean, std = norm.mean.astype(np.float32), norm.std.astype(np.float32)
        x = (x / np.float32(norm.scale) - mean) / std
    return x.transpose(0, 3, 1, 2) if column.kind == "image" else x


def test_device_step_normalizes_like_numpy_and_makes_images_channels_first(tensors: str) -> None:
    shards = ShardSet.open(tensors)
    inputs = ModelInputs.from_shards(shards)
    batch = _epoch(tensors, shuffle=False)[0]
    x, y = engine.to_model(inputs, batch, CPU)
    assert isinstance(x, dict) and list(x) == ["features", "image", "arr"]
    assert x["features"] is batch.features  # no normalize: untouched (tabular runs unchanged)
    assert y is batch.labels
    assert x["image"].shape == (8, 3, 4, 5) and x["image"].is_contiguous()
    for column in input_columns(shards):
        want = _reference(column, batch.inputs[column.name].numpy())
        assert x[column.name].dtype == torch.float32
        np.testing.assert_allclose(x[column.name].numpy(), want, rtol=1e-6, atol=1e-6)
    assert inputs.spec() == {
        "features": ("float32", (8,)),
        "image": ("float32", (3, 4, 5)),
        "arr": ("float32", (2, 3)),
    }


def test_a_single_input_is_passed_as_a_tensor(images_only: str) -> None:
    inputs = ModelInputs.from_shards(ShardSet.open(images_only))
    x, _ = engine.to_model(inputs, _epoch(images_only)[0], CPU)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (8, 3, 4, 5)
    assert inputs.input_shape == (3, 4, 5)
    with pytest.raises(ValueError, match="has 12 elements"):
        ModelInputs.from_shards(ShardSet.open(images_only), [12])
    assert ModelInputs.from_shards(ShardSet.open(images_only), [60]).input_shape == (60,)


def test_input_shape_overrides_only_a_single_column(tensors: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="single input column, but the shard set has 3"):
        ModelInputs.from_shards(ShardSet.open(tensors), [8])
    plain = make_shardset(tmp_path, rows_per_shard={"train": [10]}, dim=12)
    inputs = ModelInputs.from_shards(ShardSet.open(plain), [3, 4])
    assert inputs.input_shape == (3, 4) and inputs.spec() == {"features": ("float32", (3, 4))}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uint8_crosses_to_the_gpu_and_normalizes_there(images_only: str) -> None:
    inputs = ModelInputs.from_shards(ShardSet.open(images_only))
    batch = _epoch(images_only)[0]
    cuda = torch.device("cuda")
    x, y = engine.to_model(inputs, batch, cuda)
    assert isinstance(x, torch.Tensor) and x.device.type == "cuda" and y.device.type == "cuda"
    (column,) = input_columns(ShardSet.open(images_only))
    want = _reference(column, batch.inputs["image"].numpy())
    np.testing.assert_allclose(x.cpu().numpy(), want, rtol=1e-5, atol=1e-5)


# -- builders ---------------------------------------------------------------------------------------
def test_builders_get_the_spec_and_several_columns_need_a_builder_that_takes_them(
    tensors: str,
) -> None:
    inputs = ModelInputs.from_shards(ShardSet.open(tensors))
    x, _ = engine.to_model(inputs, _epoch(tensors)[0], CPU)
    for name in ("mlp", "fusion"):
        model = build_model(
            f"pipeline.train.models:{name}", input_shape=inputs.input_shape, num_outputs=3,
            args={"hidden": [8]}, inputs=inputs.spec(),
        )  # fmt: skip
        out = model(x)
        assert out.shape == (8, 3)
        out.sum().backward()
    with pytest.raises(BuilderError, match=r"3 input columns \(features, image, arr\)"):
        build_model(
            "pipeline.train.models:cnn", input_shape=(8,), num_outputs=2, inputs=inputs.spec()
        )


def test_cnn_defaults_on_an_8x8_image_pool_once_and_read_the_whole_map() -> None:
    model = cnn(input_shape=(1, 8, 8), num_outputs=10)
    kinds = [type(m).__name__ for m in model]
    assert kinds.count("Conv2d") == 2 and kinds.count("MaxPool2d") == 1
    assert not any("Norm" in k for k in kinds)  # nothing depends on the batch
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert model(torch.randn(5, 64)).shape == (5, 10)  # flat rows, as an old CNN-on-vector config


# -- bundles and evaluate ----------------------------------------------------------------------------
def _bundle(tmp: Path, dataset: str, builder: str, args: dict[str, Any], *, legacy: bool) -> str:
    cfg = TrainConfig.from_mapping(
        {"dataset": dataset, "model": {"builder": builder, "args": args}, "output": str(tmp / "m")}
    )
    shards = ShardSet.open(dataset)
    torch.manual_seed(0)
    model = engine.new_model(cfg, shards)
    shape, outputs = engine.model_shape(cfg, shards)
    spec = bundle.model_spec(cfg, shards, input_shape=shape, num_outputs=outputs)
    if legacy:
        del spec["inputs"]  # as bundles were written before inputs were recorded
    return bundle.write_bundle(cfg.output, model=model, spec=spec, metrics={}, config={"train": {}})


@pytest.mark.parametrize("legacy", [False, True])
def test_evaluate_a_cnn_trained_on_a_vector_viewed_as_an_image(
    tmp_path: Path, legacy: bool
) -> None:
    """The bug: ``input_shape[0]`` (1) was compared with the feature dim (64)."""
    data = make_shardset(tmp_path / "d", rows_per_shard={"train": [40], "test": [30]}, dim=64)
    uri = _bundle(
        tmp_path, data, "pipeline.train.models:cnn", {"input_shape": [1, 8, 8], "channels": [4]},
        legacy=legacy,
    )  # fmt: skip
    spec = load_bundle(uri).spec
    assert spec["input_shape"] == [1, 8, 8]
    assert ("inputs" in spec) is not legacy
    result = evaluate_bundle(uri)
    assert result["rows"] == 30 and result["accuracy"] is not None
    other = make_shardset(tmp_path / "o", rows_per_shard={"test": [10]}, dim=63)
    with pytest.raises(BundleError, match="trained on features float32 \\[64\\]"):
        evaluate_bundle(uri, other)


def test_evaluate_uses_the_bundles_inputs_on_an_image_and_tabular_set(
    tensors: str, tmp_path: Path
) -> None:
    uri = _bundle(tmp_path, tensors, "pipeline.train.models:fusion", {"hidden": [8]}, legacy=False)
    loaded = load_bundle(uri)
    assert [e["name"] for e in loaded.spec["inputs"]] == ["features", "image", "arr"]
    image = loaded.spec["inputs"][1]
    assert image["kind"] == "image" and image["model_shape"] == [3, 4, 5]
    assert image["normalize"]["std"] == NORM["std"]
    assert loaded.inputs.spec() == ModelInputs.from_shards(ShardSet.open(tensors)).spec()
    assert evaluate_bundle(uri, split="val")["rows"] == 10
    plain = make_shardset(tmp_path / "plain", rows_per_shard={"val": [10]})
    with pytest.raises(BundleError, match="no column 'image'"):
        evaluate_bundle(uri, plain, split="val")


def test_scoring_reads_spark_columns_as_the_reader_does_and_names_a_bad_row(tensors: str) -> None:
    """Scoring's input columns (image pixels as binary, arrays as list<double>) → stored tensors."""
    import pyarrow as pa

    from pipeline.serve.predict import PredictJob, _tensor

    columns = ModelInputs.from_shards(ShardSet.open(tensors)).columns
    image, arr = (c for c in columns if c.name != "features")
    job = PredictJob("mem://bundle", "sha", "classification", ("image", "arr"), 8, "reason", None)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a read-only view of Arrow's buffer
        got = _tensor(pa.array([p.tobytes() for p in pixels], pa.binary()), image, job)
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(pixels))
    values = np.arange(18, dtype=np.float64).reshape(3, 6)
    got = _tensor(pa.array(list(values), pa.list_(pa.float64())), arr, job)
    assert got.dtype == torch.float32 and got.tolist() == values.reshape(3, 2, 3).tolist()
    with pytest.raises(
        BundleError, match=r"^mem://bundle: column 'arr' row 1 has 5 values, the network says 6$"
    ):
        _tensor(pa.array([[0.0] * 6, [0.0] * 5]), arr, job)
    with pytest.raises(BundleError, match=r"column 'image' row 0 has 59 bytes, the network's"):
        _tensor(pa.array([b"\0" * 59]), image, job)
