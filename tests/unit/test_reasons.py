"""One table of quarantine reasons: the codes never change, the README's list is generated."""

from __future__ import annotations

from pathlib import Path

from jobs import configref, reasonsref
from preprocessing.read import arrays, imagedecode, reasons
from preprocessing.read.reasons import REASONS, Reason

README = Path(__file__).resolve().parents[2] / "README.md"

# Users filter quarantine tables and score_error by these strings: never rename one.
CODES = [
    "malformed_record",
    "repeated_header",
    "key_missing",
    "label_missing",
    "label_invalid",
    "value_invalid",
    "value_out_of_range",
    "value_not_finite",
    "value_missing",
    "array_missing",
    "array_invalid",
    "image_missing",
    "text_missing",
    "text_too_long",
    "text_invalid",
    "image_unreadable",  # what decoding finds ranks last (after 0.2.0: decoded by the writers)
    "image_invalid",
    "image_too_large",
]


def test_the_codes_are_the_released_ones_in_priority_order() -> None:
    assert [r.code for r in REASONS] == CODES
    constants = [v for v in vars(reasons).values() if isinstance(v, Reason)]
    assert set(constants) == set(REASONS), "a Reason constant missing from REASONS"
    assert {r.code for r in REASONS if not r.scored} == {
        "key_missing",
        "label_missing",
        "label_invalid",
    }
    assert all(r.meaning and r.kinds for r in REASONS)


def test_the_modules_take_their_codes_from_the_table() -> None:
    assert (arrays.ARRAY_MISSING, arrays.ARRAY_INVALID) == ("array_missing", "array_invalid")
    assert imagedecode.IMAGE_REASONS == ("image_unreadable", "image_invalid", "image_too_large")


def test_readme_list_is_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    generated = reasonsref.reference()
    assert configref.splice(text, generated, reasonsref.START, reasonsref.END) == text, (
        "README.md's list of quarantine reasons is stale: run `make docs`"
    )
    assert reasonsref.main(["--check", str(README)]) == 0
    assert all(f"| `{code}` |" in generated for code in CODES)


def test_check_fails_on_a_stale_list_and_write_fixes_it(tmp_path: Path, capsys: object) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(
        f"intro\n{reasonsref.START}\n| `malformed_record` | old |\n{reasonsref.END}\nrest\n"
    )
    assert reasonsref.main(["--check", str(stale)]) == 1
    assert reasonsref.main(["--write", str(stale)]) == 0
    assert reasonsref.main(["--check", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "`text_invalid`" in text
