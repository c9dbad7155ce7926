"""Text columns without Spark: config checks, the ids' encoding, the spec entry, the models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.core.configbase import ConfigError
from pipeline.data.columns import ColumnSpec
from pipeline.train.models import BuilderError, build_model
from preprocessing.config import EtlConfig
from preprocessing.features.text import encode_ids


def _etl(**over: Any) -> EtlConfig:
    base: dict[str, Any] = {
        "input": {"path": "/data/in.csv"},
        "schema": {"id": "long", "review": "string", "n": "int", "label": "int"},
        "key": "id",
        "label": "label",
        "texts": {"review": {}},
        "output": "/data/out",
    }
    return EtlConfig.from_mapping({**base, **over})


@pytest.mark.parametrize(
    ("over", "key", "message"),
    [
        ({"texts": {"n": {}}}, "etl.texts.n", "text columns are string"),
        ({"texts": {"review": {"max_length": 0}}}, "etl.texts.review.max_length", ">= 1"),
        ({"texts": {"label": {}}}, "etl.texts.label", "the label"),
    ],
)
def test_config_errors_name_the_key(over: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _etl(**over)
    assert e.value.key == key and message in str(e.value)


def test_a_text_column_alone_is_a_feature_and_a_tensor_column() -> None:
    cfg = _etl()
    assert cfg.tensor_columns == ("review",) and not cfg.has_tabular
    assert cfg.texts["review"].max_length == 128 and cfg.texts["review"].empty == "keep"


def test_encode_ids_pads_cuts_and_counts() -> None:
    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ids, cut = encode_ids(tok, ["a b", None, "", "b b b a", "zz"], 3, 0)
    assert ids.dtype == np.int32 and ids.shape == (5, 3)
    assert ids.tolist() == [[2, 3, 0], [0, 0, 0], [0, 0, 0], [3, 3, 3], [1, 0, 0]]
    assert cut.tolist() == [False, False, False, True, False]


def test_the_text_entry_of_a_column_spec_round_trips_and_is_checked() -> None:
    entry = {"vocab_size": 10, "pad_id": 0, "tokenizer": "text/r.json"}
    spec = ColumnSpec("r", "int32", (8,), kind="text", text=entry)
    assert ColumnSpec.from_manifest(spec.to_manifest()) == spec
    assert spec.to_manifest()["text"] == entry
    with pytest.raises(ValueError, match="pad_id < vocab_size"):
        ColumnSpec("r", "int32", (8,), kind="text", text={**entry, "pad_id": 10})


@pytest.mark.parametrize("encoder", ["bag", "transformer"])
def test_the_text_model_takes_any_width_and_ignores_padding(encoder: str) -> None:
    torch.manual_seed(0)
    inputs = {"features": ("float32", (3,)), "r": ("int32", (8,))}
    model = build_model(
        "pipeline.train.models:text",
        input_shape=(3,),
        num_outputs=2,
        args={"encoder": encoder, "dim": 8, "heads": 2, "layers": 1},
        inputs=inputs,
        vocab={"r": (20, 0)},
    ).eval()
    features = torch.randn(3, 3)
    ids = torch.tensor(
        [[5, 6, 7, 0, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0, 0], [0] * 8], dtype=torch.int32
    )
    full = model({"features": features, "r": ids})
    cut = model({"features": features, "r": ids[:, :3]})  # per-batch padding
    assert full.shape == (3, 2) and torch.isfinite(full).all()  # an all-pad row too
    torch.testing.assert_close(full, cut)


def test_text_columns_need_a_builder_with_vocab() -> None:
    with pytest.raises(BuilderError, match=r"pipeline\.train\.models:text"):
        build_model(
            "pipeline.train.models:mlp",
            input_shape=(8,),
            num_outputs=2,
            inputs={"r": ("int32", (8,))},
            vocab={"r": (20, 0)},
        )


def _bag(**args: Any) -> torch.nn.Module:
    return build_model(
        "pipeline.train.models:text",
        input_shape=(6,),
        num_outputs=3,
        args={"dim": 8, **args},
        vocab={"r": (50, 0)},
    )


def test_token_dropout_trains_only_and_keeps_the_weights_of_earlier_bundles() -> None:
    torch.manual_seed(0)
    default, off = _bag(), _bag(token_dropout=0.0)
    encoder = default[0].parts[0]
    assert encoder.token_dropout == 0.5  # the bag's default
    assert _bag(encoder="transformer", heads=2, layers=1)[0].parts[0].token_dropout == 0.0
    # a bundle written before the argument (same args, no token_dropout) loads unchanged
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in off.state_dict().items()
    }
    off.load_state_dict(default.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 0, 0, 0, 0, 0], [0] * 6])
    torch.testing.assert_close(default.eval()(ids), off.eval()(ids))

    default.train()
    dropped = encoder._drop_tokens(torch.arange(1, 4001).reshape(2, 2000))
    assert 0.45 < (dropped == 0).float().mean() < 0.55  # about half, padding in their place
    assert ((dropped == 0) | (dropped == torch.arange(1, 4001).reshape(2, 2000))).all()
    for _ in range(20):  # a text never loses its last token; padding stays padding
        assert encoder._drop_tokens(ids[1:]).tolist() == ids[1:].tolist()
    assert not torch.equal(default(ids.repeat(50, 1)), off.train()(ids.repeat(50, 1)))


def test_token_dropout_is_checked() -> None:
    with pytest.raises(BuilderError, match=r"token_dropout must be in \[0, 1\), got 1.0"):
        _bag(token_dropout=1.0)
