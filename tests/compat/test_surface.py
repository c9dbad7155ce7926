"""The public surface recorded in surface.json still resolves today (names, keys, builders, CLI)."""

from __future__ import annotations

import copy
import importlib
import logging
import sys

import pytest

from pipeline.core import compat
from tests.compat.surface import OLD_BUILDERS, current_surface, load, missing_entries


def test_nothing_recorded_has_disappeared() -> None:
    assert missing_entries(load()) == []


def test_a_removed_entry_is_reported() -> None:
    recorded = copy.deepcopy(load())
    recorded["config_keys"].append("train.model.kind")
    recorded["python"]["pipeline"].append("train_model")
    recorded["builders"].append("pipeline.train.models:resnet")
    recorded["cli"]["train"].append("--epochs")
    recorded["moved_modules"]["pipeline.ddp_loop"] = ["train"]
    recorded["exit_codes"]["usage"] = 64
    assert missing_entries(recorded) == [
        "python name pipeline.train_model",
        "module pipeline.ddp_loop",
        "builder pipeline.train.models:resnet",
        "config key train.model.kind",
        "CLI flag train --epochs",
        "exit code usage=64 (now 2)",
    ]


def test_recorded_surface_is_up_to_date_or_a_superset() -> None:
    """Names added since surface.json was written are fine; the file must name today's kinds."""
    now, recorded = current_surface(), load()
    assert set(recorded) == set(now)
    assert recorded["format_versions"].keys() == now["format_versions"].keys()


def test_earlier_releases_names_are_recorded() -> None:
    """What 0.1.0 documented (git 668cac7 README, pipeline.__all__) is part of the surface."""
    recorded = load()
    assert {"__version__", "score"} <= set(recorded["python"]["pipeline"])
    assert set(OLD_BUILDERS) <= set(recorded["builders"])
    assert {"pipeline.models", "pipeline.bundle", "pipeline.launcher"} <= set(
        recorded["moved_modules"]
    )


@pytest.mark.parametrize(("old", "new"), sorted(compat.MOVED_MODULES.items()))
def test_every_moved_module_imports_as_the_new_one_with_one_deprecation_line(
    old: str, new: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "_said", set())
    monkeypatch.delitem(sys.modules, old, raising=False)
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        module = importlib.import_module(old)
        importlib.import_module(old)  # a second import says nothing more
    assert module is importlib.import_module(new)
    assert module.__spec__ is not None and module.__spec__.name == new  # its own spec kept
    lines = [r.getMessage() for r in caplog.records if r.name == compat.DEPRECATION_LOGGER]
    assert lines == [
        f"DEPRECATED module {old!r}: use {new!r} (the old spelling keeps working for at least "
        "two more minor releases; see the README's Compatibility section)"
    ]
