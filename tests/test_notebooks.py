"""Tests of the walkthrough notebooks in ``notebooks/``: stored without outputs, and they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # per cell; the whole walkthrough takes one to two minutes on 2 CPU cores


def test_notebooks_found():
    """Check that the walkthrough notebook is where the other tests look for it."""
    assert "layer_depth.ipynb" in [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_without_outputs(path):
    """Check that a notebook is committed without outputs or execution counts (clear them first)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [
        i for i, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]  # fmt: skip
    assert not dirty, (
        f"{path.name} holds outputs in code cells {dirty}: clear them before committing (Jupyter: "
        f"Edit > Clear Outputs of All Cells, or jupyter nbconvert --clear-output --inplace notebooks/{path.name})"
    )


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Check that a notebook runs top to bottom without error, in a fresh folder and feature store."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]  # fmt: skip
    assert not errors
    assert any((tmp_path / "cache").glob("*.h5")), "the notebook did not use the feature store in $FEATX_CACHE"
