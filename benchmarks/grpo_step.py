"""GRPO step speed and memory on this machine.

Workload (the reference figures in the README use it): Gemma 3 270M (embedded), LoRA
rank 8, 2 prompts x 4 generations x 64 new tokens per step, float32, on the default
reasoning-gym task. Prints seconds per step after compilation, rollout and training
tokens/s, peak RSS, and how fast the machine is at the time (a matrix product's
GFLOP/s and a copy's GB/s), since the same code's figures vary between days.

With --compare-trl it then runs Hugging Face TRL's GRPOTrainer (PyTorch, CPU) on the
same weights (the loaded model exported as a Hugging Face directory), the same training
rows in the same order, the same rewards and the same GRPO, sampling and optimizer
settings, in a process of its own (benchmarks/trl_grpo.py, which imports torch), and
prints both sides' seconds per step, tokens/s and peak RSS with the ratios jaxpost/TRL.
It needs `pip install torch transformers peft trl`.

    python benchmarks/grpo_step.py [--steps 4] [--preset default] [--set key=value ...]
                                   [--compare-trl]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxpost.config import apply_overrides, get_preset


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def check_trl_available() -> None:
    """Fails before any model loads when the TRL side cannot run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from trl_grpo import INSTALL_HINT, missing_packages

    missing = missing_packages()
    if missing:
        raise SystemExit(f"--compare-trl needs {', '.join(missing)}: {INSTALL_HINT}")
    try:
        import jaxpost.hf_export  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"--compare-trl needs jaxpost.hf_export to write the model for "
                         f"transformers ({e})") from e


def trl_workload(config, session, tmp: Path, steps: int) -> dict:
    """Everything the TRL process needs, as JSON-ready values; writes the model under tmp.

    The rows are the batches jaxpost trained on, in its order; the prompt ids are
    jaxpost's tokenization of each prompt, which the TRL side checks against its own.
    The LoRA targets are the Hugging Face modules holding jaxpost's adapters, mapped as
    the PEFT export maps them.
    """
    from flax import nnx

    from jaxpost.config import to_dict
    from jaxpost.export import lora_arrays
    from jaxpost.hf_export import peft_target_modules, peft_tensors, write_hf_model
    from jaxpost.models.loading import count_params

    loaded = session.loaded
    hf_dir = write_hf_model(loaded, tmp / "model")
    rows = []
    for batch in session.train_dataset:
        n = len(batch["prompts"])
        rows += [{k: v[i].item() for k, v in batch.items()} for i in range(n)]
    cfg = loaded.model_config
    targets = peft_target_modules(peft_tensors(lora_arrays(session.lora_model), cfg),
                                  cfg.num_layers)
    return {
        "config": to_dict(config),
        "steps": steps,
        "hf_dir": str(hf_dir),
        "output_dir": str(tmp / "trl-output"),
        "rows": rows,
        "prompt_ids": [[int(t) for t in loaded.tokenizer.encode(row["prompts"])]
                       for row in rows],
        "target_modules": targets,
        "jaxpost_trainable_params": count_params(session.lora_model, nnx.LoRAParam),
    }


def run_trl(workload: dict, tmp: Path) -> dict:
    """Runs benchmarks/trl_grpo.py in a child process and returns its measurements."""
    workload_path, result_path = tmp / "workload.json", tmp / "trl-result.json"
    workload_path.write_text(json.dumps(workload))
    print("\n=== TRL GRPOTrainer on the same workload (own process, imports torch) ===",
          flush=True)
    worker = Path(__file__).with_name("trl_grpo.py")
    # The model is a local directory: nothing to fetch, and no telemetry thread.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, str(worker), str(workload_path), str(result_path)],
                          env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the TRL run failed (exit status {done.returncode}); "
                         "its output is above")
    return json.loads(result_path.read_text())


class PhaseClock:
    """Times each GRPO step from the start of its rollout to the start of the next.

    Within the block, Tunix's ``RLCluster`` calls are timed: ``generate`` (the rollout),
    ``get_ref_per_token_logps`` (the reference pass) and ``update_actor`` (the update).
    A step runs from one rollout's start to the next's (the last to the end of its
    update), so everything a step does is counted once: the per-step figures add up to
    the run's wall time after the first rollout started.
    """

    PHASES = ("generate", "get_ref_per_token_logps", "update_actor")

    def __init__(self):
        self.starts = {name: [] for name in self.PHASES}
        self.seconds = {name: [] for name in self.PHASES}
        self._originals = {}

    def __enter__(self):
        import jax
        from tunix.rl import rl_cluster

        for name in self.PHASES:
            original = self._originals[name] = getattr(rl_cluster.RLCluster, name)

            def timed(cluster, *a, _original=original, _name=name, **k):
                start = time.time()
                out = _original(cluster, *a, **k)
                jax.block_until_ready(out)
                self.starts[_name].append(start)
                self.seconds[_name].append(time.time() - start)
                return out

            setattr(rl_cluster.RLCluster, name, timed)
        return self

    def __exit__(self, *exc):
        from tunix.rl import rl_cluster

        for name, original in self._originals.items():
            setattr(rl_cluster.RLCluster, name, original)

    def step_seconds(self) -> list[float]:
        starts = self.starts["generate"]
        last_end = self.starts["update_actor"][-1] + self.seconds["update_actor"][-1]
        return [b - a for a, b in zip(starts, starts[1:] + [last_end])]

    def phase_means(self) -> dict[str, float]:
        """Mean seconds of each phase over the steps after the first."""
        return {name: sum(v[1:]) / len(v[1:]) for name, v in self.seconds.items() if len(v) > 1}


def machine_speed() -> tuple[float, float]:
    """This machine's matrix-product GFLOP/s and copy GB/s now, medians of 7 runs each.

    The same code's step time varies by 15-20% between machines and days; these two
    figures, printed beside it, say which kind of day a run had.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    big = jnp.ones((64 << 20,), jnp.float32)  # 256 MB
    matmul = jax.jit(lambda x: x @ x)
    # Reads and writes the whole buffer once, in place (a new buffer would add page faults).
    bump = jax.jit(lambda x: x + 1, donate_argnums=0)

    def median_seconds(f, x):
        times = []
        for _ in range(8):  # the first compiles
            t = time.perf_counter()
            y = f(x).block_until_ready()
            times.append(time.perf_counter() - t)
            x = y if f is bump else x
        return float(np.median(times[1:]))

    return (2 * n**3 / median_seconds(matmul, a) / 1e9,
            2 * big.nbytes / median_seconds(bump, big) / 1e9)


def _steady(times: list[float]) -> float:
    return sum(times[1:]) / len(times[1:])


def print_comparison(config, jaxpost: dict, trl: dict, workload: dict, steps: int) -> None:
    """The side-by-side block, with every setting needed to reproduce it."""
    if len(trl["step_seconds"]) < 2:
        raise SystemExit(f"TRL timed {len(trl['step_seconds'])} steps; need at least 2")
    c, s = config, trl["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in trl["versions"].items())
    train_tokens = c.batch_size * c.num_generations * (c.max_prompt_length + c.max_new_tokens)
    trl_rollout_s = _steady(trl["rollout_seconds"])
    rows = [
        ("seconds per step (steady)", _steady(jaxpost["step_seconds"]),
         _steady(trl["step_seconds"]), "s"),
        ("first step", jaxpost["step_seconds"][0], trl["step_seconds"][0], "s"),
        ("rollout (TRL: inside its steps)", jaxpost["rollout_seconds"], trl_rollout_s, "s"),
        ("generated tokens/s (rollout)", jaxpost["rollout_tokens"] / jaxpost["rollout_seconds"],
         jaxpost["rollout_tokens"] / trl_rollout_s, ""),
        ("training tokens/s (step)", train_tokens / _steady(jaxpost["step_seconds"]),
         train_tokens / _steady(trl["step_seconds"]), ""),
        ("peak RSS", jaxpost["peak_rss_gb"], trl["peak_rss_gb"], "GB"),
    ]
    print("\n=== jaxpost vs TRL: GRPO step on CPU ===")
    print(f"TRL side: {versions}; CPU, {trl['torch_threads']} torch threads, attention "
          f"{trl['attn_implementation']}; its own process (imports torch"
          f"{', and jax' if trl['jax_imported'] else ', not jax'}), so each peak RSS is "
          "that process's own")
    print(f"same weights: {c.model} written as a Hugging Face directory ({c.dtype}); "
          f"same {steps} steps of {c.batch_size} prompts x {c.num_generations} generations "
          f"from {c.dataset}")
    print(f"settings: G={c.num_generations} mu={c.num_iterations} beta={c.beta} "
          f"epsilon={c.epsilon} temperature={c.temperature} top_k={c.top_k} top_p={c.top_p} "
          f"max_new_tokens={c.max_new_tokens} (TRL max_completion_length), prompts left-padded "
          f"to {c.max_prompt_length} (TRL pad_to_multiple_of), lr={c.learning_rate:g} "
          f"warmup {c.warmup_steps} then cosine, AdamW b1={c.b1} b2={c.b2} "
          f"weight_decay={c.weight_decay}, max_grad_norm={c.max_grad_norm}, seed={c.seed}")
    print(f"TRL-only settings: loss_type={s['loss_type']} (Tunix sequence-mean-token-mean), "
          f"scale_rewards={s['scale_rewards']}, gradient_checkpointing="
          f"{s['gradient_checkpointing']}, per_device_train_batch_size="
          f"{s['per_device_train_batch_size']} completions, gradient_accumulation_steps=1, "
          f"no evaluation, no saving, report_to=none, eos ids {trl['eos_token_ids']}")
    print(f"LoRA r={c.lora_rank} alpha={c.lora_alpha} on {workload['target_modules']}: "
          f"jaxpost {workload['jaxpost_trainable_params'] / 1e6:.2f}M trainable params, "
          f"PEFT {trl['trainable_params'] / 1e6:.2f}M (PEFT gives k_proj and v_proj an A "
          "matrix each; qwix's kv_einsum shares one)")
    print(f"rewards: {', '.join(c.reward_functions)} (jaxpost's functions on both sides)")
    padded = -(-c.max_new_tokens // c.max_prompt_length) * c.max_prompt_length
    if padded != c.max_new_tokens:
        print(f"note: pad_to_multiple_of={c.max_prompt_length} also pads TRL's completions, "
              f"to {padded} tokens instead of {c.max_new_tokens}: TRL trains on longer rows")
    print("TRL steps: " + ", ".join(f"{x:.1f}" for x in trl["step_seconds"])
          + " s; mean completion length per step: "
          + ", ".join(f"{x:.0f}" for x in trl["completion_mean_length"])
          + "; rollout inside each step: "
          + ", ".join(f"{x:.1f} s ({n} decode steps)"
                      for x, n in zip(trl["rollout_seconds"], trl["rollout_decode_steps"]))
          + f" of at most {c.max_new_tokens} (both samplers stop once every sequence has "
          "ended; generated tokens/s counts max_new_tokens per sequence on both sides, and "
          "TRL's rollout is the mean after its first step)")
    print(f"{'':30} {'jaxpost':>10} {'TRL':>10} {'jaxpost/TRL':>12}")
    for name, ours, theirs, unit in rows:
        print(f"{name:30} {ours:>7.1f} {unit:<2} {theirs:>7.1f} {unit:<2} {ours / theirs:>12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps (the first compiles)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compare-trl", action="store_true",
                    help="also run TRL's GRPOTrainer on the same workload and compare")
    args = ap.parse_args()
    if args.compare_trl:
        check_trl_available()

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

    with PhaseClock() as clock:
        state = train_grpo(config, session)
    # Read before the separate rollout measurement below, which builds a sampler of its own.
    jaxpost_rss = peak_rss_gb()
    if len(clock.starts["generate"]) < 2:
        raise SystemExit("need --steps >= 2 to separate compilation from steady steps")
    times = clock.step_seconds()
    step_s = sum(times[1:]) / len(times[1:])
    train_tokens = config.batch_size * config.num_generations * (
        config.max_prompt_length + config.max_new_tokens)

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
    gflops, copy_gbs = machine_speed()

    print("\n=== jaxpost GRPO step benchmark ===")
    print(f"workload: {config.model} {config.dtype}, LoRA r={config.lora_rank}, "
          f"{config.batch_size} prompts x {config.num_generations} generations x "
          f"{config.max_new_tokens} new tokens, prompt length {config.max_prompt_length}")
    print(f"session ready (load + LoRA):  {load_s:.1f} s")
    print(f"first step (with compile):    {times[0]:.1f} s")
    print(f"seconds per step (steady):    {step_s:.1f} s   (steps: "
          + ", ".join(f"{x:.1f}" for x in times) + "; each from its rollout's start)")
    phases = clock.phase_means()
    print("  of which (mean after step 1): " + ", ".join(
        f"{label} {phases[name]:.1f} s" for name, label in
        (("generate", "rollout"), ("get_ref_per_token_logps", "reference"),
         ("update_actor", "update")) if name in phases))
    print(f"rollout alone:                {rollout_s:.1f} s = {rollout_tokens / rollout_s:.0f} "
          f"generated tokens/s")
    print(f"training tokens/s (step):     {train_tokens / step_s:.0f} "
          f"(prompt + completion tokens through rollout, reference and update)")
    print(f"peak RSS (load and training): {jaxpost_rss:.2f} GB")
    print(f"machine now:                  {gflops:.0f} GFLOP/s (2048 x 2048 float32 product), "
          f"{copy_gbs:.1f} GB/s (256 MB read and written)")
    if not args.compare_trl:
        return
    jaxpost = {"step_seconds": times, "rollout_seconds": rollout_s,
               "rollout_tokens": rollout_tokens, "peak_rss_gb": jaxpost_rss}
    with tempfile.TemporaryDirectory(prefix="jaxpost-bench-trl-") as tmp:
        workload = trl_workload(config, session, Path(tmp), args.steps)
        # jaxpost's peak RSS was read above, before the export; its arrays are dropped
        # so that the idle parent holds as little memory as it can while TRL runs.
        del session, state, sampler, kwargs
        gc.collect()
        trl = run_trl(workload, Path(tmp))
    print_comparison(config, jaxpost, trl, workload, args.steps)


if __name__ == "__main__":
    main()
