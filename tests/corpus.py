"""A generated hostile CSV: good rows mixed with many kinds of bad ones, each with its expected fate.

Columns: ``id,f0,f1,city,label`` (declared ``long, double, double, string, int``), classes
[0, 1]. ``EXPECTED`` maps each case to the reason it must be quarantined with (``None``:
the row is good and must reach a shard), for ``missing: impute``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

HEADER = "id,f0,f1,city,label"

SCHEMA = {"id": "long", "f0": "double", "f1": "double", "city": "string", "label": "int"}

# case name → (line template with {id}, expected reason under missing: impute)
CASES: dict[str, tuple[str, str | None]] = {
    "too_few_fields": ("{id},1.0,2.0", "malformed_record"),
    "too_many_fields": ("{id},1.0,2.0,paris,1,extra", "malformed_record"),
    "unterminated_quote": ('{id},1.0,"2.0,paris,1', "malformed_record"),
    "text_in_numeric": ("{id},abc,2.0,paris,1", "value_invalid"),
    "overflow_double": ("{id},1e400,2.0,paris,1", None),  # +inf: imputed under missing: impute
    "nan": ("{id},NaN,2.0,paris,0", None),
    "neg_inf": ("{id},-Infinity,2.0,paris,0", None),
    "huge_1e308": ("{id},1e308,2.0,paris,1", "value_out_of_range"),
    "null_label": ("{id},1.0,2.0,paris,", "label_missing"),
    "non_integer_label": ("{id},1.0,2.0,paris,0.5", "label_invalid"),
    "label_outside_classes": ("{id},1.0,2.0,paris,7", "label_invalid"),
    "key_missing": (",1.0,2.0,paris,1", "key_missing"),
    "key_not_integer": ("x{id},1.0,2.0,paris,1", "value_invalid"),
    "key_overflow": ("99999999999999999999{id},1.0,2.0,paris,1", "value_invalid"),
    "repeated_header": (HEADER, "repeated_header"),
    "empty_category": ("{id},1.0,2.0,,1", None),
    "control_chars": ("{id},1.0,2.0,pa\x01ris\x7f,0", None),
    "very_long_field": ("{id},1.0,2.0," + "z" * 100_000 + ",1", None),
    "padded_numbers": ("{id}, 1.5 , -2 ,lyon,0", None),
    "null_numeric": ("{id},,2.0,lyon,1", None),
}


def good_line(i: int, rng: random.Random) -> str:
    """A valid row whose label depends on the features."""
    f0, f1 = rng.gauss(0, 1), rng.gauss(0, 1)
    city = rng.choice(["paris", "lyon", "nice", "lille"])
    label = int(f0 + 0.5 * f1 + (0.5 if city == "paris" else 0.0) > 0)
    return f"{i},{f0:.5f},{f1:.5f},{city},{label}"


def write_corpus(path: Path, *, good: int = 400, copies: int = 2, seed: int = 0) -> dict[str, Any]:
    """Write the corpus; returns expected counts ``{"rows_in", "good", "by_reason"}``.

    Blank lines are sprinkled in: Spark's CSV reader does not produce records for them, so
    they are not rows (documented in preprocessing/read/raw.py).
    """
    rng = random.Random(seed)
    lines = [good_line(i, rng) for i in range(good)]
    expected_reasons: dict[str, int] = {}
    ok = good
    next_id = 100_000
    for template, reason in CASES.values():
        for _ in range(copies):
            lines.append(template.format(id=next_id))
            next_id += 1
            if reason is None:
                ok += 1
            else:
                expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    rng.shuffle(lines)
    for k in range(0, len(lines), 97):
        lines.insert(k, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return {
        "rows_in": ok + sum(expected_reasons.values()),
        "good": ok,
        "by_reason": expected_reasons,
    }


def etl_section(raw: str, output: str, **overrides: Any) -> dict[str, Any]:
    """An ``etl`` config section for the corpus."""
    cfg: dict[str, Any] = {
        "input": {"path": raw, "format": "csv"},
        "schema": dict(SCHEMA),
        "label": "label",
        "key": "id",
        "numeric": ["f0", "f1"],
        "categorical": ["city"],
        "classes": [0, 1],
        "split": {"val": 0.1, "test": 0.1, "seed": 7},
        "output": output,
        "num_shards": 4,
        "row_group_rows": 50,
    }
    cfg.update(overrides)
    return cfg
