"""The notebooks run top to bottom, and match the scripts that generate them.

notebooks/quickstart.ipynb (the CLI pipeline step by step) and notebooks/estimator.ipynb
(``TorchEstimator``: ``fit(df)`` → ``transform(df)`` on a DataFrame built in the notebook).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import build_estimator  # noqa: E402
import build_quickstart  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_committed_notebook_is_the_generated_one() -> None:
    committed = nbformat.read(build_quickstart.NOTEBOOK, as_version=4)
    generated = build_quickstart.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in generated.cells
    ], "notebooks/quickstart.ipynb is stale: run .venv/bin/python notebooks/build_quickstart.py"
    size = build_quickstart.NOTEBOOK.stat().st_size
    assert size < 400_000, f"stored outputs are {size} bytes; keep the notebook small"


def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICKSTART_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(build_quickstart.NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    started = time.monotonic()
    build_quickstart.execute(nb, NOTEBOOKS)  # raises CellExecutionError on a failing cell
    seconds = time.monotonic() - started
    assert seconds < build_quickstart.TIMEOUT_S

    def text(cell: object) -> str:
        return "".join(o.get("text", "") for o in cell.outputs)  # type: ignore[attr-defined]

    code = [c for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(text(c) for c in code)
    assert "rows_in=20000" in everything
    assert "rows_quarantined=" in everything
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook draws its plots"
    assert len(images) >= 2, "feature histograms and the DDP-vs-averaging curves"
    assert "synchronizations: DDP" in everything and "score_error" in everything
    for bundle in ("model-ddp", "model-avg"):
        assert (tmp_path / "work" / bundle / "model.safetensors").is_file()


def test_committed_estimator_notebook_is_the_generated_one() -> None:
    committed = nbformat.read(build_estimator.NOTEBOOK, as_version=4)
    generated = build_estimator.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in generated.cells
    ], "notebooks/estimator.ipynb is stale: run .venv/bin/python notebooks/build_estimator.py"
    size = build_estimator.NOTEBOOK.stat().st_size
    assert size < 200_000, f"stored outputs are {size} bytes; keep the notebook small"


def test_estimator_notebook_fits_and_transforms_a_dataframe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESTIMATOR_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(build_estimator.NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    build_estimator.execute(nb, NOTEBOOKS)  # raises CellExecutionError on a failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join("".join(o.get("text", "") for o in c.outputs) for c in code)
    assert "array_invalid=" in everything and "rows_quarantined=" in everything
    accuracy = float(everything.split("new rows: ")[1].split()[0])
    assert accuracy > 0.7, everything
    assert "reloaded model gives the same predictions: True" in everything
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the training curves, the confusion matrix and the histogram"
    assert (tmp_path / "work" / "churn-model" / "model.safetensors").is_file()
