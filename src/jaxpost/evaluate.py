"""Evaluation: accuracy, format compliance, partial credit and pass@k of a model on a dataset.

    exported checkpoint (or run directory) -> evaluation report

:func:`evaluate` scores one model (a base model, optionally with trained LoRA adapters)
on the first ``num_examples`` examples of a dataset spec; :func:`compare` scores two
(base vs trained, or two checkpoints) on the same examples with the same seeds and
prints them side by side. Both check their arguments, the dataset and the adapter
paths before loading a model, and load a shared base model once.

Prompts are formatted as in training: with the ``config.yaml`` of the run or export
given as ``lora`` (template, system prompt, tags). The base model of a comparison uses
the prompt settings of the other side, so both answer the same prompts.

Metrics (``jaxpost.eval_metrics``, means over examples): ``accuracy``, ``format_rate``,
``partial_credit``, ``pass@k``, ``mean_completion_tokens`` and ``truncated_rate``; the
reports and their files are ``jaxpost.eval_report``'s, re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from jaxpost.checkpoints import final_stage_dir, newest_readable_step
from jaxpost.config import DEFAULT_SYSTEM_PROMPT, load_run_config, load_yaml
from jaxpost.config.choices import EVAL_MAX_NEW_TOKENS
from jaxpost.data.datasets import load_examples, parse_dataset_spec
from jaxpost.data.prompts import PromptFormat, format_prompt, resolve_chat_template
from jaxpost.eval_metrics import aggregate, pass_at_k, score_completions
from jaxpost.eval_report import Comparison, EvalReport, comparison_table, examples_path
from jaxpost.export import (ADAPTER_FILE, EXPORT_CONFIG, EXPORT_METRICS, checkpoint_lora_arrays,
                            load_lora_export, set_lora_arrays)
from jaxpost.models.loading import load_model
from jaxpost.models.lora import apply_lora
from jaxpost.rundir import CONFIG_FILE, RunDir
from jaxpost.runtime.cache import enable_compilation_cache
from jaxpost.sampling import generate, make_sampler

__all__ = [
    "BASE",
    "Comparison",
    "DEFAULT_MAX_NEW_TOKENS",
    "EvalReport",
    "aggregate",
    "compare",
    "comparison_table",
    "evaluate",
    "examples_path",
    "pass_at_k",
    "score_completions",
]

# GSM8K solutions of a 270M-1B model take 100-200 tokens; 256 lets most of them finish.
DEFAULT_MAX_NEW_TOKENS = EVAL_MAX_NEW_TOKENS
DEFAULT_MODEL = "embedded:gemma3-270m"
# Sampling temperature when more than one sample per example is drawn (pass@k, k > 1).
DEFAULT_SAMPLE_TEMPERATURE = 0.8
# The word that stands for "the base model, no adapters" where a LoRA path is expected.
BASE = "base"


# ---------------------------------------------------------------------------
# Adapters: export directories and run directories


@dataclasses.dataclass(frozen=True)
class _Adapters:
    """A resolved ``lora`` argument: where the adapters are and the config they carry."""

    path: Path
    kind: str  # "export" or "run"
    config: Any  # ColabTrainingConfig
    step: int | None


def _resolve_adapters(lora: str | os.PathLike | None) -> _Adapters | None:
    """Checks a ``lora`` path without loading a model; None (or "base") for no adapters."""
    if lora is None or str(lora) == BASE:
        return None
    path = Path(lora).expanduser()
    if not path.is_dir():
        raise ValueError(f"lora={str(lora)!r} is not a directory: give a LoRA export directory "
                         f"(holding {ADAPTER_FILE}) or a training run's output_dir")
    if (path / ADAPTER_FILE).is_file():
        if not (path / EXPORT_CONFIG).is_file():
            raise ValueError(f"lora={str(lora)!r} has {ADAPTER_FILE} but no {EXPORT_CONFIG}: "
                             "re-export it with jaxpost export RUN_DIR")
        step = None
        metrics = path / EXPORT_METRICS
        if metrics.is_file():
            step = json.loads(metrics.read_text()).get("step")
        return _Adapters(path, "export", load_yaml(str(path / EXPORT_CONFIG)), step)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"lora={str(lora)!r} holds neither {ADAPTER_FILE} (a LoRA export) nor "
                         f"{CONFIG_FILE} (a training run's output_dir)")
    run = RunDir(path)
    ckpt_dir = final_stage_dir(run.checkpoint_dir)
    step = newest_readable_step(ckpt_dir)
    if step is None:
        raise ValueError(f"lora={str(lora)!r} is a run directory without a finished checkpoint "
                         f"that can be read in {ckpt_dir}: train first (jaxpost train --set "
                         f"output_dir={path})")
    return _Adapters(path, "run", load_run_config(path), step)


def _adapted_model(loaded, adapters: _Adapters):
    """The base model of ``loaded`` with ``adapters`` applied (base weights shared)."""
    if adapters.kind == "export":
        return load_lora_export(adapters.path, loaded)
    config = adapters.config
    ckpt_dir = final_stage_dir(RunDir(adapters.path).checkpoint_dir)
    _, arrays = checkpoint_lora_arrays(ckpt_dir, adapters.step)
    model = apply_lora(loaded.model, loaded.mesh, rank=config.lora_rank, alpha=config.lora_alpha,
                       target_modules=config.lora_target_modules)
    set_lora_arrays(model, arrays)
    return model


# ---------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class _Options:
    data: str
    num_examples: int
    k: int
    num_samples: int
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    batch_size: int
    seed: int


def _check_options(*, data, num_examples, k, num_samples, temperature, top_k, top_p,
                   max_new_tokens, batch_size, seed, out) -> _Options:
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"data={data!r} is invalid: give a dataset spec such as "
                         "gsm8k:test, reasoning-gym:TASK or jsonl:PATH")
    parse_dataset_spec(data)
    for name, value in (("num_examples", num_examples), ("k", k),
                        ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    num_samples = k if num_samples is None else num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < k:
        raise ValueError(f"num_samples={num_samples!r} is invalid: pass@k needs at least k={k} "
                         "samples per example")
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else DEFAULT_SAMPLE_TEMPERATURE
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0 (0 = greedy)")
    if temperature == 0 and num_samples > 1:
        raise ValueError(f"temperature=0 with num_samples={num_samples} is invalid: greedy "
                         "decoding gives identical samples; set temperature > 0 for pass@k "
                         "with k > 1")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: must be None or >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: must be None or in (0, 1]")
    if out is not None:
        examples_path(out)
    return _Options(data, num_examples, k, num_samples, float(temperature), top_k, top_p,
                    max_new_tokens, batch_size, int(seed))


def _prompt_format(model_source: str, own: _Adapters | None, other: _Adapters | None):
    """The prompt format of one side: its adapters' run's, else the other side's, else
    the default system prompt under ``model_source``'s template."""
    for adapters in (own, other):
        if adapters is not None:
            return PromptFormat.from_config(adapters.config)
    return PromptFormat(resolve_chat_template(model_source), DEFAULT_SYSTEM_PROMPT)


def _base_key(model_source: str | None, adapters: Sequence[_Adapters | None]):
    """(model source, dtype, seed) of the base model; the adapters' own base by default."""
    trained = [a.config for a in adapters if a is not None]
    if model_source is None:
        model_source = trained[0].model if trained else DEFAULT_MODEL
    for config in trained:
        if config.model != model_source:
            print(f"jaxpost eval: warning: adapters trained on {config.model!r} are applied to "
                  f"{model_source!r}", file=sys.stderr, flush=True)
    dtype = trained[0].dtype if trained else "float32"
    # A random: model's weights come from its seed; the adapters need the same weights.
    seed = trained[0].seed if trained else 0
    return model_source, dtype, seed


def _run(loaded, model, label: str, adapters: _Adapters | None, prompt_format,
         examples: list[dict], opts: _Options) -> EvalReport:
    """Generates and scores every example with ``model``; prints a progress line per batch."""
    t0 = time.time()
    prompts = [format_prompt(e["question"], prompt_format) for e in examples]
    n = opts.num_samples
    rows = [p for p in prompts for _ in range(n)]  # [examples * n]
    # One prompt length and one batch shape for every batch: nothing recompiles.
    prompt_len = max(len(loaded.tokenizer.encode(p)) for p in prompts) + 1
    sampler = make_sampler(model, loaded, cache_size=prompt_len + opts.max_new_tokens)
    size = opts.batch_size
    texts: list[str] = []
    batches = math.ceil(len(rows) / size)
    for b in range(batches):
        batch = rows[b * size:(b + 1) * size]
        padded = batch + [batch[-1]] * (size - len(batch))
        out = generate(loaded, padded, max_new_tokens=opts.max_new_tokens,
                       temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                       seed=opts.seed + b, max_prompt_length=prompt_len, sampler=sampler)
        texts.extend(out[:len(batch)])
        done = min(len(texts) // n, len(examples))
        print(f"jaxpost eval [{label}]: batch {b + 1}/{batches}, {done}/{len(examples)} "
              f"examples, {time.time() - t0:.0f}s", flush=True)

    records = []
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        record = score_completions(example, texts[i * n:(i + 1) * n],
                                   reasoning_tag=prompt_format.reasoning_tag,
                                   answer_tag=prompt_format.answer_tag,
                                   max_new_tokens=opts.max_new_tokens, k=opts.k,
                                   tokenizer=loaded.tokenizer, prompt=prompt)
        records.append({"index": i, "prompt": prompt, **record})
    settings = {
        "model": loaded.source,
        "lora": None if adapters is None else str(adapters.path),
        "lora_kind": None if adapters is None else adapters.kind,
        "checkpoint_step": None if adapters is None else adapters.step,
        **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)},
        "num_examples": len(examples),
        "chat_template": prompt_format.template,
        "system_prompt": prompt_format.system,
        "answer_reward": sorted({r["answer_reward"] for r in records}),
    }
    return EvalReport(label, settings, aggregate(records, opts.k), records, time.time() - t0)


def _load_examples(opts: _Options) -> list[dict]:
    examples = load_examples(opts.data, seed=opts.seed, max_examples=opts.num_examples)
    if len(examples) < opts.num_examples:
        print(f"jaxpost eval: {opts.data} has {len(examples)} examples, fewer than "
              f"num_examples={opts.num_examples}; evaluating all of them", flush=True)
    return examples[:opts.num_examples]


def _label(adapters: _Adapters | None) -> str:
    if adapters is None:
        return BASE
    step = f" @{adapters.step}" if adapters.step is not None else ""
    return f"{adapters.path}{step}"


def evaluate(
    model_source: str | None = None,
    *,
    lora: str | os.PathLike | None = None,
    data: str,
    num_examples: int = 100,
    k: int = 1,
    num_samples: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    loaded=None,
) -> EvalReport:
    """Evaluates a model, with or without trained LoRA adapters, on a dataset.

    Args:
      model_source: the base model (``jaxpost.models.loading.load_model`` forms); default: the
        model the adapters were trained on, else ``embedded:gemma3-270m``.
      lora: a LoRA export directory, or a training run's ``output_dir`` (its latest
        finished checkpoint); None or ``"base"`` for the base model alone. Its
        ``config.yaml`` gives the prompt settings, dtype and seed of the base.
      data: a dataset spec (``jaxpost.data.datasets.DATASET_FORMS``), e.g. ``gsm8k:test``.
      num_examples: the first this many examples of the seeded order.
      k: the k of pass@k.
      num_samples: completions per example, n >= k (default k).
      temperature: default 0 (greedy) for one sample, 0.8 for more; must be > 0 for
        more than one sample.
      top_k, top_p: sampling filters (ignored when greedy).
      max_new_tokens: completion budget per sample.
      batch_size: completions generated at once.
      seed: data order (and reasoning-gym generation) and sampling seed; batch ``b``
        samples with ``seed + b``.
      out: write the JSON summary here and the per-example JSONL beside it
        (:func:`examples_path`); None writes nothing.
      loaded: an already loaded base model to use instead of loading ``model_source``.

    Returns:
      The report (its ``table()`` prints the metrics).

    Raises:
      ValueError: a bad argument, dataset spec or adapter path (before any model is
        loaded), or adapters that do not fit the model.
      FileNotFoundError: a dataset file is missing (before any model is loaded).
    """
    opts = _check_options(data=data, num_examples=num_examples, k=k, num_samples=num_samples,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                          out=out)
    adapters = _resolve_adapters(lora)
    examples = _load_examples(opts)
    source, dtype, model_seed = _base_key(model_source, [adapters])
    prompt_format = _prompt_format(source, adapters, None)
    if loaded is None:
        loaded = _load(source, dtype, model_seed)
    model = loaded.model if adapters is None else _adapted_model(loaded, adapters)
    report = _run(loaded, model, _label(adapters), adapters, prompt_format, examples, opts)
    if out is not None:
        summary, jsonl = report.write(out)
        print(f"jaxpost eval: wrote {summary} and {jsonl}", flush=True)
    return report


def compare(
    model_source: str | None = None,
    *,
    lora_a: str | os.PathLike | None = None,
    lora_b: str | os.PathLike | None,
    data: str,
    num_examples: int = 100,
    k: int = 1,
    num_samples: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    loaded=None,
) -> Comparison:
    """Evaluates A and B on the same examples with the same seeds (see :func:`evaluate`).

    Args:
      lora_a, lora_b: each a LoRA export, a run directory, or None / ``"base"`` for the
        base model; typically A = base and B = trained.
      out: the JSON summary (both reports and the deltas) and, beside it, one JSONL
        line per example with both sides (:meth:`Comparison.write`).
      loaded: an already loaded base model (a notebook session's ``session.loaded``)
        used for both sides instead of loading one.
      The other arguments are those of :func:`evaluate`.

    A base model shared by both sides (same source, dtype and seed) is loaded once; a
    side without adapters uses the other side's prompt settings.

    Returns:
      The comparison; ``table()`` gives ``metric | A | B | delta``.
    """
    opts = _check_options(data=data, num_examples=num_examples, k=k, num_samples=num_samples,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                          out=out)
    sides = [_resolve_adapters(lora_a), _resolve_adapters(lora_b)]
    if sides[0] is None and sides[1] is None:
        raise ValueError("compare needs adapters on at least one side: lora_a and lora_b are "
                         "both the base model")
    examples = _load_examples(opts)
    keys = [_base_key(model_source, [s]) if s is not None else None for s in sides]
    shared = next(key for key in keys if key is not None)
    keys = [key or shared for key in keys]
    models: dict[tuple, Any] = {} if loaded is None else {key: loaded for key in keys}
    reports = []
    for i, (adapters, key) in enumerate(zip(sides, keys)):
        if key not in models:
            models.clear()  # free the other base before loading a second one
            models[key] = _load(*key)
        loaded = models[key]
        model = loaded.model if adapters is None else _adapted_model(loaded, adapters)
        prompt_format = _prompt_format(key[0], adapters, sides[1 - i])
        reports.append(_run(loaded, model, _label(adapters), adapters, prompt_format,
                            examples, opts))
    result = Comparison(*reports)
    if out is not None:
        summary, jsonl = result.write(out)
        print(f"jaxpost eval: wrote {summary} and {jsonl}", flush=True)
    return result


def _load(source: str, dtype: str, seed: int):
    enable_compilation_cache()
    return load_model(source, dtype=dtype, seed=seed)
