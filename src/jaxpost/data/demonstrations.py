"""Demonstrations for the SFT warm-up: questions paired with well-formed answers.

A pretrained model that is not instruction-tuned answers a chat turn by repeating it;
GRPO cannot reinforce a format the model never produces. A short supervised warm-up on
completions of the form ``<reasoning>R</reasoning>\\n<answer>A</answer>`` puts it within
reach. The reasoning R always comes from the data, never from a guess:

  - gsm8k: the worked solution before ``####``, calculator notes ``<<48/2=24>>`` removed;
  - jsonl: a worked-solution column (``#reasoning=COLUMN``, else ``reasoning`` or
    ``solution``);
  - reasoning-gym: a rationale built from the task's own metadata by a builder in
    :data:`jaxpost.data.rationales.RATIONALE_BUILDERS`, kept only when the task's
    verifier accepts its answer;
  - sft-jsonl: a user's file of question/completion pairs, used as written.

A demonstration whose reasoning or answer is empty, or whose completion is not one that
``jaxpost.rewards.builtin.format_exact`` scores 1.0, is skipped and counted in one warning.

This module imports neither JAX nor the data pipeline at import time: the config checks
``sft_data`` with :func:`check_sft_data_spec` whenever one is built.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxpost.rewards.answers import extract_answer
from jaxpost.data.jsonl import read_jsonl
from jaxpost.data.prompts import strip_end_marker
# evaluation_steps: re-exported, as the old module name jaxpost.demonstrations offered it.
from jaxpost.data.rationales import RATIONALE_BUILDERS, evaluation_steps  # noqa: F401

logger = logging.getLogger("jaxpost.data.demonstrations")

__all__ = [
    "RATIONALE_BUILDERS",
    "SFT_DATA_FORMS",
    "Demonstration",
    "check_sft_data_spec",
    "evaluation_steps",
    "load_demonstrations",
    "strip_calculator_notes",
]


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """One supervised example.

    Attributes:
      question: the question, as the prompt will show it.
      completion: ``<{reasoning_tag}>R</{reasoning_tag}>\\n<{answer_tag}>A</{answer_tag}>``,
        without an end-of-turn marker (the trainer appends the model's own).
      answer: the reference answer (for sft-jsonl, the text in the answer tag).
    """

    question: str
    completion: str
    answer: str


SFT_DATA_FORMS = (
    "auto  (the run's own dataset and seed: its worked solutions, or a rationale built "
    "from a reasoning-gym task's metadata)",
    "gsm8k | gsm8k:train | gsm8k:test | gsm8k:PATH  (GSM8K's worked solutions)",
    "jsonl:PATH[#question=COLUMN&answer=COLUMN&reasoning=COLUMN]  (reasoning from the "
    "named column, else a 'reasoning' or 'solution' column)",
    f"reasoning-gym:TASK[#OPTION=VALUE&...]  (TASK one of {', '.join(RATIONALE_BUILDERS)}: "
    "an exact step-by-step evaluation of the task's expression)",
    "sft-jsonl:PATH[#question=COLUMN&completion=COLUMN]  (your own question/completion "
    "pairs, each completion <reasoning>...</reasoning><answer>...</answer>)",
    "any form but auto with #max=N to cap the number of demonstrations",
)
_SFT_JSONL = "sft-jsonl"
_SFT_JSONL_OPTIONS = ("question", "completion")
_DATASET_KINDS = ("gsm8k", "jsonl", "reasoning-gym")
_REASONING_COLUMNS = ("reasoning", "solution")
_CALCULATOR_NOTE_RE = re.compile(r"<<[^<>\n]*>>")


def strip_calculator_notes(solution: str) -> str:
    """A GSM8K solution without its calculator notes, whitespace tidied.

    Removes every ``<<...>>``, collapses runs of spaces within a line and drops empty
    lines: "Natalia sold 48/2 = <<48/2=24>>24 clips" -> "Natalia sold 48/2 = 24 clips".
    """
    lines = (" ".join(line.split()) for line in _CALCULATOR_NOTE_RE.sub("", solution).splitlines())
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------
# Specs


def _invalid(spec: str, why: str) -> ValueError:
    forms = "\n  ".join(SFT_DATA_FORMS)
    return ValueError(f"sft_data {spec!r}: {why}. Valid forms:\n  {forms}")


def _no_builder(task: str) -> str:
    return (f"reasoning-gym task {task!r} has no rationale builder (tasks with one: "
            f"{', '.join(RATIONALE_BUILDERS)}), and demonstrations are never made up; use "
            "sft_data=sft-jsonl:PATH with worked answers of your own, or a dataset with "
            "worked solutions (gsm8k, jsonl:PATH#reasoning=COLUMN)")


def parse_file_spec(spec: str, kind: str, allowed: tuple[str, ...],
                    invalid: Callable[[str, str], ValueError]) -> tuple[str, dict[str, str],
                                                                        int | None]:
    """(path, column options, max) of a ``KIND:PATH[#KEY=VALUE&...]`` spec.

    Shared by ``sft-jsonl:`` here and ``preference-jsonl:`` (jaxpost.data.preferences).

    Args:
      kind: the prefix, e.g. ``"sft-jsonl"``. allowed: the option keys besides ``max``.
      invalid: builds the error for ``(spec, why)``.

    Raises:
      ValueError: no path, an option that is not KEY=VALUE, given twice or unknown, or a
        ``max`` that is not a positive integer.
    """
    head, _, option_text = spec.strip().partition("#")
    path = head[len(kind) + 1:] if head.startswith(f"{kind}:") else ""
    if not path:
        raise invalid(spec, f"{kind} needs a file path")
    options: dict[str, str] = {}
    for part in re.split(r"[#&]", option_text) if option_text else ():
        key, has_value, value = part.partition("=")
        if not key or not has_value or not value:
            raise invalid(spec, f"option {part!r} is not KEY=VALUE")
        if key in options:
            raise invalid(spec, f"option {key!r} given twice")
        if key not in (*allowed, "max"):
            raise invalid(spec, f"{kind} options are {allowed} and max, got {key!r}")
        options[key] = value
    raw_max = options.pop("max", None)
    if raw_max is not None and (not raw_max.isdigit() or int(raw_max) < 1):
        raise invalid(spec, f"max={raw_max!r} is not a positive integer")
    return path, options, None if raw_max is None else int(raw_max)


def _parse_sft_jsonl(spec: str) -> tuple[str, dict[str, str], int | None]:
    """(path, column options, max) of an ``sft-jsonl:PATH[#KEY=VALUE&...]`` spec."""
    return parse_file_spec(spec, _SFT_JSONL, _SFT_JSONL_OPTIONS, _invalid)


def _check_dataset_source(spec: str, label: str) -> Any:
    """The parsed dataset spec, if demonstrations can come from it."""
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.datasets import parse_dataset_spec

    kind = re.split(r"[:#]", spec.strip(), maxsplit=1)[0]
    if kind not in _DATASET_KINDS:
        # not at the top: the config and the CLI read this module; that one starts JAX
        from jaxpost.data.datasets import RUBRIC_KINDS

        why = (f"{kind!r} datasets hold rubrics, not worked solutions" if kind in RUBRIC_KINDS
               else f"unknown kind {kind!r}")
        raise _invalid(label, why)
    parsed = parse_dataset_spec(spec)
    if parsed.kind == "reasoning-gym" and parsed.arg not in RATIONALE_BUILDERS:
        raise ValueError(f"sft_data {label!r}: {_no_builder(parsed.arg)}")
    return parsed


def check_sft_data_spec(spec: str) -> None:
    """Checks an ``sft_data`` spec (:data:`SFT_DATA_FORMS`) without reading anything.

    "auto" always passes here; :func:`load_demonstrations` checks the dataset it
    stands for.

    Raises:
      ValueError: an empty spec, an unknown kind, a rubric dataset (no worked
        solutions), a reasoning-gym task without a rationale builder, or a malformed
        sft-jsonl or dataset spec; the message names the spec and the valid forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _invalid(str(spec), "empty spec")
    text = spec.strip()
    if text == "auto":
        return
    if text.split(":", 1)[0].split("#", 1)[0] == _SFT_JSONL:
        _parse_sft_jsonl(text)
        return
    _check_dataset_source(text, spec)


# ---------------------------------------------------------------------------
# Loading


def _completion(reasoning: str, answer: str, reasoning_tag: str, answer_tag: str) -> str:
    return f"<{reasoning_tag}>{reasoning}</{reasoning_tag}>\n<{answer_tag}>{answer}</{answer_tag}>"


def _missing_column(source: str, what: str, found: set, expected: Any) -> ValueError:
    return ValueError(f"{source} has no {what} column: found columns {sorted(found)}, expected "
                      f"{expected}")


def _reasoning_column(parsed: Any, examples: list[dict], source: str) -> str:
    found = set().union(*(example.keys() for example in examples))
    if parsed.kind == "gsm8k":
        candidates: tuple[str, ...] = ("solution",)
    elif "reasoning" in parsed.options:
        candidates = (parsed.options["reasoning"],)
    else:
        candidates = _REASONING_COLUMNS
    column = next((c for c in candidates if c in found), None)
    if column is None:
        hint = "" if parsed.kind == "gsm8k" else " (name yours with #reasoning=COLUMN)"
        raise _missing_column(source, "worked-solution", found, f"one of {list(candidates)}{hint}")
    return column


def _from_dataset(spec: str, label: str, seed: int, max_examples: int | None,
                  skipped: collections.Counter) -> list[tuple[str, str, str]]:
    """(question, reasoning, answer) of each example of a dataset spec that has one."""
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.datasets import load_examples

    parsed = _check_dataset_source(spec, label)
    examples = load_examples(parsed, seed=seed, max_examples=max_examples)
    if parsed.kind == "reasoning-gym":
        return _from_reasoning_gym(parsed.arg, examples, skipped)
    column = _reasoning_column(parsed, examples, label)
    triples = []
    for example in examples:
        reasoning = example.get(column)
        if not isinstance(reasoning, str) or not reasoning.strip():
            skipped["without reasoning"] += 1
            continue
        if parsed.kind == "gsm8k":
            reasoning = strip_calculator_notes(reasoning)
        triples.append((example["question"], reasoning.strip(), example["answer"]))
    return triples


def _same_answer(answer: str, reference: str) -> bool:
    if answer.strip() == reference.strip():
        return True
    try:
        return fractions.Fraction(answer.strip()) == fractions.Fraction(reference.strip())
    except (ValueError, ZeroDivisionError):
        return False


def _from_reasoning_gym(task: str, examples: list[dict],
                        skipped: collections.Counter) -> list[tuple[str, str, str]]:
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.rewards.builtin import _reasoning_gym_scorer

    build, verify = RATIONALE_BUILDERS[task], _reasoning_gym_scorer(task)
    triples = []
    for example in examples:
        entry = json.loads(example["entry"])
        try:
            reasoning, answer = build(entry)
        except ValueError:
            skipped["without a rationale from the metadata"] += 1
            continue
        # basic_arithmetic floors its divisions: an exact value that differs is dropped.
        if not _same_answer(answer, example["answer"]):
            skipped["whose rationale reaches another value than the reference"] += 1
            continue
        if float(verify(answer=answer, entry=entry)) < 1.0:
            skipped["rejected by the task's verifier"] += 1
            continue
        triples.append((example["question"], reasoning, answer))
    return triples


def _from_sft_jsonl(spec: str, seed: int, max_examples: int | None,
                    skipped: collections.Counter,
                    answer_tag: str) -> list[tuple[str, str, str | None]]:
    """(question, completion, answer) of each row of an sft-jsonl file."""

    path, options, limit = _parse_sft_jsonl(spec)
    q_col = options.get("question", "question")
    c_col = options.get("completion", "completion")
    rows = read_jsonl(Path(path).expanduser(),
                      f"one JSON object per line with {q_col!r} and {c_col!r} columns", skipped)
    found = set().union(*(row.keys() for row in rows))
    for what, column in (("question", q_col), ("completion", c_col)):
        if column not in found:
            raise _missing_column(spec, what, found,
                                  f"{column!r} (name yours with #{what}=COLUMN)")
    random.Random(seed).shuffle(rows)
    limit = limit if limit is not None else max_examples
    rows = rows[:limit]
    out = []
    for row in rows:
        question, completion = row.get(q_col), row.get(c_col)
        if not isinstance(question, str) or not question.strip():
            skipped["without question"] += 1
            continue
        if not isinstance(completion, str) or not completion.strip():
            skipped["without completion"] += 1
            continue
        # The trainer appends the model's end-of-turn marker itself.
        completion = strip_end_marker(completion)
        # None (no answer tag) leaves the verdict to the format check.
        out.append((question.strip(), completion, extract_answer(completion, answer_tag)))
    return out


def load_demonstrations(spec: str, *, dataset: str, seed: int, max_examples: int | None = None,
                        reasoning_tag: str = "reasoning",
                        answer_tag: str = "answer") -> list[Demonstration]:
    """Loads the demonstrations of an ``sft_data`` spec (:data:`SFT_DATA_FORMS`).

    Args:
      spec: "auto", a dataset spec with worked solutions, or "sft-jsonl:PATH[...]".
      dataset: the run's dataset spec, which "auto" stands for.
      seed: seeds reasoning-gym generation and the order, as in
        ``jaxpost.data.datasets.load_examples`` ("auto" gives the run's own examples).
      max_examples: cap used when the spec has no ``#max`` (for reasoning-gym, the
        number generated).
      reasoning_tag, answer_tag: the tags of the completions (names, no brackets).

    Returns:
      The demonstrations in a seeded order, each completion scoring 1.0 on
      ``jaxpost.rewards.builtin.format_exact`` with these tags. Skipped rows (no reasoning,
      empty answer, a malformed completion, a rationale the verifier rejects) are
      counted in one warning of the "jaxpost.data.demonstrations" logger.

    Raises:
      ValueError: a bad spec (see :func:`check_sft_data_spec`, applied to the dataset
        for "auto"), a source without a worked-solution or completion column (naming
        the columns found and expected), or no demonstration left.
      FileNotFoundError: a local file is missing.
    """
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.rewards.builtin import format_exact

    check_sft_data_spec(spec)
    text = spec.strip()
    skipped: collections.Counter = collections.Counter()
    if text.split(":", 1)[0].split("#", 1)[0] == _SFT_JSONL:
        source = text
        candidates = [(q, c, a, c) for q, c, a in
                      _from_sft_jsonl(text, seed, max_examples, skipped, answer_tag)]
    else:
        source = text if text != "auto" else dataset
        label = text if text != "auto" else f"auto (dataset {dataset!r})"
        candidates = [(q, r, a, _completion(r, a, reasoning_tag, answer_tag)) for q, r, a in
                      _from_dataset(source, label, seed, max_examples, skipped)]

    demos = []
    for question, reasoning, answer, completion in candidates:
        if not reasoning.strip():
            skipped["without reasoning"] += 1
        elif answer is not None and not answer.strip():
            skipped["without answer"] += 1
        elif format_exact(None, [completion], reasoning_tag=reasoning_tag,
                          answer_tag=answer_tag) != [1.0]:
            skipped["malformed"] += 1
        else:
            demos.append(Demonstration(question, completion, answer.strip()))

    total = len(demos) + sum(skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if not demos:
        raise ValueError(f"sft_data {spec!r} ({source}) gives no usable demonstrations: "
                         f"{reasons or 'the source is empty'}")
    if skipped:
        logger.warning("%s: skipped %d of %d demonstrations: %s", source,
                       sum(skipped.values()), total, reasons)
    return demos
