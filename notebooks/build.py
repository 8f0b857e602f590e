"""Builds the notebooks from their sources and executes them, outputs included.

Each notebook is written as a percent-format Python file in ``notebooks/src``
(``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines
start with ``# ``). This script turns each into ``notebooks/<name>.ipynb`` and
executes it top to bottom in a fresh kernel, so the committed notebook carries
its outputs (plots visible when browsing the repository). The test suite
re-executes the committed notebooks (``tests/test_notebooks.py``).

Run from the repository root: ``python notebooks/build.py [NAME ...]``.
"""

from __future__ import annotations

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def parse(source: str) -> nbformat.NotebookNode:
    """Percent-format source -> notebook (no outputs)."""
    cells = []
    kind, lines = None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#")
                for line in text.splitlines()
            )
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind = "markdown" if "[markdown]" in line else "code"
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Executes ``nb`` in a fresh kernel with the notebooks folder as working directory."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
    )
    client.execute()
    return nb


def build(name: str) -> float:
    src = HERE / "src" / f"{name}.py"
    nb = parse(src.read_text())
    start = time.perf_counter()
    execute(nb)
    elapsed = time.perf_counter() - start
    nbformat.write(nb, HERE / f"{name}.ipynb")
    return elapsed


def main(argv=None) -> None:
    names = argv if argv else sorted(p.stem for p in (HERE / "src").glob("*.py"))
    for name in names:
        print(f"{name}: executed in {build(name):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
