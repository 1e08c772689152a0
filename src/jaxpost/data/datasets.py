"""Datasets: spec string -> raw examples -> batched Grain datasets with prompts.

A dataset spec is `KIND[:ARG][#KEY=VALUE[&KEY=VALUE...]]`; options are separated
by `#` or `&`, and `#max=N` caps the number of examples. Valid forms are listed
in `DATASET_FORMS`.

Every example is a dict with str `question` and `answer` plus source columns:
  - reasoning-gym: `task` (the task name) and `entry` (the generated entry as
    JSON, which reasoning_gym's scorer needs);
  - gsm8k: `solution` (the worked solution before `####`);
  - jsonl: the row's other top-level columns;
  - rubric datasets (rubric-demo, rubric-jsonl, rar-medicine, rar-science,
    openrubrics): `rubric`, the criteria as JSON (see `jaxpost.rewards.rubrics`); `answer`
    is the reference answer, possibly empty.
`prepare_datasets` adds `prompts`, the formatted prompt that Tunix's GRPO
learner generates from.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

import grain
import numpy as np

from jaxpost.data.jsonl import read_jsonl
from jaxpost.data.prompts import format_prompt, resolve_chat_template
from jaxpost.rewards.rubrics import load_rubric_rows, policy_rubric

logger = logging.getLogger("jaxpost.data.datasets")

DATASET_FORMS = (
    "reasoning-gym:TASK[#OPTION=VALUE&...]  (OPTIONs are the task's config fields)",
    "gsm8k | gsm8k:train | gsm8k:test  (Hugging Face openai/gsm8k, config 'main')",
    "gsm8k:PATH  (local JSONL in GSM8K format)",
    "jsonl:PATH[#question=COLUMN&answer=COLUMN&reasoning=COLUMN]  (reasoning: the worked "
    "solutions an SFT warm-up learns from, see jaxpost.data.demonstrations)",
    "rubric-demo  (the example rubrics shipped with jaxpost)",
    "rubric-jsonl:PATH  (JSONL: question, optional reference_answer, rubric)",
    "rar-medicine | rar-science | openrubrics [:SPLIT or :LOCAL_FILE]  (Hugging Face "
    "ScaleAI/RaR-Medicine, ScaleAI/RaR-Science, OpenRubrics/OpenRubric-v2)",
    "any of these with #max=N to cap the number of examples",
)
DEFAULT_REASONING_GYM_SIZE = 512
GSM8K_HF_SPLITS = ("train", "test")

_GSM8K_FORMAT = (
    'one JSON object per line, {"question": "...", "answer": "worked solution\\n#### 42"}'
)
_JSONL_FORMAT = "one JSON object per line with a question column and an answer column"
# `reasoning` names the worked-solution column for jaxpost.data.demonstrations; loading keeps
# that column like any other, so the option changes nothing here.
_JSONL_COLUMN_OPTIONS = ("question", "answer", "reasoning")
RUBRIC_KINDS = ("rubric-demo", "rubric-jsonl", "rar-medicine", "rar-science", "openrubrics")
# Set by the loader from #max and the seed, never by task options.
_RESERVED_REASONING_GYM_OPTIONS = ("size", "seed")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec.

    Attributes:
      kind: "reasoning-gym", "gsm8k" or "jsonl".
      arg: the part after `KIND:` (task name, split or path), or None.
      max_examples: from `#max=N`, or None.
      options: the other `#KEY=VALUE` options. For reasoning-gym, values are
        converted to int, float or bool where they parse as one.
    """

    kind: str
    arg: str | None = None
    max_examples: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def _invalid_spec(spec: str, why: str) -> ValueError:
    forms = "\n  ".join(DATASET_FORMS)
    return ValueError(f"dataset spec {spec!r}: {why}. Valid forms:\n  {forms}")


def _convert_value(value: str) -> Any:
    """Option text -> int, float, bool, tuple (comma-separated: ``operators=+,-``) or str."""
    if "," in value:
        return tuple(_convert_value(v) for v in value.split(",") if v)
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parses `KIND[:ARG][#KEY=VALUE[&KEY=VALUE...]]` into a `DatasetSpec`.

    Raises:
      ValueError: unknown kind, missing or empty ARG, malformed or duplicate
        option, `max` not a positive int, or an option the kind does not take;
        the message lists the valid forms.
    """
    text = spec.strip()
    if not text:
        raise _invalid_spec(spec, "empty spec")
    head, _, option_text = text.partition("#")
    kind, has_arg, arg = head.partition(":")
    if has_arg and not arg:
        raise _invalid_spec(spec, f"nothing after '{kind}:'")

    options: dict[str, str] = {}
    for part in re.split(r"[#&]", option_text) if option_text else ():
        key, has_value, value = part.partition("=")
        if not key or not has_value:
            raise _invalid_spec(spec, f"option {part!r} is not KEY=VALUE")
        if key in options:
            raise _invalid_spec(spec, f"option {key!r} given twice")
        options[key] = value

    max_examples = None
    if "max" in options:
        raw = options.pop("max")
        if not raw.isdigit() or int(raw) < 1:
            raise _invalid_spec(spec, f"max={raw!r} is not a positive integer")
        max_examples = int(raw)

    if kind == "reasoning-gym":
        if not has_arg:
            raise _invalid_spec(spec, "reasoning-gym needs a task name")
        reserved = sorted(set(options) & set(_RESERVED_REASONING_GYM_OPTIONS))
        if reserved:
            raise _invalid_spec(
                spec, f"{reserved} are set from #max and the seed, not as options"
            )
        converted = {k: _convert_value(v) for k, v in options.items()}
        return DatasetSpec(kind, arg, max_examples, converted)
    if kind == "gsm8k":
        if options:
            raise _invalid_spec(spec, f"gsm8k takes no options besides max, got {sorted(options)}")
        return DatasetSpec(kind, arg or None, max_examples, {})
    if kind == "jsonl":
        if not has_arg:
            raise _invalid_spec(spec, "jsonl needs a file path")
        unknown = sorted(set(options) - set(_JSONL_COLUMN_OPTIONS))
        if unknown:
            raise _invalid_spec(
                spec, f"jsonl options are {_JSONL_COLUMN_OPTIONS} and max, got {unknown}"
            )
        return DatasetSpec(kind, arg, max_examples, options)
    if kind in RUBRIC_KINDS:
        if options:
            raise _invalid_spec(spec, f"{kind} takes no options besides max, got {sorted(options)}")
        if kind == "rubric-jsonl" and not has_arg:
            raise _invalid_spec(spec, "rubric-jsonl needs a file path")
        if kind == "rubric-demo" and has_arg:
            raise _invalid_spec(spec, "rubric-demo takes no argument")
        return DatasetSpec(kind, arg or None, max_examples, {})
    raise _invalid_spec(spec, f"unknown dataset kind {kind!r}")


def _question_answer(
    row: dict, question_col: str, answer_col: str
) -> tuple[str, str] | str:
    """(question, answer) as stripped str, or the reason the row is unusable."""
    question = row.get(question_col)
    answer = row.get(answer_col)
    if question is None:
        return f"missing {question_col!r}"
    if not isinstance(question, str):
        return f"non-string {question_col!r}"
    if not question.strip():
        return f"empty {question_col!r}"
    if answer is None:
        return f"missing {answer_col!r}"
    if not isinstance(answer, (str, int, float)):
        return f"non-scalar {answer_col!r}"
    answer = str(answer).strip()
    if not answer:
        return f"empty {answer_col!r}"
    return question.strip(), answer


def _gsm8k_examples(rows: Iterable[dict], skipped: collections.Counter) -> list[dict]:
    examples = []
    for row in rows:
        parsed = _question_answer(row, "question", "answer")
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        question, full_answer = parsed
        solution, has_marker, final = full_answer.rpartition("####")
        if not has_marker:
            skipped["no '####' in answer"] += 1
            continue
        final = final.strip().replace(",", "")
        if not final:
            skipped["empty answer after '####'"] += 1
            continue
        examples.append({"question": question, "answer": final, "solution": solution.strip()})
    return examples


def _hf_gsm8k_rows(split: str) -> list[dict]:
    import datasets  # heavy; only needed for the hub dataset

    return [dict(row) for row in datasets.load_dataset("openai/gsm8k", "main", split=split)]


def _jsonl_examples(
    rows: Iterable[dict], question_col: str, answer_col: str, skipped: collections.Counter
) -> list[dict]:
    examples = []
    for row in rows:
        parsed = _question_answer(row, question_col, answer_col)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        extra = {k: v for k, v in row.items() if k not in (question_col, answer_col)}
        examples.append({**extra, "question": parsed[0], "answer": parsed[1]})
    return examples


def _reasoning_gym_examples(
    task: str, options: dict[str, Any], size: int, seed: int, skipped: collections.Counter
) -> list[dict]:
    # reasoning-gym loads its hundred task generators on import: only for its datasets
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, DATASETS, n=5)
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(
            f"unknown reasoning-gym task {task!r}; {hint}available tasks include "
            f"{sorted(DATASETS)[:10]} ({len(DATASETS)} in all, see "
            "reasoning_gym.factory.DATASETS)"
        )
    config_cls = DATASETS[task][1]
    fields = {f.name for f in dataclasses.fields(config_cls)} - set(
        _RESERVED_REASONING_GYM_OPTIONS
    )
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"reasoning-gym task {task!r} has no options {unknown}; its options are "
            f"{sorted(fields)}"
        )
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **options)
    except AssertionError as e:  # reasoning_gym validates its configs with asserts
        raise ValueError(f"invalid options {options} for reasoning-gym task {task!r}: {e}") from e

    examples = []
    for entry in dataset:
        parsed = _question_answer(entry, "question", "answer")
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        examples.append(
            {
                "question": parsed[0],
                "answer": parsed[1],
                "task": task,
                # JSON turns tuples in the metadata into lists.
                "entry": json.dumps(entry, default=str),
            }
        )
    return examples


def load_examples(
    spec_or_str: DatasetSpec | str, *, seed: int, max_examples: int | None = None
) -> list[dict]:
    """Loads the examples of a dataset spec.

    Args:
      spec_or_str: a `DatasetSpec` or a spec string.
      seed: seeds reasoning-gym generation and the shuffle.
      max_examples: cap used when the spec has no `#max`; for reasoning-gym it
        is the number generated (default `DEFAULT_REASONING_GYM_SIZE`).

    Returns:
      Example dicts (see the module docstring), in a seeded shuffled order and
      capped at the max; the same for the same arguments. Malformed rows are
      skipped, with one warning giving the count per reason.

    Raises:
      FileNotFoundError: a local file is missing.
      ValueError: a bad spec, unknown reasoning-gym task or option, or no
        usable examples.
    """
    spec = parse_dataset_spec(spec_or_str) if isinstance(spec_or_str, str) else spec_or_str
    limit = spec.max_examples if spec.max_examples is not None else max_examples
    skipped: collections.Counter = collections.Counter()

    if spec.kind == "reasoning-gym":
        size = limit if limit is not None else DEFAULT_REASONING_GYM_SIZE
        examples = _reasoning_gym_examples(spec.arg, spec.options, size, seed, skipped)
    elif spec.kind == "gsm8k":
        split = spec.arg or "train"
        if split in GSM8K_HF_SPLITS:
            rows = _hf_gsm8k_rows(split)
        else:
            rows = read_jsonl(Path(split).expanduser(), _GSM8K_FORMAT, skipped)
        examples = _gsm8k_examples(rows, skipped)
    elif spec.kind == "jsonl":
        rows = read_jsonl(Path(spec.arg).expanduser(), _JSONL_FORMAT, skipped)
        examples = _jsonl_examples(
            rows,
            spec.options.get("question", "question"),
            spec.options.get("answer", "answer"),
            skipped,
        )
    elif spec.kind in RUBRIC_KINDS:
        examples = load_rubric_rows(spec.kind, spec.arg, skipped)
    else:
        raise ValueError(f"unknown dataset kind {spec.kind!r}; valid forms: {DATASET_FORMS}")

    name = _spec_name(spec)
    if skipped:
        total = len(examples) + sum(skipped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        message = f"{name}: skipped {sum(skipped.values())} of {total} rows ({reasons})"
        logger.warning(message)
        print(f"WARNING jaxpost.data.datasets: {message}")
    if not examples:
        raise ValueError(f"dataset {name} has no usable examples")

    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[:limit]]


def _spec_name(spec: DatasetSpec) -> str:
    return spec.kind if spec.arg is None else f"{spec.kind}:{spec.arg}"


def num_train_batches(config: Any) -> int:
    """Number of train batches the run consumes.

    Tunix trains each batch `num_iterations` times (mu in GRPO), one optimizer
    step each, and stops at `max_steps` optimizer steps; so `max_steps` needs
    ceil(max_steps / num_iterations) batches. Without `max_steps` the run is
    `num_batches` batches.
    """
    if config.max_steps is None:
        return config.num_batches
    return math.ceil(config.max_steps / config.num_iterations)


def _uniform_columns(items: list[dict]) -> list[dict]:
    """Items restricted to the columns every item has, with values that batch.

    Grain stacks each column into a numpy array, so every item needs the same
    keys and scalar values; lists, dicts and None become JSON strings.
    """
    common = set.intersection(*(set(item) for item in items))
    dropped = sorted(set().union(*items) - common)
    if dropped:
        logger.warning("columns missing from some examples are left out: %s", dropped)

    def scalar(value: Any) -> Any:
        return value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)

    return [{k: scalar(v) for k, v in item.items() if k in common} for item in items]


def prepare_datasets(config: Any) -> tuple[grain.MapDataset, grain.MapDataset | None]:
    """Builds the batched train and eval datasets for a config.

    Reads `config.dataset`, `max_examples` (used when the spec has no #max),
    `seed`, `eval_size`, `batch_size`, `max_steps`, `num_batches`,
    `num_iterations`, the prompt fields of `format_prompt`, and
    `rubric_in_prompt` (when true, each prompt lists its rubric's criteria).

    Returns:
      (train, eval). Each element is a dict of 1-D numpy arrays of length
      `batch_size` (# [batch]); string columns, `prompts` included, are numpy
      str arrays (dtype kind "U"), which Tunix repeats per generation with
      `np.repeat`. Train holds exactly `num_train_batches(config)` full batches,
      reshuffled each epoch. Eval is the first `eval_size` examples of the
      seeded order, batched with a smaller last batch, or None if eval_size is 0.

    Raises:
      ValueError: eval_size not below the number of examples, or fewer train
        examples than one batch.
    """
    examples = load_examples(config.dataset, seed=config.seed, max_examples=config.max_examples)
    if not 0 <= config.eval_size < len(examples):
        raise ValueError(
            f"eval_size={config.eval_size} must be >= 0 and less than the "
            f"{len(examples)} examples of {config.dataset!r}"
        )
    train_count = len(examples) - config.eval_size
    if train_count < config.batch_size:
        raise ValueError(
            f"{config.dataset!r} leaves {train_count} train examples after "
            f"eval_size={config.eval_size}, fewer than batch_size={config.batch_size}"
        )
    template = resolve_chat_template(config.model, config.chat_template)
    if any("prompts" in example for example in examples):
        logger.warning("the dataset's 'prompts' column is replaced by the formatted prompt")
    show_rubric = getattr(config, "rubric_in_prompt", False)
    if show_rubric and not all("rubric" in example for example in examples):
        raise ValueError(f"rubric_in_prompt=True needs a rubric dataset; {config.dataset!r} has "
                         "no 'rubric' column (set rubric_in_prompt=false or use a rubric dataset)")
    items = _uniform_columns(
        [
            {**example, "prompts": format_prompt(
                example["question"], config,
                policy_rubric(example["rubric"]) if show_rubric else None, template=template)}
            for example in examples
        ]
    )
    eval_items, train_items = items[: config.eval_size], items[config.eval_size :]

    train = (
        grain.MapDataset.source(train_items)
        .shuffle(seed=config.seed)
        .repeat()
        .batch(config.batch_size, drop_remainder=True)[: num_train_batches(config)]
    )
    evaluation = (
        grain.MapDataset.source(eval_items).batch(config.batch_size) if eval_items else None
    )
    return train, evaluation
