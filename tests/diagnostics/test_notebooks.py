"""Execute every notebook under notebooks/ top to bottom in fast mode (MODMAN_FAST=1).

The kernel is this interpreter: a temporary kernelspec whose argv is sys.executable, found
through JUPYTER_PATH, so a user-level "python3" kernelspec pointing at another Python cannot be
picked up. Each notebook checks its own claims with assert cells, so a wrong result fails here.
"""
import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 240  # per cell; the whole set is meant to take < 2.5 minutes on 2 cores


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "modman-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "modman test", "language": "python"}))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    mp.setenv("MODMAN_FAST", "1")
    mp.setenv("MPLBACKEND", "Agg")
    yield "modman-test"
    mp.undo()


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    # committed without outputs (the repository keeps notebooks stripped)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
