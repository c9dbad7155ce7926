"""The architecture rules hold, and the tool that enforces them catches a break.

``make lint`` runs ``lint-imports`` with the contracts in pyproject.toml (layers, Spark-free
rank side, no cycles — type-only and function-level imports counted). Here: a copy of the tree
with one forbidden import, one layer break and one type-only cycle added must fail those
contracts by name; private names stay inside their module; modules and
functions stay small.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "preprocessing", "jobs")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 550
MAX_FUNCTION_LINES = 60


def _product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_lint_imports_fails_on_a_spark_import_and_a_cycle(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert _lint(tmp_path).returncode == 0, _lint(tmp_path).stdout[-3000:]
    # The reader (rank side) pulls in Spark, and the core config module imports training.
    reader = tmp_path / "pipeline" / "data" / "reader.py"
    reader.write_text(reader.read_text() + "\nimport pyspark  # noqa\n")
    base = tmp_path / "pipeline" / "core" / "configbase.py"
    base.write_text(base.read_text() + "\nimport pipeline.train.loop  # noqa\n")
    # A circle through a type-only import counts: shardset ← reader, and now reader ← shardset.
    shardset = tmp_path / "pipeline" / "data" / "shardset.py"
    shardset.write_text(
        shardset.read_text()
        + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        + "    from pipeline.data.reader import ShardReader  # noqa\n"
    )
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    out = " ".join(proc.stdout.split())
    assert "imports no pyspark BROKEN" in out
    assert "pipeline.data.reader -> pyspark" in out
    assert "pipeline.core.configbase -> pipeline.train.loop" in out  # the layers contract
    assert "No cycles are allowed in pipeline.data" in out and ".shardset -> .reader" in out


def _imported_private_names(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            private = [
                a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")
            ]
            if top in PACKAGES and private:
                found += [f"{path.relative_to(REPO)}: {node.module}.{n}" for n in private]
    return found


def test_no_private_names_imported_across_modules() -> None:
    found = [hit for p in _product_files() for hit in _imported_private_names(p)]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant
            )
            start = (first.end_lineno or first.lineno) + 1 if has_doc else first.lineno
            out.append(
                (f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node.end_lineno - start + 1)
            )  # type: ignore[operator]
    return out


def test_modules_and_functions_stay_small() -> None:
    big = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in _product_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long = [
        f"{name}: {n} lines"
        for p in _product_files()
        for name, n in _function_lengths(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not big and not long, "\n".join(big + long)


def test_importing_the_api_loads_neither_spark_nor_torch() -> None:
    code = (
        "import sys, pipeline, pipeline.config, pipeline.data.shardset; "
        "sys.exit(int(any(m in sys.modules for m in ('pyspark', 'torch'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_readme_tree_and_layers_are_current(tmp_path: Path) -> None:
    from jobs import treeref

    assert treeref.main(["--check", str(REPO / "README.md")]) == 0, "run `make docs`"
    # A new module shows up in the generated tree (and so fails --check until make docs).
    assert "shardset.py" in treeref.reference()
    copy = tmp_path / "repo"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy)
    (copy / "pipeline" / "data" / "newkind.py").write_text('"""A new module."""\n')
    assert "newkind.py" in treeref.reference(copy)
    assert [layer[0] for layer in treeref.layers(copy / "pyproject.toml")][:2] == [
        "jobs",
        "pipeline.estimator",
    ]
