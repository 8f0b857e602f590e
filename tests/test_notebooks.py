"""Every committed notebook runs top to bottom, and matches its source."""

import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402  (notebooks/build.py)

NAMES = sorted(p.stem for p in (NOTEBOOKS / "src").glob("*.py"))


def test_there_are_notebooks():
    assert NAMES, "no notebook sources in notebooks/src"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    fresh = build.parse((NOTEBOOKS / "src" / f"{name}.py").read_text())
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], (
        f"notebooks/{name}.ipynb is stale: run `python notebooks/build.py {name}`"
    )
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("outputs") is not None for c in code)
    assert any(c.outputs for c in code), "committed without outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name):
    nb = build.parse((NOTEBOOKS / "src" / f"{name}.py").read_text())
    build.execute(nb, timeout=300)  # raises CellExecutionError on any failure
