"""A package's public names, each imported from its module when first used.

``jaxpost.models``, ``jaxpost.data`` and ``jaxpost.rewards`` offer their main functions
at the package level (``jaxpost.rewards.register_reward``). They import them lazily, so
that importing one module of a package never imports its siblings: the package's
modules import each other by their full names, without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names live in its modules.

    ``exports`` maps each public name to the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
