"""The hostile CSV of :mod:`tests.corpus`, made worse at the byte level.

On top of corpus's text cases this adds what only raw bytes can express — a UTF-8 BOM, mixed
line endings (``\\n``, ``\\r\\n``, lone ``\\r``), invalid UTF-8, NUL bytes — plus more
delimiter, quoting and number cases, and lines that are not rows (empty, whitespace-only).

What a *row* is (the contract the tests check): a record Spark's CSV reader produces, i.e.
a non-blank line after the file's header, whatever its line ending. Blank and
whitespace-only lines are not rows and are not counted; the BOM is part of no row (the
header still matches the schema). Invalid UTF-8 bytes decode to U+FFFD: in a string column
the value is kept, in a numeric column it does not parse (``value_invalid``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tests import corpus

# case name → (line template with {id}, expected reason under missing: impute; None: good)
BYTE_CASES: dict[str, tuple[bytes, str | None]] = {
    "wrong_delimiter": (b"{id};1.0;2.0;lyon;1", "malformed_record"),
    "tab_delimiter": (b"{id}\t1.0\t2.0\tlyon\t1", "malformed_record"),
    "trailing_delimiter": (b"{id},1.0,2.0,lyon,1,", "malformed_record"),
    "invalid_utf8_in_string": (b"{id},1.0,2.0,ly\xffon,0", None),
    "invalid_utf8_in_numeric": (b"{id},1.\xfe5,2.0,lyon,1", "value_invalid"),
    "nul_byte_in_string": (b"{id},1.0,2.0,ni\x00ce,1", None),
    "inf_word": (b"{id},+inf,2.0,lyon,1", None),  # imputed like 1e400
    "underflow": (b"{id},1e-400,2.0,lyon,0", None),
    "quoted_number": (b'{id},"1.5",2.0,lyon,1', None),
    "escaped_quote": (b'{id},1.0,2.0,"pa""ris",0', None),
    "label_float_text": (b"{id},1.0,2.0,lyon,1.0", "label_invalid"),
    "label_infinity": (b"{id},1.0,2.0,lyon,Infinity", "label_invalid"),
    "label_int_overflow": (b"{id},1.0,2.0,lyon,99999999999", "label_invalid"),
    "hex_number": (b"{id},0x1A,2.0,lyon,1", "value_invalid"),
    "bool_in_numeric": (b"{id},true,2.0,lyon,1", "value_invalid"),
    "quoted_thousands": (b'{id},"1,000",2.0,lyon,1', "value_invalid"),
    "key_fraction": (b"{id}.5,1.0,2.0,lyon,1", "value_invalid"),
    "blank_key": (b"   ,1.0,2.0,lyon,1", "key_missing"),
    "only_delimiters": (b",,,,", "key_missing"),
}
NOT_ROWS: tuple[bytes, ...] = (b"", b"   ", b"\t \t")
LINE_ENDINGS: tuple[bytes, ...] = (b"\n", b"\r\n", b"\r")
BOM = b"\xef\xbb\xbf"


@dataclass
class Expected:
    """What an ETL of the written file must report."""

    rows_in: int = 0
    good_ids: set[int] = field(default_factory=set)
    by_reason: dict[str, int] = field(default_factory=dict)
    reason_by_id: dict[str, str] = field(default_factory=dict)
    """Quarantined rows whose id field Spark reads back exactly: raw id → reason."""
    not_rows: int = 0
    kinds: int = 0

    def add(self, raw_id: str, reason: str | None, *, id_is_exact: bool) -> None:
        self.rows_in += 1
        if reason is None:
            self.good_ids.add(int(raw_id))
            return
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if id_is_exact:
            self.reason_by_id[raw_id] = reason


def _cases() -> list[tuple[bytes, str | None]]:
    """Every bad-row template of corpus and of :data:`BYTE_CASES` as bytes, with its reason."""
    out = [(template.encode(), reason) for template, reason in corpus.CASES.values()]
    return out + list(BYTE_CASES.values())


def write_hostile(path: Path, *, good: int = 300, copies: int = 2, seed: int = 0) -> Expected:
    """Write the hostile CSV (one file, BOM first) and return what the ETL must find."""
    rng = random.Random(seed)
    exp = Expected(kinds=len(corpus.CASES) + len(BYTE_CASES))
    lines: list[bytes] = []
    for i in range(good):
        lines.append(corpus.good_line(i, rng).encode())
        exp.add(str(i), None, id_is_exact=True)
    next_id = 500_000
    for template, reason in _cases():
        for _ in range(copies):
            lines.append(template.replace(b"{id}", str(next_id).encode()))
            # rows whose id field is exactly the generated id, and whose reason a parsed id names
            keyed = template.startswith(b"{id},")
            exp.add(
                str(next_id) if keyed else "",
                reason,
                id_is_exact=keyed and reason != "malformed_record",
            )
            next_id += 1
    rng.shuffle(lines)
    for k in range(0, len(lines), 37):
        lines.insert(k, NOT_ROWS[k % len(NOT_ROWS)])
        exp.not_rows += 1
    body = b"".join(line + rng.choice(LINE_ENDINGS) for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(BOM + corpus.HEADER.encode() + b"\r\n" + body)
    return exp
