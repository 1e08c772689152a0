"""GRPO step speed and memory on this machine.

Workload (the reference figures in the README use it): Gemma 3 270M (embedded), LoRA
rank 8, 2 prompts x 4 generations x 64 new tokens per step, float32, on the default
reasoning-gym task. Prints seconds per step after compilation, rollout and training
tokens/s and peak RSS.

    python benchmarks/grpo_step.py [--steps 4] [--preset default] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

from jaxpost.config import apply_overrides, get_preset


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps (the first compiles)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from jaxpost.sampling import generate
    from jaxpost.session import prepare_session
    from jaxpost.train import train_grpo

    base = get_preset(args.preset)
    if args.preset == "default":
        base = dataclasses.replace(base, lora_rank=8, batch_size=2, num_generations=4,
                                   max_new_tokens=64, dtype="float32")
    out = tempfile.mkdtemp(prefix="jaxpost-bench-")
    config = apply_overrides(dataclasses.replace(base, output_dir=out, max_steps=args.steps,
                                                 save_interval_steps=10**6), args.set)
    t = time.time()
    session = prepare_session(config)
    load_s = time.time() - t

    # Rollout alone, at the training shape: batch_size x G prompts, max_new_tokens each.
    prompts = [str(p) for p in next(iter(session.train_dataset))["prompts"]]
    prompts = [p for p in prompts for _ in range(config.num_generations)]
    kwargs = dict(model=session.lora_model, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                  max_prompt_length=config.max_prompt_length)
    from jaxpost.sampling import make_sampler

    sampler = make_sampler(session.lora_model, session.loaded,
                           config.max_prompt_length + config.max_new_tokens)
    generate(session.loaded, prompts, sampler=sampler, **kwargs)  # compile
    t = time.time()
    generate(session.loaded, prompts, sampler=sampler, seed=1, **kwargs)
    rollout_s = time.time() - t
    rollout_tokens = len(prompts) * config.max_new_tokens

    state = train_grpo(config, session)
    times = [h["step_seconds"] for h in state.history if "step_seconds" in h]
    if len(times) < 2:
        raise SystemExit("need --steps >= 2 to separate compilation from steady steps")
    # Tunix overlaps the next rollout with the current update, so individual intervals
    # are uneven: average everything after the first (compiling) step.
    step_s = sum(times[1:]) / len(times[1:])
    train_tokens = len(prompts) * (config.max_prompt_length + config.max_new_tokens)
    print("\n=== jaxpost GRPO step benchmark ===")
    print(f"workload: {config.model} {config.dtype}, LoRA r={config.lora_rank}, "
          f"{config.batch_size} prompts x {config.num_generations} generations x "
          f"{config.max_new_tokens} new tokens, prompt length {config.max_prompt_length}")
    print(f"session ready (load + LoRA):  {load_s:.1f} s")
    print(f"first step (with compile):    {times[0]:.1f} s")
    print(f"seconds per step (steady):    {step_s:.1f} s   (steps: "
          + ", ".join(f"{x:.1f}" for x in times) + ")")
    print(f"rollout alone:                {rollout_s:.1f} s = {rollout_tokens / rollout_s:.0f} "
          f"generated tokens/s")
    print(f"training tokens/s (step):     {train_tokens / step_s:.0f} "
          f"(prompt + completion tokens through rollout, reference and update)")
    print(f"peak RSS:                     {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
