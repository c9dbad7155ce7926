"""The typed manifest reads every landed release's manifest.json and writes it back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.manifest import Manifest
from pipeline.data.shardset import MANIFEST_NAME, ShardSet, ShardSetError

FIXTURES = Path(__file__).resolve().parents[1] / "compat" / "fixtures"
MANIFESTS = sorted(FIXTURES.glob(f"*/shards/{MANIFEST_NAME}"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.parts[-3])
def test_every_release_manifest_round_trips(path: Path) -> None:
    doc = json.loads(path.read_text())
    info = Manifest.from_json(doc)
    assert json.dumps(info.to_json(), indent=2) == json.dumps(doc, indent=2)  # order too
    shards = ShardSet(str(path.parent), doc)
    assert shards.info == info and shards.task == info.label.task
    assert shards.splits["train"].rows == sum(s.rows for s in info.splits["train"].shards)


def test_unknown_entries_are_kept_and_malformed_ones_name_the_file(tmp_path: Path) -> None:
    doc = json.loads(MANIFESTS[0].read_text())
    newer = {**doc, "lineage": {"job": "nightly"}}
    assert Manifest.from_json(newer).to_json() == newer
    assert list(Manifest.from_json(newer).to_json())[-1] == "splits"
    broken = {k: v for k, v in doc.items() if k != "label"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(broken))
    with pytest.raises(ShardSetError, match=rf"{MANIFEST_NAME} is malformed: KeyError: 'label'"):
        ShardSet.open(str(tmp_path))
