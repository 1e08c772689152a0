"""The Colab/Kaggle notebook: only calls into the package, in sync with its script, and runs.

The notebook is executed with nbclient on CPU, with the smoke preset chosen through the
environment variables its parameter cell reads. The cell tagged ``install`` is left out:
the package under test is already installed (that cell, a copy of ``jaxpost.install``, is
checked in tests/test_install.py). The kernel is
this interpreter (a kernelspec written for the test), so it sees the same environment
locally and in CI.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo" / "train_colab.ipynb"
EXPORTED = REPO / "notebooks_exported" / "train_colab.py"
REGENERATE = "python demo/sync_notebook.py"
INSTALL_TAG = "install"
HF_SECRET = "hf_SECRETnotebook789"
KAGGLE_SECRET = "kaggleSECRETnotebook012"

# Statements and expressions that make a cell more than a call into the package.
FORBIDDEN = {
    ast.FunctionDef: "a function definition", ast.AsyncFunctionDef: "a function definition",
    ast.Lambda: "a lambda", ast.ClassDef: "a class definition", ast.For: "a loop",
    ast.AsyncFor: "a loop", ast.While: "a loop", ast.comprehension: "a loop (comprehension)",
    ast.If: "a branch", ast.IfExp: "a branch", ast.Try: "exception handling",
}


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def python_source(cell_source: str) -> str:
    """The cell without IPython magics and shell lines, which are not Python."""
    return "\n".join(line for line in cell_source.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


def logic_in(cell_source: str) -> list[str]:
    """What a cell does besides calling the package: definitions, loops, branches."""
    tree = ast.parse(python_source(cell_source))
    return sorted({FORBIDDEN[type(n)] for n in ast.walk(tree) if type(n) in FORBIDDEN})


def test_the_logic_check_catches_definitions_loops_and_branches():
    assert logic_in("def f():\n    pass") == ["a function definition"]
    assert logic_in("class A:\n    pass") == ["a class definition"]
    assert logic_in("for x in y:\n    pass") == ["a loop"]
    assert logic_in("z = [x for x in y]") == ["a loop (comprehension)"]
    assert logic_in("while True:\n    break") == ["a loop"]
    assert logic_in("if a:\n    b()") == ["a branch"]
    assert logic_in("%pip install x\nconfig = make_config('smoke')\nconfig") == []


def test_notebook_cells_only_call_the_package():
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 12 <= len(nb.cells) <= 22
    install = [c for c in code if INSTALL_TAG in c.metadata.get("tags", [])]
    # The install cell runs before jaxpost exists, so it is jaxpost.install's own code.
    assert len(install) == 1 and "def install(" in install[0].source
    for cell in code:
        if cell not in install:
            assert logic_in(cell.source) == [], cell.source
            assert not cell.source.lstrip().startswith(("%pip", "!pip")), cell.source
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    for name in ("JAXPOST_PRESET", "JAXPOST_OUTPUT_DIR", "JAXPOST_MAX_STEPS"):
        assert name in parameters[0].source
    sources = "\n".join(c.source for c in code)
    for call in ("run_full_pipeline(", "prepare_colab_session(", "train_policy(",
                 "export_checkpoint(", "quick_test(", "show_training_curves(",
                 "resolve_credentials(", "detect_platform("):
        assert call in sources, call
    assert nb.cells[0].cell_type == "markdown"


def cell_summary(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def test_exported_script_matches_the_notebook():
    script = jupytext.read(EXPORTED, fmt="py:percent")
    assert cell_summary(script) == cell_summary(read_notebook()), (
        f"notebooks_exported/train_colab.py differs from the notebook; regenerate it: "
        f"{REGENERATE}")


def test_exported_script_comparison_notices_a_change():
    script = jupytext.read(EXPORTED, fmt="py:percent")
    script.cells[-1].source += "\nprint('changed')"
    assert cell_summary(script) != cell_summary(read_notebook())


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec running this very interpreter, found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "jaxpost-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxpost test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return "jaxpost-test"


def outputs(nb, output_type: str) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o["output_type"] == output_type]


def test_notebook_runs_end_to_end_on_cpu(tmp_path, monkeypatch, kernel_name):
    out = tmp_path / "run"
    monkeypatch.setenv("JAXPOST_PRESET", "smoke")
    monkeypatch.setenv("JAXPOST_OUTPUT_DIR", str(out))
    monkeypatch.setenv("JAXPOST_MAX_STEPS", "1")
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("KAGGLE_USERNAME", "jaxpost-test-user")
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_SECRET)
    for name in ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)

    nb = read_notebook()
    nb.cells = [c for c in nb.cells if INSTALL_TAG not in c.metadata.get("tags", [])]
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    assert outputs(nb, "error") == []
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    stream = "".join(o["text"] for o in outputs(nb, "stream"))
    results = [o for kind in ("execute_result", "display_data") for o in outputs(nb, kind)]
    assert "jaxpost quick test" in stream
    assert "A baker makes 23 muffins and sells 8" in stream and "answer:" in stream
    assert any("image/png" in o["data"] for o in results), "no plot in the outputs"
    assert (out / "training_curves.png").is_file()
    assert "jaxpost LoRA export" in stream and str(out / "export") in stream
    assert "already holds step 1" in stream  # the step-by-step run found the checkpoint
    assert "local CPU x1" in stream and "preset cpu" in stream
    shown = " ".join(str(o["data"].get("text/plain", "")) for o in results)
    assert "HF_TOKEN=set (environment)" in shown and "KAGGLE_KEY=set (environment)" in shown

    executed = nbformat.writes(nb)
    for secret in (HF_SECRET, KAGGLE_SECRET):
        assert secret not in executed
        for path in out.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
