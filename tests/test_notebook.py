"""examples/tour.ipynb runs top to bottom in a real Jupyter kernel, shows its figures, and shows the paper's effect;
the committed notebook has its outputs stripped."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the dev extra (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the dev extra (nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="the notebook test needs the dev extra (ipykernel)")

TOUR = Path(__file__).resolve().parents[1] / "examples" / "tour.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(TOUR, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_tour_runs_in_a_jupyter_kernel_and_shows_the_papers_effect(tmp_path, monkeypatch):
    # a kernelspec for this very interpreter, so the kernel imports the advfeat under test
    spec = tmp_path / "jupyter" / "kernels" / "advfeat-tour"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "advfeat test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(TOUR, as_version=4)
    nbclient.NotebookClient(nb, timeout=HANG_GUARD_S, kernel_name="advfeat-tour",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two grids, inline
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    found = dict(re.findall(r"trained on (D_R|real images): +clean [\d.]+, under L2 0.5 ([\d.]+)", text))
    assert float(found["D_R"]) > float(found["real images"]) + 0.3, text[-500:]
