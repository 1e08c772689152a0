"""Embedded model: conversion time, cached load time, greedy decode speed, peak RSS.

    python benchmarks/load_and_generate.py            # uses a new, empty cache
    python benchmarks/load_and_generate.py --cached   # uses $JAXPOST_CACHE as it is
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cached", action="store_true", help="do not measure the first conversion")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not args.cached:
        os.environ["JAXPOST_CACHE"] = tempfile.mkdtemp(prefix="jaxpost-cache-")

    from jaxpost.models.loading import embedded_model_dir, load_model
    from jaxpost.sampling import generate, make_sampler

    if not args.cached:
        t = time.time()
        embedded_model_dir(show_progress=False)
        print(f"first load (GGUF conversion):  {time.time() - t:.1f} s")
    t = time.time()
    loaded = load_model("embedded:gemma3-270m", show_progress=False)
    print(f"cached load:                   {time.time() - t:.1f} s")
    prompt = "Question: What is 2 + 3?\nAnswer:"
    for batch in (1, 8):
        prompts = [prompt] * batch
        sampler = make_sampler(loaded.model, loaded, cache_size=32 + args.new_tokens)
        kwargs = dict(max_new_tokens=args.new_tokens, max_prompt_length=32, sampler=sampler)
        t = time.time()
        generate(loaded, prompts, **kwargs)
        first = time.time() - t
        t = time.time()
        generate(loaded, prompts, **kwargs)
        dt = time.time() - t
        print(f"greedy decode, batch {batch}:       {batch * args.new_tokens / dt:.1f} tokens/s "
              f"({dt:.1f} s for {args.new_tokens} new tokens; first call with compile "
              f"{first:.1f} s)")
    print(f"peak RSS:                      {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
