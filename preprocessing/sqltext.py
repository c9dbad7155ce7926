"""Spark SQL text for expressions built as strings: quoted names and exact literals.

A plan built from SQL text costs one Py4J call per expression on a classic session, where
the ``Column`` API costs several per operator; the ETL's wide projections are built this way.
"""

from __future__ import annotations

__all__ = ["quote", "sql_double", "sql_string"]


def quote(name: str) -> str:
    """``name`` as a Spark SQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def sql_double(x: float) -> str:
    """A Spark SQL double holding exactly ``x`` (``repr`` round-trips; inf and NaN too)."""
    return f"CAST('{float(x)!r}' AS DOUBLE)"


def sql_string(text: str) -> str:
    """A Spark SQL string literal holding exactly ``text`` (backslash and quote escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
