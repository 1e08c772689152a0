"""Copies src/jaxpost/install.py into the notebook's install cell and re-exports the notebook.

    python demo/sync_notebook.py

The install cell runs before jaxpost is installed, so it carries the module's code
rather than importing it; tests/test_install.py fails while the two differ. The export,
notebooks_exported/train_colab.py, is the notebook as a jupytext percent script (what
``jupytext --to py:percent`` writes; tests/test_notebook.py compares them), so run this
after any edit to the notebook too. Needs the test extra (nbformat, jupytext).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo" / "train_colab.ipynb"
EXPORTED = REPO / "notebooks_exported" / "train_colab.py"
INSTALL_MODULE = REPO / "src" / "jaxpost" / "install.py"
INSTALL_TAG = "install"


def install_cell_source(module: Path = INSTALL_MODULE) -> str:
    """What the install cell holds: the module's text, less its final newline."""
    return module.read_text(encoding="utf-8").rstrip("\n")


def sync(notebook: Path = NOTEBOOK, exported: Path = EXPORTED,
         module: Path = INSTALL_MODULE) -> None:
    """Writes ``module`` into the one code cell of ``notebook`` tagged ``install``, then
    the notebook as a percent script to ``exported``.

    Raises:
      ValueError: the notebook has no install cell or more than one.
    """
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells
             if c.cell_type == "code" and INSTALL_TAG in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook}: {len(cells)} code cells tagged {INSTALL_TAG!r}, "
                         f"expected 1")
    cells[0].source = install_cell_source(module)
    nbformat.write(nb, notebook)
    jupytext.write(nb, exported, fmt="py:percent")


if __name__ == "__main__":
    sync()
    print(f"wrote {NOTEBOOK.relative_to(REPO)} and {EXPORTED.relative_to(REPO)}")
