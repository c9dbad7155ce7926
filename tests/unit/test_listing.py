"""The driver's file listing (fingerprints, image folders) follows Spark's file selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preprocessing.read.listing import InputFile, list_input_files


def _tree(root: Path) -> None:
    files = {
        "a/1.jpg": b"x" * 3,
        "a/empty.png": b"",
        "a/.hidden.jpg": b"h",
        "a/_SUCCESS": b"",
        "_tmp/x.jpg": b"t",
        ".git/y.png": b"g",
        "b/2.png": b"yy",
        "b/k=_v/3.png": b"zzzz",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.utime(root / "a/1.jpg", ns=(0, 1_234_567_890_123))


def test_listing_skips_hidden_names_and_spells_paths_as_spark(tmp_path: Path) -> None:
    _tree(tmp_path)
    got = list_input_files(str(tmp_path))
    names = [f.path.removeprefix(f"file:{tmp_path}/") for f in got]
    assert names == ["a/1.jpg", "a/empty.png", "b/2.png", "b/k=_v/3.png"]
    assert got[0] == InputFile(f"file:{tmp_path}/a/1.jpg", 3, 1_234_567)
    assert [f.size for f in got] == [3, 0, 2, 4]
    assert list_input_files(f"file://{tmp_path}") == got == list_input_files(f"file:{tmp_path}")


def test_listing_filters_names_globs_and_single_files(tmp_path: Path) -> None:
    _tree(tmp_path)

    def rel(files: list[InputFile]) -> list[str]:
        return [f.path.removeprefix(f"file:{tmp_path}/") for f in files]

    assert rel(list_input_files(str(tmp_path), {"pathGlobFilter": "*.png"})) == [
        "a/empty.png",
        "b/2.png",
        "b/k=_v/3.png",
    ]
    assert rel(list_input_files(f"{tmp_path}/b/*.png")) == ["b/2.png"]
    assert rel(list_input_files(f"{tmp_path}/[ab]")) == rel(list_input_files(str(tmp_path)))
    assert rel(list_input_files(f"{tmp_path}/b")) == ["b/2.png", "b/k=_v/3.png"]
    assert rel(list_input_files(f"{tmp_path}/b/2.png")) == ["b/2.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_input_files(str(tmp_path / "nope"))
