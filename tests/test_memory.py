"""The allocator helpers: freed heap memory goes back to the system, arenas are limited."""

from __future__ import annotations

import os
import sys

import pytest

from jaxpost.runtime.memory import limit_malloc_arenas, release_free_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_memory_returns_freed_heap_pages():
    import numpy as np

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    # 2,000 blocks of 100 KB come from the heap (below glibc's mmap threshold); the last
    # one stays alive, so freeing the others leaves the free space below the heap's top,
    # where glibc does not return it by itself.
    blocks = [np.ones(100 * 1024, dtype=np.uint8) for _ in range(2000)]
    pin = blocks.pop()
    before = resident_mb()
    del blocks
    assert resident_mb() > before - 50  # still held by the allocator
    assert release_free_memory()
    assert resident_mb() < before - 150
    del pin


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_arena_limit_is_set_unless_the_environment_sets_one():
    assert limit_malloc_arenas(environ={})
    assert not limit_malloc_arenas(environ={"MALLOC_ARENA_MAX": "4"})


def test_compiled_ahead_compiles_once_per_shape():
    import jax
    import jax.numpy as jnp

    from jaxpost.runtime.memory import compiled_ahead

    traced = []

    @jax.jit
    def double(x):
        traced.append(x.shape)
        return 2 * x

    cache = {}
    a, b = jnp.arange(3.0), jnp.arange(4.0)
    assert float(compiled_ahead(double, cache, a)(a)[2]) == 4.0
    assert float(compiled_ahead(double, cache, a + 1)(a + 1)[2]) == 6.0
    assert compiled_ahead(double, cache, b)(b).shape == (4,)
    assert traced == [(3,), (4,)] and len(cache) == 2
