"""Executes experiments/notebooks/differentiable_ablation.ipynb top to bottom (kernel python3, cwd = repo root).

The notebook's last cell asserts its own results (gradients finite and equal to finite
differences), so any error or failed check fails this test.
"""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "notebooks" / "differentiable_ablation.ipynb"


def test_differentiable_ablation_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "all checks passed" in text
