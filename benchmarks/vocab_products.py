"""The update's vocabulary products on this machine, two formulations side by side.

For Gemma 3 270M's shapes (262,144 x 640 tied embedding, float32), times the forward
and gradient of the chunked completion log-probabilities for the benchmark's 512
completion positions (8 chunks of 64), the part of a GRPO update that is two
vocabulary-sized products per chunk. The probabilities-times-embedding product is
formed either as one einsum contracting over the vocabulary, or as
:func:`jaxpost.tunix_ext.logps.expected_embedding` forms it on CPU (two halves of the
vocabulary as a batch dimension). Runs alternate between the two, so that both see the
same machine load, and the script prints each one's median, minimum and every run.

    python benchmarks/vocab_products.py [--runs 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxpost.tunix_ext import logps

VOCAB, EMBED, POSITIONS, CHUNK = 262_144, 640, 512, 64


def chunked_grad_fn(expected_embedding):
    """A jitted ``(embedding, hidden, targets) -> (sum of log-probs, d/d hidden)`` with the
    given probabilities-times-embedding product."""
    original = logps.expected_embedding
    logps.expected_embedding = expected_embedding
    try:
        def loss(embedding, hidden, targets):
            logps, _ = jax.lax.map(
                lambda a: logps._chunk_logps(embedding, a[0], a[1], 0.9),
                (hidden.reshape(-1, CHUNK, EMBED), targets.reshape(-1, CHUNK)))
            return logps.sum()

        fn = jax.jit(jax.value_and_grad(loss, argnums=1))
        args = inputs()
        jax.block_until_ready(fn(*args))  # traced and compiled while the product is set
        return fn
    finally:
        logps.expected_embedding = original


def inputs():
    k = jax.random.split(jax.random.key(0), 3)
    embedding = jax.random.normal(k[0], (VOCAB, EMBED)) * 0.05
    hidden = jax.random.normal(k[1], (POSITIONS, EMBED))
    targets = jax.random.randint(k[2], (POSITIONS,), 0, VOCAB)
    return embedding, hidden, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="timed runs of each formulation")
    args = ap.parse_args()

    def einsum(probs, embedding):
        return jnp.einsum("vc,vd->cd", probs, embedding, preferred_element_type=jnp.float32)

    fns = {"einsum over the vocabulary": chunked_grad_fn(einsum),
           "expected_embedding (halves)": chunked_grad_fn(logps.expected_embedding)}
    data = inputs()
    (_, g_a), (_, g_b) = (fn(*data) for fn in fns.values())
    diff = float(jnp.abs(g_a - g_b).max() / jnp.abs(g_a).max())
    seconds = {name: [] for name in fns}
    for i in range(args.runs):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*data))
            seconds[name].append(time.perf_counter() - start)

    print(f"\n=== vocabulary products: {POSITIONS} positions in chunks of {CHUNK}, "
          f"vocabulary {VOCAB}, embed {EMBED}, forward + gradient, {jax.default_backend()} ===")
    print(f"largest gradient difference between the two: {diff:.1e} of the largest value")
    for name, runs in seconds.items():
        print(f"{name:30} median {statistics.median(runs):.2f} s, min {min(runs):.2f} s "
              f"(runs: {' '.join(f'{x:.2f}' for x in runs)})")


if __name__ == "__main__":
    main()
