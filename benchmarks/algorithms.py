"""GRPO and its relatives from the same start: seconds per step, peak RSS, held-out result.

    python benchmarks/algorithms.py                                # every algorithm
    python benchmarks/algorithms.py --algorithms grpo,dapo --set max_steps=4
    python benchmarks/algorithms.py --sft-from /tmp/curve/sft --out /tmp/algos

The workload is the default preset's (embedded Gemma 3 270M, LoRA r=8, an SFT warm-up
of 40 steps, then GRPO with 4 prompts x 4 generations x 64 tokens), set with ``--set``
as for ``jaxpost train``. The warm-up is trained once (or copied from ``--sft-from``, an
earlier run's OUT/sft with the same SFT settings) and every algorithm continues the same
copy with the same number of steps, each in a process of its own so that its peak RSS
is its own. Then each is evaluated, greedy, on the same held-out examples (the run's task
drawn with ``seed + 1000``, or GSM8K's test split): format rate and accuracy, to be read
together (format up with accuracy down would be reward hacking).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run in a child process: one algorithm's GRPO stage, then its peak RSS on stdout.
_CHILD = """
import json, resource, sys
from jaxpost.colab_pipeline import prepare_colab_session, train_grpo, train_sft
from jaxpost.config import from_dict
config = from_dict(json.loads(sys.argv[1]))
session = prepare_colab_session(config)
train_sft(config, session)  # restores the copied warm-up; trains nothing
state = train_grpo(config, session)
seconds = [h["step_seconds"] for h in state.history if "step_seconds" in h]
print("RESULT " + json.dumps({
    "seconds": seconds, "reward": [h.get("reward") for h in state.history],
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    # The GRPO family: each continues the warm-up with train_grpo (DPO trains on pairs).
    from jaxpost.config import RL_ALGORITHMS as ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), as for jaxpost train")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS),
                    help=f"comma-separated, from {', '.join(ALGORITHMS)}")
    ap.add_argument("--num-examples", type=int, default=48)
    ap.add_argument("--sft-from", default=None, metavar="DIR",
                    help="reuse an earlier run's warm-up (OUT/sft) instead of training it")
    ap.add_argument("--out", default=None, help="where the runs go (default: a new "
                    "temporary directory)")
    args = ap.parse_args()
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise SystemExit(f"unknown algorithms {unknown}: choose from {', '.join(ALGORITHMS)}")

    import dataclasses

    from jaxpost.colab_pipeline import (
        HELD_OUT_SEED_OFFSET,
        held_out_spec,
        prepare_colab_session,
        train_sft,
    )
    from jaxpost.config import apply_overrides, get_preset, to_dict
    from jaxpost.evaluate import evaluate
    from jaxpost.models.loading import load_model

    out = Path(args.out or tempfile.mkdtemp(prefix="jaxpost-algorithms-"))
    config = apply_overrides(get_preset(args.preset), args.set)
    if config.total_steps == 0:
        raise SystemExit("max_steps=0 trains no algorithm: set max_steps > 0")
    sft_dir = out / "sft"
    if args.sft_from:
        if sft_dir.exists():
            shutil.rmtree(sft_dir)
        shutil.copytree(args.sft_from, sft_dir)
    if config.sft_steps:
        sft_config = dataclasses.replace(config, output_dir=str(sft_dir), max_steps=0)
        train_sft(sft_config, prepare_colab_session(sft_config))

    results = {}
    for algorithm in algorithms:
        run_dir = out / algorithm
        if run_dir.exists():
            shutil.rmtree(run_dir)
        if sft_dir.exists():
            shutil.copytree(sft_dir, run_dir)
        run = dataclasses.replace(config, algorithm=algorithm, output_dir=str(run_dir))
        t = time.time()
        child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(to_dict(run))],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{algorithm} failed:\n{child.stderr[-4000:]}")
        line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
        results[algorithm] = json.loads(line.removeprefix("RESULT ")) | {
            "wall_s": time.time() - t}
        print(f"{algorithm}: trained in {results[algorithm]['wall_s']:.0f} s", flush=True)

    loaded = load_model(config.model, dtype=config.dtype, show_progress=False)
    data, seed = held_out_spec(config.dataset), config.seed + HELD_OUT_SEED_OFFSET
    print(f"\n{config.total_steps} GRPO steps from the same warm-up; held-out: "
          f"{args.num_examples} examples of {data} (seed {seed}), greedy; "
          f"preset {args.preset} {' '.join(args.set)}")
    print("algorithm | s/step (median) | peak RSS GB | format | accuracy")
    print("----------+-----------------+-------------+--------+---------")
    for algorithm, r in results.items():
        report = evaluate(config.model, lora=str(out / algorithm), data=data,
                          num_examples=args.num_examples, max_new_tokens=config.max_new_tokens,
                          seed=seed, loaded=loaded)
        seconds = sorted(r["seconds"])
        median = seconds[len(seconds) // 2] if seconds else float("nan")
        print(f"{algorithm:<9} | {median:>15.1f} | {r['peak_rss_gb']:>11.2f} | "
              f"{report.metrics['format_rate']:.3f}  | {report.metrics['accuracy']:.3f}",
              flush=True)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
