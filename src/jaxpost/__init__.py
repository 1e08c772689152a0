"""jaxpost: JAX-native RL post-training (GRPO) for language models that show their work."""

__version__ = "0.1.0"


def _share_malloc_arenas() -> None:
    # Set before JAX starts its thread pools: see jaxpost.runtime.memory.limit_malloc_arenas.
    from jaxpost.runtime.memory import limit_malloc_arenas

    limit_malloc_arenas()


_share_malloc_arenas()

# The modules that moved into subpackages keep their old names for one release.
from jaxpost import _renamed  # noqa: E402  (after the arenas: it imports nothing heavy)

_renamed.install()
