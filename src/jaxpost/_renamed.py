"""The modules that moved into subpackages, importable by their old names for one release.

``import jaxpost.hub`` gives the module :mod:`jaxpost.models.hub` itself (so a name set on
one is set on the other) and warns once, with a ``DeprecationWarning`` naming the new
module. ``jaxpost.models``, ``jaxpost.data`` and ``jaxpost.rewards`` became packages
that still offer the old modules' public names (see their ``__init__``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

RENAMED = {
    "jaxpost.cache": "jaxpost.runtime.cache",
    "jaxpost.memory": "jaxpost.runtime.memory",
    "jaxpost.mesh": "jaxpost.runtime.mesh",
    "jaxpost.platform": "jaxpost.runtime.platform",
    "jaxpost.credentials": "jaxpost.runtime.credentials",
    "jaxpost.atomic": "jaxpost.runtime.atomic",
    "jaxpost.model_types": "jaxpost.models.types",
    "jaxpost.model_families": "jaxpost.models.families",
    "jaxpost.hub": "jaxpost.models.hub",
    "jaxpost.gguf_import": "jaxpost.models.gguf",
    "jaxpost.lora": "jaxpost.models.lora",
    "jaxpost.critic": "jaxpost.models.critic",
    "jaxpost.jsonl": "jaxpost.data.jsonl",
    "jaxpost.prompts": "jaxpost.data.prompts",
    "jaxpost.demonstrations": "jaxpost.data.demonstrations",
    "jaxpost.preferences": "jaxpost.data.preferences",
    "jaxpost.answers": "jaxpost.rewards.answers",
    "jaxpost.rubrics": "jaxpost.rewards.rubrics",
    "jaxpost.judges": "jaxpost.rewards.judges",
    "jaxpost.judge_common": "jaxpost.rewards.judge_common",
    "jaxpost.judge_model": "jaxpost.rewards.judge_model",
    "jaxpost.judge_api": "jaxpost.rewards.judge_api",
}


class _RenamedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module that now holds its code."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in RENAMED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = RENAMED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old name "
                      "goes in the next release)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module it returned is already imported


def install() -> None:
    """Lets the old module names import (once per process)."""
    if not any(isinstance(f, _RenamedModules) for f in sys.meta_path):
        sys.meta_path.append(_RenamedModules())
