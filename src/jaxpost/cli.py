"""The ``jaxpost`` command line.

Each command imports the modules it runs inside its own function, so that ``jaxpost
--help`` and a mistyped option answer at once, without starting JAX
(``tests/test_config.py::test_the_config_and_the_cli_help_import_no_jax``).
"""

from __future__ import annotations

import argparse
import sys


def _config_from_args(args: argparse.Namespace):
    from jaxpost.config import apply_overrides, get_preset, load_yaml

    base = get_preset(args.preset)
    config = load_yaml(args.config, base=base) if args.config else base
    return apply_overrides(config, args.set or [])


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxpost.colab_pipeline import run_full_pipeline

    run_full_pipeline(_config_from_args(args))
    return 0


def _run_config(run_dir: str):
    from jaxpost.config import load_run_config

    return load_run_config(run_dir)


def _cmd_export(args: argparse.Namespace) -> int:
    from jaxpost.export import export_run, hub_write_token, push_to_hub

    if args.push_to_hub:
        hub_write_token(args.push_to_hub)  # a bad repo id or no token fails before exporting
    out = export_run(args.run_dir, args.format, args.out, gguf_type=args.gguf_type)
    print(f"jaxpost: {args.format} export written to {out} (see its README.md)", flush=True)
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=not args.public)
        print(f"jaxpost: uploaded {out} to {url}", flush=True)
    return 0


def _cmd_quick_test(args: argparse.Namespace) -> int:
    from jaxpost.colab_pipeline import quick_test
    from jaxpost.export import export_checkpoint, load_lora_export
    from jaxpost.session import prepare_session

    config = _run_config(args.run_dir)
    session = prepare_session(config)
    session.lora_model = load_lora_export(export_checkpoint(config, run_dir=args.run_dir),
                                          session.loaded)
    quick_test(config, session, test_question=args.question)
    return 0


def _trained_config(args: argparse.Namespace):
    """The config.yaml of the adapters (``--lora``) or of the jaxpost export ``--model``
    names (a merged directory or a GGUF file in its export directory), else None: the run
    whose prompt format ``--chat`` reproduces."""
    from pathlib import Path

    from jaxpost.config import load_yaml
    from jaxpost.export import EXPORT_CONFIG, EXPORT_METRICS

    if args.lora:
        return load_yaml(str(Path(args.lora) / EXPORT_CONFIG))
    if args.model is None:
        return None
    path = Path(args.model.removeprefix("gguf:")).expanduser()
    directory = path.parent if args.model.startswith("gguf:") else path
    if (directory / EXPORT_CONFIG).is_file() and (directory / EXPORT_METRICS).is_file():
        return load_yaml(str(directory / EXPORT_CONFIG))
    return None


def _chat_prompts(args: argparse.Namespace, loaded, trained) -> list[str]:
    """``args.prompt`` as user turns: the run's prompt format and system prompt when the
    model or adapters carry one, unless ``--chat-template`` / ``--system-prompt`` say
    otherwise."""
    import dataclasses

    from jaxpost.data.prompts import PromptFormat, format_prompt, model_chat_template

    chat_template = args.chat_template
    if chat_template == "auto" and trained is not None:
        chat_template = trained.chat_template
    template = model_chat_template(loaded, chat_template)
    prompt_format = (PromptFormat(template) if trained is None
                     else PromptFormat.from_config(trained, template=template))
    if args.system_prompt is not None:
        prompt_format = dataclasses.replace(prompt_format, system_prompt=args.system_prompt)
    elif prompt_format.system_prompt:
        print("jaxpost generate: --chat uses the system prompt the model was trained with "
              "(--system-prompt '' leaves it out)", file=sys.stderr, flush=True)
    return [format_prompt(p, prompt_format) for p in args.prompt]


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxpost.models.loading import load_model
    from jaxpost.sampling import generate

    if not args.chat and (args.chat_template != "auto" or args.system_prompt is not None):
        raise ValueError("--chat-template and --system-prompt format a chat turn: add --chat")
    trained = _trained_config(args)
    source, dtype, seed = args.model, args.dtype, 0
    if args.lora and args.model is None:
        # The adapters only make sense on the base model they were trained on.
        source, dtype, seed = trained.model, trained.dtype, trained.seed
    loaded = load_model(source or "embedded:gemma3-270m", dtype=dtype, seed=seed)
    model = loaded.model
    if args.lora:
        from jaxpost.export import load_lora_export

        model = load_lora_export(args.lora, loaded)
    prompts = _chat_prompts(args, loaded, trained) if args.chat else args.prompt
    texts = generate(loaded, prompts, model=model, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed)
    for text in texts:
        print(text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from jaxpost.evaluate import compare, evaluate

    settings = dict(data=args.data, num_examples=args.num_examples, k=args.k,
                    num_samples=args.num_samples, temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    seed=args.seed, out=args.out)
    if args.compare is not None:
        result = compare(args.model, lora_a=args.lora, lora_b=args.compare, **settings)
    else:
        result = evaluate(args.model, lora=args.lora, **settings)
    print(result.table())
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from jaxpost.plots import plot_training_curves

    print(f"jaxpost: wrote {plot_training_curves(args.run_dir, args.out)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from jaxpost.config import apply_overrides, get_preset
    from jaxpost.plan import accelerator_presets, memory_plan, platform_for_preset, summary

    where = dict(devices=args.devices, memory_gib=args.memory_gib)
    if args.preset is None and args.config is None:
        plans = {}
        for name, platform in accelerator_presets():
            config = apply_overrides(get_preset(name), args.set or [])
            plans[name] = memory_plan(config, platform=args.platform or platform, **where)
        print(summary(plans))
        print("\njaxpost plan --preset NAME shows one preset's rows")
        return 0 if all(p.fits for p in plans.values()) else 1
    args.preset = args.preset or "default"
    plan = memory_plan(_config_from_args(args),
                       platform=args.platform or platform_for_preset(args.preset), **where)
    print(f"jaxpost plan: preset {args.preset}" + (f" with {args.config}" if args.config else "")
          + "".join(f" --set {s}" for s in args.set or []))
    print(plan.table())
    return 0 if plan.fits else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``jaxpost`` subcommand."""
    from jaxpost.config import PRESETS
    from jaxpost.data.prompts import CHAT_TEMPLATES

    parser = argparse.ArgumentParser(
        prog="jaxpost", description="JAX-native GRPO post-training for models that show their work.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="print a model's continuation of a prompt")
    g.add_argument("prompt", nargs="+", help="one or more prompts (BOS is added)")
    g.add_argument("--model", default=None,
                   help="model source: embedded:gemma3-270m (default), random:gemma3-tiny, a "
                        "local Hugging Face directory, hf:ORG/NAME or kaggle:HANDLE; with --lora, "
                        "default: the model the adapters were trained on")
    g.add_argument("--lora", default=None, help="a LoRA export directory (from jaxpost train/export)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user turn: in the prompt format and with the "
                        "system prompt the adapters (--lora) or the jaxpost export (--model) "
                        "were trained with, else the model family's template")
    g.add_argument("--chat-template", default="auto", choices=list(CHAT_TEMPLATES),
                   help="with --chat: the prompt format (default: as above)")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="with --chat: the system prompt ('' for none; default: the trained "
                        "run's, else none)")
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("train", help="train with GRPO (or DPO: --set algorithm=dpo), "
                                     "checkpoint, export and quick-test (resumes when "
                                     "output_dir holds a checkpoint)")
    t.add_argument("--preset", default="default",
                   help=f"named preset: {', '.join(PRESETS)}")
    t.add_argument("--config", default=None, help="a YAML file of config fields (over the preset)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set max_steps=20")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="export a run as LoRA adapters, PEFT adapters, a merged "
                                      "Hugging Face model or GGUF (optionally to the Hub)")
    e.add_argument("run_dir", help="the run's output_dir, or a LoRA export directory")
    e.add_argument("--format", default="lora", choices=["lora", "peft", "merged", "gguf"],
                   help="lora: jaxpost's adapters (default); peft: Hugging Face PEFT adapters; "
                        "merged: LoRA merged into a Hugging Face checkpoint; gguf: merged, for "
                        "llama.cpp / Ollama")
    e.add_argument("--out", default=None,
                   help="export directory; default one per format and type: RUN_DIR/export "
                        "(lora), RUN_DIR/export-peft, -merged, -gguf-f16, -gguf-q8_0 (beside "
                        "a LoRA export DIR: DIR-peft, ...). Only a previous export is replaced")
    e.add_argument("--gguf-type", default="f16", choices=["f16", "q8_0"],
                   help="GGUF tensor type (--format gguf)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the export to this Hugging Face repo (token: the HF_TOKEN secret)")
    e.add_argument("--public", action="store_true",
                   help="with --push-to-hub: create the repo public (default private)")
    e.set_defaults(func=_cmd_export)

    q = sub.add_parser("quick-test", help="answer one question with a run's trained adapters")
    q.add_argument("run_dir", help="the run's output_dir")
    q.add_argument("--question", default=None, help="default: the first held-out question")
    q.set_defaults(func=_cmd_quick_test)

    from jaxpost.config.choices import EVAL_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS

    v = sub.add_parser(
        "eval", help="score a model (optionally with LoRA adapters) on a dataset",
        description="Prints accuracy, format rate, partial credit, pass@k and completion "
                    "length; writes the summary to --out (JSON) and one line per example to "
                    "the same path with suffix .jsonl.")
    v.add_argument("--model", default=None,
                   help="base model source; default: the model the adapters were trained on, "
                        "else embedded:gemma3-270m")
    v.add_argument("--lora", default=None,
                   help="a LoRA export directory or a training run's output_dir (its latest "
                        "checkpoint); default: the base model alone")
    v.add_argument("--compare", default=None, metavar="PATH",
                   help="also evaluate PATH (export, run directory, or 'base') on the same "
                        "examples and print A (--lora, or base) | B (PATH) | delta")
    v.add_argument("--data", required=True,
                   help="dataset spec, e.g. gsm8k:test, gsm8k:PATH, reasoning-gym:TASK, "
                        "jsonl:PATH#question=COL&answer=COL")
    v.add_argument("--num-examples", type=int, required=True)
    v.add_argument("--k", type=int, default=1, help="the k of pass@k (default 1)")
    v.add_argument("--num-samples", type=int, default=None,
                   help="completions per example, >= k (default k)")
    v.add_argument("--temperature", type=float, default=None,
                   help="default 0 (greedy) for one sample, 0.8 for more")
    v.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"completion budget (default {DEFAULT_MAX_NEW_TOKENS})")
    v.add_argument("--batch-size", type=int, default=8, help="completions generated at once")
    v.add_argument("--seed", type=int, default=0, help="data order and sampling seed")
    v.add_argument("--out", default="eval_results.json",
                   help="JSON summary (default eval_results.json); the per-example JSONL goes "
                        "beside it with suffix .jsonl")
    v.set_defaults(func=_cmd_eval)

    from jaxpost.runtime.platform import PLATFORM_PRESETS

    m = sub.add_parser(
        "plan", help="estimate a run's memory per device from its config, loading no model",
        description="Prints the memory per device a run needs (weights, LoRA and AdamW, KV "
                    "cache, activations, log-prob chunks) against the device's memory, and "
                    "what to change when it does not fit. Without --preset or --config: one "
                    "line for each accelerator preset. Exits with 1 when a plan does not fit.")
    m.add_argument("--preset", default=None, help=f"named preset: {', '.join(PRESETS)}")
    m.add_argument("--config", default=None, help="a YAML file of config fields (over the preset)")
    m.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set max_new_tokens=512")
    m.add_argument("--platform", default=None, choices=list(PLATFORM_PRESETS),
                   help="plan for this platform (default: the one the preset is sized for, "
                        "else cpu)")
    m.add_argument("--devices", type=int, default=None, help="devices (default: the platform's)")
    m.add_argument("--memory-gib", type=float, default=None,
                   help="memory per device in GiB (default: the platform's)")
    m.set_defaults(func=_cmd_plan)

    p = sub.add_parser("plot", help="draw a run's reward (total and per function), KL, loss "
                                    "and completion length as a PNG")
    p.add_argument("run_dir", help="the run's output_dir (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/training_curves.png)")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxpost`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        from jaxpost.runtime.credentials import redact

        # Errors from hub clients can quote a request; never let a token through.
        print(f"jaxpost {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
