"""The README's list of quarantine reasons, generated from :mod:`preprocessing.read.reasons`.

    python -m jobs.reasonsref --write README.md    # regenerate (make docs)
    python -m jobs.reasonsref --check README.md    # exit 1 when the README is stale

Renders :data:`~preprocessing.read.reasons.REASONS` (code, the columns it applies to, whether
scoring checks it, meaning) as one Markdown table between the
``<!-- quarantine-reasons:start -->`` and ``<!-- quarantine-reasons:end -->`` markers. A unit
test runs ``--check``, so the README's list cannot drift from the codes validation uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs.configref import write_or_check
from preprocessing.read.reasons import REASONS

__all__ = ["END", "START", "main", "reference"]

START = "<!-- quarantine-reasons:start -->"
END = "<!-- quarantine-reasons:end -->"


def reference() -> str:
    """The generated Markdown: one row per reason, in priority order."""
    lines = ["| reason | applies to | scoring | meaning |", "|---|---|---|---|"]
    for r in REASONS:
        kinds = "the whole record" if r.kinds == ("record",) else ", ".join(r.kinds)
        scored = "yes" if r.scored else "no"
        meaning = r.meaning.replace("|", "\\|")
        lines.append(f"| `{r.code}` | {kinds} | {scored} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write or check the list in a Markdown file; 1 when ``--check`` finds it stale."""
    return write_or_check(
        argv,
        prog="python -m jobs.reasonsref",
        description=__doc__,
        generated=reference(),
        markers=(START, END),
        what="the list of quarantine reasons",
    )


if __name__ == "__main__":
    raise SystemExit(main())
