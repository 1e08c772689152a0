"""Held-out format rate and accuracy of the base model, after the SFT warm-up alone, and
after SFT + GRPO, on the same examples with the same seeds (greedy).

    python benchmarks/learning_curve.py                      # the default preset
    python benchmarks/learning_curve.py --set max_steps=16   # any config override
    python benchmarks/learning_curve.py --num-examples 48 --out /tmp/curve

It trains the warm-up alone in OUT/sft (``max_steps=0``), copies that run to
OUT/sft_grpo and continues it with GRPO there (the warm-up's final checkpoint is restored,
not trained again), then evaluates the three models on held-out examples: GSM8K's test
split for a GSM8K run, else the run's task drawn with ``seed + 1000``. A small task can
repeat training questions under another seed; the rows "unseen" count only the questions
that are not among the run's training examples. Format up with accuracy down would be
reward hacking: read the columns together.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path


def _row(name: str, metrics: dict, unseen: tuple[int, float] | None, seconds: float) -> str:
    count, accuracy = unseen if unseen is not None else (0, float("nan"))
    return (f"{name:<12} | {metrics['format_rate']:.3f}  | {metrics['accuracy']:.3f}    | "
            f"{count:>6} | {accuracy:.3f}           | "
            f"{metrics.get('mean_completion_tokens', float('nan')):>6.1f} | {seconds:>6.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), as for jaxpost train")
    ap.add_argument("--num-examples", type=int, default=48)
    ap.add_argument("--sft-from", default=None, metavar="DIR",
                    help="reuse the warm-up of an earlier curve's OUT/sft with the same SFT "
                         "settings instead of training it again (for GRPO settings)")
    ap.add_argument("--out", default=None, help="where the two runs go (default: a new "
                    "temporary directory)")
    args = ap.parse_args()

    from jaxpost.colab_pipeline import (
        HELD_OUT_SEED_OFFSET,
        held_out_spec,
        prepare_colab_session,
        train_grpo,
        train_sft,
    )
    from jaxpost.config import apply_overrides, get_preset
    from jaxpost.data.datasets import load_examples
    from jaxpost.evaluate import evaluate

    out = Path(args.out or tempfile.mkdtemp(prefix="jaxpost-curve-"))
    config = apply_overrides(get_preset(args.preset), args.set)
    if config.sft_steps == 0 or config.total_steps == 0:
        raise SystemExit("the curve needs both stages: sft_steps > 0 and max_steps > 0")
    sft_dir, full_dir = out / "sft", out / "sft_grpo"
    times = {}

    t = time.time()
    if args.sft_from:
        if sft_dir.exists():
            shutil.rmtree(sft_dir)
        shutil.copytree(args.sft_from, sft_dir)
    sft_config = dataclasses.replace(config, output_dir=str(sft_dir), max_steps=0)
    session = prepare_colab_session(sft_config)
    train_sft(sft_config, session)
    times["sft"] = time.time() - t
    del session
    if full_dir.exists():
        shutil.rmtree(full_dir)
    shutil.copytree(sft_dir, full_dir)
    t = time.time()
    full_config = dataclasses.replace(config, output_dir=str(full_dir))
    session = prepare_colab_session(full_config)
    train_sft(full_config, session)  # restores the copied warm-up's weights
    train_grpo(full_config, session)
    times["sft+grpo"] = times["sft"] + time.time() - t

    train_questions = {e["question"] for e in load_examples(
        config.dataset, seed=config.seed, max_examples=config.max_examples)}
    data = held_out_spec(config.dataset)
    seed = config.seed + HELD_OUT_SEED_OFFSET
    rows = []
    for name, lora in (("base", None), ("sft", sft_dir), ("sft+grpo", full_dir)):
        report = evaluate(config.model, lora=lora, data=data, num_examples=args.num_examples,
                          max_new_tokens=config.max_new_tokens, seed=seed,
                          loaded=session.loaded)
        unseen = [e for e in report.examples if e["question"] not in train_questions]
        acc = (sum(e["correct"][0] for e in unseen) / len(unseen)) if unseen else float("nan")
        rows.append(_row(name, report.metrics, (len(unseen), acc), times.get(name, 0.0)))
    print(f"\nheld-out: {args.num_examples} examples of {data} (seed {seed}), greedy; "
          f"preset {args.preset} {' '.join(args.set)}")
    print("model        | format | accuracy | unseen | accuracy (unseen) | tokens | train s")
    print("-------------+--------+----------+--------+-------------------+--------+--------")
    print("\n".join(rows))
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
