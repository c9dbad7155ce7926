"""The README's source tree and layer chain, generated from the code and the import contracts.

    python -m jobs.treeref --write README.md    # regenerate (make docs)
    python -m jobs.treeref --check README.md    # exit 1 when the README is stale

Between ``<!-- source-tree:start -->`` and ``<!-- source-tree:end -->``: every package with
the first line of its docstring and the names of its modules, packages in the order of the
layers contract (lowest first, so the tree reads as the data flows), then the chain of
layers as ``pyproject.toml``'s import-linter ``layers`` contract states it. A unit test runs
``--check``, so a new module or a new layer cannot be left out of the README.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import tomllib

from jobs.configref import write_or_check

__all__ = ["END", "START", "layers", "main", "reference"]

START = "<!-- source-tree:start -->"
END = "<!-- source-tree:end -->"
REPO = Path(__file__).resolve().parents[1]
ROOTS = ("preprocessing", "pipeline", "jobs")
_WIDTH = 96


def layers(pyproject: Path = REPO / "pyproject.toml") -> list[list[str]]:
    """The ``layers`` contract's layers, highest first, each a list of its modules."""
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    return [[m.strip() for m in layer.split("|")] for layer in contract["layers"]]


def _summary(init: Path) -> str:
    """The first paragraph of a package's docstring, as Markdown code spans (none: empty)."""
    if not init.is_file():
        return ""
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    text = doc.split("\n\n")[0].replace("\n", " ").replace("``", "`").strip()
    return re.sub(r":\w+:`", "`", text)


def _rank(package: str, chain: list[list[str]]) -> tuple[int, str]:
    """Lowest layer first; a package outside the contract after those inside it."""
    for i, layer in enumerate(reversed(chain)):
        if any(package == m or package.startswith(m + ".") for m in layer):
            return (i, package)
    return (len(chain), package)


def _package(path: Path, dotted: str, chain: list[list[str]], depth: int) -> list[str]:
    pad = "  " * depth
    head = f"{pad}{path.name}/"
    summary = _summary(path / "__init__.py")
    lines = textwrap.wrap(
        summary,
        _WIDTH,
        initial_indent=head.ljust(max(len(head) + 1, 18)),
        subsequent_indent=" " * 18,
    ) or [head]
    modules = sorted(
        p.stem for p in path.glob("*.py") if p.stem != "__init__" and not p.stem.startswith("_")
    )
    if modules:
        lines += textwrap.wrap(
            ", ".join(f"{m}.py" for m in modules),
            _WIDTH,
            initial_indent=pad + "  ",
            subsequent_indent=pad + "  ",
        )
    subs = [p for p in path.iterdir() if p.is_dir() and any(p.glob("*.py"))]
    for sub in sorted(subs, key=lambda p: _rank(f"{dotted}.{p.name}", chain)):
        lines += _package(sub, f"{dotted}.{sub.name}", chain, depth + 1)
    return lines


def reference(repo: Path = REPO) -> str:
    """The generated Markdown: the tree in a code block, then the chain of layers."""
    chain = layers(repo / "pyproject.toml")
    tree = [line for root in ROOTS for line in _package(repo / root, root, chain, 0)]
    arrows = " → ".join(" | ".join(f"`{m}`" for m in layer) for layer in chain)
    return "\n".join(["```", *tree, "```", "", f"Layers, highest first: {arrows}."]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write or check the tree in a Markdown file; 1 when ``--check`` finds it stale."""
    return write_or_check(
        argv,
        prog="python -m jobs.treeref",
        description=__doc__,
        generated=reference(),
        markers=(START, END),
        what="the source tree",
    )


if __name__ == "__main__":
    raise SystemExit(main())
