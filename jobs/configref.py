"""The README's config reference, generated from the config dataclasses.

    python -m jobs.configref --write README.md    # regenerate (make docs)
    python -m jobs.configref --check README.md    # exit 1 when the README is stale

Every key of the ``spark``, ``etl`` and ``train`` sections is a field of a frozen dataclass
whose attribute docstring says what it means; this module walks those dataclasses (nested
sections become dotted keys; a mapping of sections, e.g. ``etl.images``, gets a row of its
own and then its entries' keys as ``etl.images.<column>.size``) and renders one Markdown table per section between the
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers. A unit
test runs ``--check``, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import sys
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pipeline.config import SparkConfig
from pipeline.core.configbase import to_dict
from pipeline.train.config import TrainConfig
from preprocessing.config import EtlConfig

__all__ = ["END", "START", "keys", "main", "reference", "splice", "write_or_check"]

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
SECTIONS: tuple[tuple[str, type], ...] = (
    ("spark", SparkConfig),
    ("etl", EtlConfig),
    ("train", TrainConfig),
)


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            # reST ``literal`` → Markdown `literal`
            docs[node.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in get_args(tp) else "")
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        return "mapping"
    if origin in (tuple, list, Sequence):
        return "list"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    plain = to_dict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(plain, Mapping):
        plain = dict(plain)
    if isinstance(plain, tuple):
        plain = list(plain)
    return f"`{json.dumps(plain)}`"


def _rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _rows(tp, key)  # type: ignore[arg-type]
            continue
        doc = docs.get(f.name, "")
        yield key, _type_name(tp), _default(f), doc.replace("|", "\\|")
        args = get_args(tp)
        if (
            get_origin(tp) in (Mapping, dict)
            and len(args) == 2
            and dataclasses.is_dataclass(args[1])
        ):
            yield from _rows(args[1], f"{key}.<column>")  # type: ignore[arg-type]
        if get_origin(tp) in (typing.Union, types.UnionType):  # a value or a section
            for section in (a for a in args if dataclasses.is_dataclass(a)):
                yield from _rows(section, key)  # type: ignore[arg-type]


def keys() -> list[str]:
    """Every documented config key, dotted (``train.model.builder``, ``etl.images.<column>.size``)."""
    return [k for name, cls in SECTIONS for k, *_ in _rows(cls, name)]


def reference() -> str:
    """The generated Markdown: one table per section."""
    parts = []
    for name, cls in SECTIONS:
        lines = [f"#### `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} | {doc} |" for k, t, d, doc in _rows(cls, name)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def splice(text: str, generated: str, start_marker: str = START, end_marker: str = END) -> str:
    """``text`` with the part between the markers replaced by ``generated``."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the markers {start_marker} ... {end_marker} are missing")
    return text[: start + len(start_marker)] + "\n\n" + generated + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """Write or check the reference in a Markdown file; 1 when ``--check`` finds it stale."""
    return write_or_check(
        argv,
        prog="python -m jobs.configref",
        description=__doc__,
        generated=reference(),
        markers=(START, END),
        what="the config reference",
    )


def write_or_check(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    generated: str,
    markers: tuple[str, str],
    what: str,
) -> int:
    """The ``--write`` / ``--check MARKDOWN`` command of a generated README section.

    Returns 1 when ``--check`` finds the part between ``markers`` differing from ``generated``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the section in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if it is out of date")
    parser.add_argument("markdown", type=Path)
    args = parser.parse_args(argv)
    text = args.markdown.read_text(encoding="utf-8")
    updated = splice(text, generated, *markers)
    if args.write:
        args.markdown.write_text(updated, encoding="utf-8")
        return 0
    if updated != text:
        print(f"{args.markdown}: {what} is out of date; run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
