"""The package's modules import each other without a cycle, and each is short enough to
read in one sitting.

Every ``import`` counts, including those inside functions: a cycle hidden by a lazy
import is still two modules that cannot be read, tested or changed apart.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

import jaxpost
from jaxpost import _renamed

PACKAGE = Path(jaxpost.__file__).parent


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _packages_above(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code."""
    files = {_module_name(f, package): f for f in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, file in files.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from jaxpost.models import hub` imports the module jaxpost.models.hub.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files
                           else node.module for a in node.names]
            else:
                continue
            # Importing jaxpost.models.hub first runs the package jaxpost.models.
            targets += [parent for t in targets for parent in _packages_above(t)
                        if not name.startswith(parent + ".")]
            graph[name] |= {t for t in targets if t in files and t not in (name, "jaxpost")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_from_the_package():
    graph = import_graph()
    assert len(graph) > 30
    # jaxpost.models.loading imports jaxpost.models.hub as `from jaxpost.models import hub`.
    assert "jaxpost.models.hub" in graph["jaxpost.models.loading"]
    # jaxpost.data.datasets imports jaxpost.rewards.rubrics, which runs jaxpost.rewards.
    assert {"jaxpost.rewards.rubrics", "jaxpost.rewards"} <= graph["jaxpost.data.datasets"]
    # jaxpost.cli imports the commands' modules inside its functions only.
    assert "jaxpost.colab_pipeline" in graph["jaxpost.cli"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_MODULE_LINES = 500


def test_no_module_is_longer_than_the_limit():
    """A module over MAX_MODULE_LINES holds more than one concern: split it by concern."""
    lengths = {str(f.relative_to(PACKAGE.parent)): len(f.read_text(encoding="utf-8").splitlines())
               for f in PACKAGE.rglob("*.py")}
    assert len(lengths) > 30
    over = {path: n for path, n in sorted(lengths.items()) if n > MAX_MODULE_LINES}
    assert not over, (f"modules over {MAX_MODULE_LINES} lines: "
                      + ", ".join(f"{path} ({n})" for path, n in over.items()))


# Modules whose function-level imports one comment at their top explains.
EXPLAINED_IN_DOCSTRING = {"jaxpost.cli"}


def unexplained_lazy_imports(package: Path = PACKAGE) -> list[str]:
    """``"module:line"`` for each import inside a function with no comment saying why:
    on its line, or on the line above it or above the block of imports it is part of."""
    found = []
    for file in sorted(package.rglob("*.py")):
        module = _module_name(file, package)
        if module in EXPLAINED_IN_DOCSTRING:
            continue
        lines = file.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                above = node.lineno - 2
                while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                    above -= 1
                if "#" not in lines[node.lineno - 1] and not lines[above].strip().startswith("#"):
                    found.append(f"{module}:{node.lineno}")
    return found


def test_imports_inside_functions_say_why():
    """Imports sit at the top of a module, except a lazy one whose comment says why (a
    heavy or optional dependency, or a module read before JAX starts)."""
    found = unexplained_lazy_imports()
    assert not found, "move these imports to the top, or say why they wait: " + ", ".join(found)


def test_an_unexplained_lazy_import_is_found(tmp_path):
    package = tmp_path / "jaxpost"
    package.mkdir()
    (package / "m.py").write_text("import json\n\n\ndef f():\n    import yaml\n\n\n"
                                  "def g():\n    # heavy\n    import numpy\n    import scipy\n")
    assert unexplained_lazy_imports(package) == ["jaxpost.m:5"]


# The libraries whose use, and every patch of whose code, lives in jaxpost.tunix_ext.
WRAPPED_LIBRARIES = ("tunix", "qwix")


def wrapped_imports(package: Path = PACKAGE) -> list[str]:
    """``"module:line imports name"`` for each import of :data:`WRAPPED_LIBRARIES`
    anywhere in the code of a module outside ``jaxpost.tunix_ext``."""
    found = []
    for file in sorted(package.rglob("*.py")):
        module = _module_name(file, package)
        if module == "jaxpost.tunix_ext" or module.startswith("jaxpost.tunix_ext."):
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{module}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[0] in WRAPPED_LIBRARIES]
    return found


def test_wrapped_imports_are_found_inside_functions(tmp_path):
    package = tmp_path / "jaxpost"
    (package / "tunix_ext").mkdir(parents=True)
    (package / "tunix_ext" / "patch.py").write_text("from tunix.rl import rl_cluster\n")
    (package / "user.py").write_text("import json\n\n\ndef f():\n    import qwix\n"
                                     "    from tunix.sft import utils\n")
    assert wrapped_imports(package) == ["jaxpost.user:5 imports qwix",
                                        "jaxpost.user:6 imports tunix.sft"]


def test_only_tunix_ext_imports_tunix_and_qwix():
    found = wrapped_imports()
    assert not found, ("import these through jaxpost.tunix_ext, which holds every use of "
                       "Tunix and qwix: " + "; ".join(found))


@pytest.mark.parametrize("package", ["jaxpost.models", "jaxpost.data", "jaxpost.rewards"])
def test_a_packages_public_names_come_from_its_modules(package):
    module = importlib.import_module(package)
    assert len(dir(module)) > 10
    for name in dir(module):
        value = getattr(module, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__module__.startswith(package + "."), (name, value.__module__)
    with pytest.raises(AttributeError, match="has no attribute 'load_modle'"):
        module.load_modle  # noqa: B018


def test_the_package_level_name_is_the_modules_own():
    import jaxpost.models
    import jaxpost.models.loading
    import jaxpost.rewards
    import jaxpost.rewards.registry

    assert jaxpost.models.load_model is jaxpost.models.loading.load_model
    assert jaxpost.rewards.register_reward is jaxpost.rewards.registry.register_reward


def test_an_old_module_name_is_the_moved_module_and_warns():
    sys.modules.pop("jaxpost.hub", None)
    with pytest.warns(DeprecationWarning, match="jaxpost.hub moved to jaxpost.models.hub"):
        old = importlib.import_module("jaxpost.hub")
    assert old is importlib.import_module("jaxpost.models.hub")
    for old_name, new_name in _renamed.RENAMED.items():
        assert not (PACKAGE.parent / (old_name.replace(".", "/") + ".py")).exists(), old_name
        assert importlib.util.find_spec(new_name) is not None, new_name
