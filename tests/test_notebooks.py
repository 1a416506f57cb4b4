"""Execute every example notebook end to end in its tiny setting, so none can rot.

Notebooks are stored as jupytext percent scripts (``examples/notebooks/*.py``): they diff and
review like code, ruff checks them, and no stale outputs live in git. Here each is converted to
a notebook and run cell by cell in a Jupyter kernel (nbclient), as a user would run it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "examples" / "notebooks").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, data_root: Path, tmp_path: Path, monkeypatch) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HEST2SGE_NOTEBOOK_MODE", "tiny")
    monkeypatch.setenv("HEST2SGE_HER2ST", str(data_root / "her2st"))
    monkeypatch.setenv("HEST2SGE_DATA", str(data_root))
    monkeypatch.setenv("HEST2SGE_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = jupytext.read(path)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert "HEST2SGE_NOTEBOOK_MODE" in params[0].source and '"paper"' in params[0].source
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    client.execute()
    print(f"{path.name}: {time.time() - t0:.1f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
