"""jaxpost.install, the notebook's install cell: the pip command each runtime gets, when the
runtime must restart, and the cell being the module's code with pyproject.toml's URL.

pip never runs here: the command lists are checked, and :func:`install` gets a stand-in
for the pip process. The runtimes are described by the probes the module reads (the
environment, device files, ``nvidia-smi`` on ``PATH``), as those machines expose them.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from jaxpost import install
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo" / "train_colab.ipynb"
MODULE = REPO / "src" / "jaxpost" / "install.py"
REPOSITORY = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
PIP = [sys.executable, "-m", "pip", "install", "-q"]


def fake_glob(*paths: str):
    """``glob.glob`` over a machine that has exactly these paths."""
    return lambda pattern: fnmatch.filter(paths, pattern)


def which_nvidia_smi(path: str | None):
    return lambda program: path if program == "nvidia-smi" else None


COLAB = {"COLAB_RELEASE_TAG": "release-colab_20251201-060048_RC00"}
KAGGLE = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}
# name: (environment, device files, nvidia-smi, accelerator, extra)
RUNTIMES = {
    "colab_tpu_v2_8": ({**COLAB, "COLAB_GPU": "0"},
                       ("/dev/accel0", "/dev/accel1", "/dev/accel2", "/dev/accel3"),
                       None, "tpu", "[tpu]"),
    "colab_tpu_v5e1": ({**COLAB, "COLAB_GPU": "0", "TPU_ACCELERATOR_TYPE": "v5litepod-1"},
                       ("/dev/vfio/0", "/dev/vfio/vfio"), None, "tpu", "[tpu]"),
    "kaggle_tpu_v5e8": ({**KAGGLE, "TPU_ACCELERATOR_TYPE": "v5litepod-8"},
                        tuple(f"/dev/vfio/{i}" for i in range(8)) + ("/dev/vfio/vfio",),
                        None, "tpu", "[tpu]"),
    "colab_gpu_t4": ({**COLAB, "COLAB_GPU": "1"}, ("/dev/nvidia0", "/dev/nvidiactl"),
                     "/usr/bin/nvidia-smi", "gpu", "[cuda12]"),
    "kaggle_gpu_t4x2": (KAGGLE, ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"),
                        "/usr/bin/nvidia-smi", "gpu", "[cuda12]"),
    "colab_cpu": ({**COLAB, "COLAB_GPU": "0"}, (), None, "cpu", ""),
    # VFIO's control node and an Intel NPU (/dev/accel/accel0) are not TPUs.
    "cpu_laptop": ({"HOME": "/home/me", "PATH": "/usr/bin"},
                   ("/dev/vfio/vfio", "/dev/accel/accel0", "/dev/null"), None, "cpu", ""),
}


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_each_runtime_gets_the_extra_for_its_accelerator_from_the_repository(runtime):
    environ, paths, nvidia_smi, accelerator, extra = RUNTIMES[runtime]
    probes = dict(glob_paths=fake_glob(*paths), which=which_nvidia_smi(nvidia_smi))
    assert install.detect_accelerator(environ, **probes) == accelerator
    command = install.pip_command(accelerator, glob_paths=probes["glob_paths"])
    assert command == PIP + [f"jaxpost{extra} @ git+{REPOSITORY}"]
    requirement = Requirement(command[-1])  # what pip parses (PEP 508)
    assert (requirement.name, requirement.extras, requirement.url) == (
        "jaxpost", {extra.strip("[]")} - {""}, f"git+{REPOSITORY}")


@pytest.mark.parametrize("environ", [{"TPU_ACCELERATOR_TYPE": "v2-8"},
                                     {"COLAB_TPU_ADDR": "10.0.0.2:8470"},
                                     {"TPU_NAME": "local"}])
def test_a_tpu_variable_alone_means_a_tpu(environ):
    assert install.detect_accelerator(environ, fake_glob(), which_nvidia_smi(None)) == "tpu"
    assert install.detect_accelerator({k: "" for k in environ}, fake_glob(),
                                      which_nvidia_smi(None)) == "cpu"


def test_each_gpu_probe_alone_means_a_gpu():
    none = dict(glob_paths=fake_glob(), which=which_nvidia_smi(None))
    assert install.detect_accelerator({}, **none) == "cpu"
    assert install.detect_accelerator({"COLAB_GPU": "1"}, **none) == "gpu"
    assert install.detect_accelerator({"COLAB_GPU": ""}, **none) == "cpu"
    assert install.detect_accelerator(
        {}, fake_glob(), which_nvidia_smi("/opt/bin/nvidia-smi")) == "gpu"
    assert install.detect_accelerator(
        {}, fake_glob("/dev/nvidia0"), which_nvidia_smi(None)) == "gpu"
    assert install.detect_accelerator(
        {}, fake_glob("/dev/nvidiactl"), which_nvidia_smi(None)) == "cpu"


def test_a_tpu_wins_over_gpu_signs():
    assert install.detect_accelerator({"COLAB_GPU": "1"}, fake_glob("/dev/accel0"),
                                      which_nvidia_smi("/usr/bin/nvidia-smi")) == "tpu"


def test_an_explicit_wheel_path_is_installed_with_the_extra(tmp_path, monkeypatch):
    wheel = tmp_path / "dist" / "jaxpost-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    assert install.pip_command("gpu", str(wheel)) == (
        PIP + [f"jaxpost[cuda12] @ {wheel.as_uri()}"])
    monkeypatch.chdir(tmp_path)  # a relative path is made absolute: pip needs a file URL
    assert install.pip_command("cpu", "dist/jaxpost-0.1.0-py3-none-any.whl") == (
        PIP + [f"jaxpost @ {wheel.as_uri()}"])
    assert install.pip_command("tpu", str(tmp_path)) == (  # a source directory
        PIP + [f"jaxpost[tpu] @ {tmp_path.as_uri()}"])


def test_a_missing_local_source_fails_before_pip(tmp_path):
    with pytest.raises(ValueError, match="JAXPOST_INSTALL_SOURCE=.*no such file"):
        install.pip_command("tpu", str(tmp_path / "jaxpost-0.1.0-py3-none-any.whl"))


def test_a_url_source_replaces_the_repository():
    fork = "git+https://example.org/someone/jaxpost-fork@v0.1.0"
    assert install.pip_command("tpu", fork) == PIP + [f"jaxpost[tpu] @ {fork}"]
    wheel = "https://example.org/jaxpost-0.1.0-py3-none-any.whl"
    assert install.pip_command("cpu", wheel) == PIP + [f"jaxpost @ {wheel}"]


def test_an_unknown_accelerator_is_refused():
    with pytest.raises(ValueError, match="'rocm'"):
        install.pip_command("rocm")


def test_the_repository_and_the_extras_are_pyprojects():
    assert install.REPOSITORY == REPOSITORY
    assert REPOSITORY.startswith("https://")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {e for e in install.EXTRAS.values() if e} <= extras.keys()


def test_restart_after_importing_jax_or_jaxpost():
    assert install.restart_reasons(["os", "json.decoder"], {}, {}) == []
    assert install.restart_reasons(["jax._src.core", "jaxpost"], {}, {}) == [
        "jax was imported before the install", "jaxpost was imported before the install"]


def test_restart_when_a_loaded_package_changed_version():
    loaded = {"jax": "0.7.2", "numpy": "2.0.2", "six": "1.16.0"}
    installed = {"jax": "0.10.2", "numpy": "2.0.2", "six": None}
    assert install.restart_reasons(["numpy", "six"], loaded, installed) == [
        "jax 0.7.2 is loaded and the install made it now 0.10.2",
        "six 1.16.0 is loaded and the install made it now uninstalled"]
    assert install.restart_reasons(["numpy"], loaded, loaded) == []


def test_the_message_says_restart_or_ready():
    assert "ready" in install.readiness_message([])
    assert "restart" not in install.readiness_message([])
    message = install.readiness_message(["jax was imported before the install"])
    assert "restart the runtime" in message and "jax was imported before the install" in message
    assert "ready" not in message


def test_versions_come_from_the_installed_metadata():
    pytest_version = importlib.metadata.version("pytest")
    assert install.loaded_distributions(["pytest", "_pytest.python", "json"]) == {
        "pytest": pytest_version}
    assert install.installed_versions(["pytest", "jaxpost-no-such-distribution"]) == {
        "pytest": pytest_version, "jaxpost-no-such-distribution": None}


def test_install_runs_pip_and_says_whether_to_restart(tmp_path, capsys):
    commands = []

    def pip(command):  # the pip process, which the test does not run
        commands.append(command)
        return 0

    wheel = tmp_path / "jaxpost-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    gpu = dict(glob_paths=fake_glob(str(wheel)), which=which_nvidia_smi("/usr/bin/nvidia-smi"))
    environ = {"JAXPOST_INSTALL_SOURCE": str(wheel)}
    assert install.install(environ, **gpu, modules=["os", "json"], run=pip) == []
    assert commands == [PIP + [f"jaxpost[cuda12] @ {wheel.as_uri()}"]]
    out = capsys.readouterr().out
    assert "GPU runtime" in out and "ready" in out

    assert install.install({}, **gpu, modules=["os", "jax.numpy"], run=pip) == [
        "jax was imported before the install"]
    assert commands[-1] == PIP + [f"jaxpost[cuda12] @ git+{REPOSITORY}"]
    assert "restart the runtime" in capsys.readouterr().out


def test_a_failed_pip_raises():
    with pytest.raises(RuntimeError, match="pip exited with status 1"):
        install.install({}, fake_glob(), which_nvidia_smi(None), modules=[],
                        run=lambda command: 1)


def test_run_streaming_prints_the_output_and_returns_the_status(capsys):
    status = install.run_streaming(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
                               "sys.exit(3)"])
    assert status == 3
    assert capsys.readouterr().out.splitlines() == ["out", "err"]


def install_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells
             if c.cell_type == "code" and "install" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0]


def test_the_notebook_install_cell_is_the_module():
    assert install_cell().source == MODULE.read_text().rstrip("\n"), (
        "the notebook's install cell differs from src/jaxpost/install.py; regenerate it: "
        "python demo/sync_notebook.py")


def test_the_install_cell_needs_only_the_standard_library():
    tree = ast.parse(install_cell().source)
    imported = {alias.name.partition(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.partition(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names
    # A notebook runs a cell as __main__, so the cell ends by installing.
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last) == (
        "if __name__ == '__main__':\n    install()")


def test_the_install_cell_computes_the_same_commands_without_jaxpost():
    namespace = {"__name__": "install_cell"}  # not __main__: define, do not install
    exec(compile(install_cell().source, "install_cell", "exec"), namespace)
    environ, paths, nvidia_smi, accelerator, _ = RUNTIMES["kaggle_tpu_v5e8"]
    found = namespace["detect_accelerator"](environ, fake_glob(*paths),
                                            which_nvidia_smi(nvidia_smi))
    assert found == accelerator
    assert namespace["pip_command"](found) == PIP + [f"jaxpost[tpu] @ git+{REPOSITORY}"]


def test_sync_writes_the_module_into_the_cell_and_the_export(tmp_path):
    sys.path.insert(0, str(REPO / "demo"))
    try:
        import sync_notebook
    finally:
        sys.path.remove(str(REPO / "demo"))
    import jupytext

    notebook, exported = tmp_path / "nb.ipynb", tmp_path / "nb.py"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "install" in c.metadata.get("tags", []))
    cell.source = "%pip install jaxpost"
    nbformat.write(nb, notebook)
    sync_notebook.sync(notebook, exported)
    synced = nbformat.read(notebook, as_version=4)
    assert [c.source for c in synced.cells] == [
        c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells]
    assert [c.source.strip() for c in jupytext.read(exported).cells] == [
        c.source.strip() for c in synced.cells]
