"""The README's config reference is generated from the dataclasses and must match them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jobs import configref

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    assert configref.splice(text, configref.reference()) == text, (
        "README.md's config reference is stale: run `make docs`"
    )
    assert configref.main(["--check", str(README)]) == 0


def test_every_key_is_documented() -> None:
    rows = configref.reference().splitlines()
    keys = [r for r in rows if r.startswith("| `")]
    assert any(r.startswith("| `train.optimizer.lr` | float \\| null | `null` |") for r in keys)
    assert any(r.startswith("| `etl.input.path` | str | required |") for r in keys)
    undocumented = [r.split("|")[1].strip() for r in keys if r.rstrip().endswith("|  |")]
    assert not undocumented, f"fields without an attribute docstring: {undocumented}"


def test_check_fails_on_a_stale_file_and_write_fixes_it(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{configref.START}\n| old |\n{configref.END}\nrest\n")
    assert configref.main(["--check", str(stale)]) == 1
    assert configref.main(["--write", str(stale)]) == 0
    assert configref.main(["--check", str(stale)]) == 0
    assert stale.read_text().startswith("intro\n") and stale.read_text().endswith("rest\n")


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ValueError, match="markers"):
        configref.splice("no markers here", "x")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
    depth: int = 3
    """How deep."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """Not shown: expanded into its keys."""


def test_nested_sections_become_dotted_keys() -> None:
    assert list(configref._rows(_Outer, "x")) == [("x.inner.depth", "int", "`3`", "How deep.")]
