"""The tutorial notebooks (notebooks/*.py, jupytext percent format) run top to bottom in a real Jupyter kernel.

Each notebook is read with jupytext and executed by nbclient in a fresh ipykernel, with a temporary working
directory, and SNLP_CACHE (tokenizer, token streams, trained runs) points at a temporary directory shared by the
run, never the repository. A cell that raises fails its test. The default (small) settings of every notebook's
`parameters` cell are what runs here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
TIMEOUT = 600  # seconds per cell: far above any default setting's runtime (a busy 2-core machine included), but a hung kernel still fails


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One SNLP_CACHE for every notebook of the run: 01 and 02 train the same tiny models, and 02 reuses 01's runs
    (cached by config, data and code version) instead of training them again."""
    return tmp_path_factory.mktemp("snlp-cache")


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_convergence.py", "02_frontier.py", "03_hyperconnections.py",
                                          "04_your_model.py", "05_off_the_shelf.py", "06_adapt.py"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_percent_format_round_trips_with_a_parameters_cell(path):
    """Canonical percent format, whichever jupytext is installed: each file's header filters out the version of
    the jupytext that wrote it (`notebook_metadata_filter`), so no release of jupytext changes the text."""
    text = path.read_text()
    assert "jupytext_version:" not in text, "the header records a jupytext version: keep the metadata filter"
    nb = jupytext.reads(text, fmt="py:percent")
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with its introduction"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", "exactly one code cell tagged `parameters`"
    assert jupytext.writes(nb, fmt="py:percent") == text, "the file is not in jupytext's canonical percent format"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(shared_cache))  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.read(path)
    before = _repository_files()
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first cell that raises
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))
    assert images >= 1, "the notebook's figures did not reach the notebook as inline images"
    assert _repository_files() == before, "the notebook wrote into the repository"


def _repository_files() -> set[Path]:
    """The files a notebook could litter: the repository's top level and notebooks/."""
    return {p for folder in (ROOT, ROOT / "notebooks") for p in folder.iterdir()}
