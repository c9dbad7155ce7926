from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from pipeline.train.models import BuilderError, build_model, cnn, fusion, mlp, resolve_builder


def test_mlp_shapes_and_dropout() -> None:
    m = mlp(input_shape=(10,), num_outputs=3, hidden=(16, 8), dropout=0.5)
    assert m(torch.randn(4, 10)).shape == (4, 3)
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 2
    linear = mlp(input_shape=(10,), num_outputs=1, hidden=())
    assert [type(x) for x in linear] == [nn.Flatten, nn.Linear]


def test_mlp_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dropout"):
        mlp(input_shape=(4,), num_outputs=2, dropout=1.0)
    with pytest.raises(ValueError, match="input_shape"):
        mlp(input_shape=(), num_outputs=2)
    with pytest.raises(ValueError, match="hidden"):
        mlp(input_shape=(4,), num_outputs=2, hidden=(0,))


@pytest.mark.parametrize("shape", [(12,), (3, 8), (2, 4, 5), (1, 1, 1)])
def test_cnn_takes_flat_rows_of_any_layout(shape: tuple[int, ...]) -> None:
    m = cnn(input_shape=shape, num_outputs=4, channels=(4, 6))
    flat = int(torch.tensor(shape).prod())
    out = m(torch.randn(5, flat))
    assert out.shape == (5, 4)
    out.sum().backward()  # trainable end to end


def test_cnn_uses_2d_convolutions_for_images() -> None:
    m = cnn(input_shape=(1, 6, 6), num_outputs=2)
    assert any(isinstance(x, nn.Conv2d) for x in m.modules())
    assert not any(isinstance(x, nn.Conv1d) for x in m.modules())


def test_resolve_builtin_builders() -> None:
    assert resolve_builder("pipeline.train.models:mlp") is mlp
    model = build_model(
        "pipeline.train.models:cnn", input_shape=(2, 8), num_outputs=3, args={"channels": [4]}
    )
    assert isinstance(model, nn.Module)


def _fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("fake_builders")
    mod.CONST = 3  # type: ignore[attr-defined]
    mod.not_module = lambda **kw: "a string"  # type: ignore[attr-defined]
    mod.ns = types.SimpleNamespace(inner=mlp)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_builders", mod)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no.such.module:f", "cannot import module 'no.such.module'"),
        ("pipeline.train.models:nope", "has no attribute 'nope'"),
        ("fake_builders:CONST", "not callable"),
        ("pipeline.train.models", "expected 'package.module:function'"),
        (":mlp", "expected 'package.module:function'"),
    ],
)
def test_resolve_errors_name_the_config_key(
    monkeypatch: pytest.MonkeyPatch, spec: str, match: str
) -> None:
    _fake_module(monkeypatch)
    with pytest.raises(BuilderError, match=match) as e:
        resolve_builder(spec)
    assert "train.model.builder" in str(e.value)


def test_build_model_checks_result_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_module(monkeypatch)
    with pytest.raises(BuilderError, match=r"not a torch\.nn\.Module"):
        build_model("fake_builders:not_module", input_shape=(3,), num_outputs=2)
    with pytest.raises(BuilderError, match=r"train\.model\.args"):
        build_model("pipeline.train.models:mlp", input_shape=(3,), num_outputs=2, args={"width": 3})
    nested = build_model("fake_builders:ns.inner", input_shape=(3,), num_outputs=2)
    assert isinstance(nested, nn.Sequential)


# -- input specs (tensor columns) -------------------------------------------------------------------
def test_mlp_with_a_one_column_spec_is_the_plain_mlp() -> None:
    torch.manual_seed(0)
    plain = mlp(input_shape=(6,), num_outputs=2, hidden=(4,))
    torch.manual_seed(0)
    spec = mlp(input_shape=(6,), num_outputs=2, hidden=(4,), inputs={"features": ("float32", (6,))})
    a, b = plain.state_dict(), spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_concatenates_several_columns() -> None:
    inputs = {"features": ("float32", (3,)), "arr": ("float32", (2, 2))}
    m = mlp(input_shape=(3,), num_outputs=2, hidden=(4,), inputs=inputs)
    x = {"features": torch.randn(5, 3), "arr": torch.randn(5, 2, 2)}
    assert m(x).shape == (5, 2)
    assert m[1].in_features == 7  # after the column part


def test_fusion_takes_an_image_and_a_vector_or_one_tensor() -> None:
    inputs = {"features": ("float32", (5,)), "image": ("float32", (3, 8, 8))}
    m = fusion(input_shape=(5,), num_outputs=4, inputs=inputs, channels=(4, 8), hidden=(16,))
    out = m({"features": torch.randn(2, 5), "image": torch.randn(2, 3, 8, 8)})
    assert out.shape == (2, 4)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 2
    alone = fusion(input_shape=(1, 8, 8), num_outputs=3)
    assert alone(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_build_model_passes_the_spec_only_to_builders_that_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}

    def takes(*, input_shape: tuple[int, ...], num_outputs: int, inputs: object) -> nn.Module:
        seen["inputs"] = inputs
        return nn.Linear(1, 1)

    mod = types.ModuleType("spec_builders")
    mod.takes = takes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spec_builders", mod)
    spec = {"image": ("float32", [1, 8, 8])}
    build_model("spec_builders:takes", input_shape=(1, 8, 8), num_outputs=2, inputs=spec)
    assert seen["inputs"] == {"image": ("float32", (1, 8, 8))}
    model = build_model(
        "pipeline.train.models:cnn", input_shape=(1, 8, 8), num_outputs=2, inputs=spec
    )
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 2)
