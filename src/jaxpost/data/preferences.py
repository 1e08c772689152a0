"""Preference pairs for DPO: a prompt, a chosen completion and a rejected one.

Two sources (``preference_data``, see :data:`PREFERENCE_DATA_FORMS`):

  - ``preference-jsonl:PATH``: a user's file, one JSON object per line with a question
    (or prompt) column and a chosen and a rejected completion;
  - ``self``: pairs made from the run's own scored completions. For each training
    prompt the policy DPO starts from samples G completions, the run's reward functions
    score them, and the best is paired with the worst; a group whose scores all tie
    gives no pair. ``self+demonstrations`` adds the prompt's demonstration (the SFT
    warm-up's source, ``sft_data``) to each group as one more candidate, so that a
    policy whose samples all fail alike still gets a pair.

Questions are formatted like every other prompt of the run (system prompt, chat
template); completions get the model's end-of-turn token appended when tokenized.

This module imports neither JAX nor the data pipeline at import time: the config checks
``preference_data`` with :func:`check_preference_data_spec` whenever one is built.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxpost.data.demonstrations import parse_file_spec
from jaxpost.data.jsonl import read_jsonl
from jaxpost.data.prompts import strip_end_marker

__all__ = [
    "PREFERENCE_DATA_FORMS",
    "SELF",
    "SELF_WITH_DEMONSTRATIONS",
    "PreferencePair",
    "best_and_worst",
    "check_preference_data_spec",
    "load_preference_jsonl",
    "pairs_from_groups",
    "score_completions",
    "uses_demonstrations",
]

SELF = "self"
SELF_WITH_DEMONSTRATIONS = "self+demonstrations"
_PREFERENCE_JSONL = "preference-jsonl"
_PREFERENCE_JSONL_OPTIONS = ("question", "chosen", "rejected")
# Column names a file's question may have, tried in this order unless #question= names one.
_QUESTION_COLUMNS = ("question", "prompt")

PREFERENCE_DATA_FORMS = (
    "self  (G samples per training prompt from the policy DPO starts from, scored by "
    "reward_functions; the best paired with the worst, ties skipped)",
    "self+demonstrations  (as self, with the prompt's demonstration from sft_data as one "
    "more candidate)",
    "preference-jsonl:PATH[#question=COLUMN&chosen=COLUMN&rejected=COLUMN&max=N]  (one "
    "JSON object per line: a question or prompt column, a chosen and a rejected completion)",
)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is preferred to ``rejected`` as an answer to ``question``.

    Attributes:
      question: the question, formatted into a prompt like the run's other prompts.
      chosen, rejected: completion texts, without an end-of-turn marker.
      chosen_score, rejected_score: their total rewards (self pairs), else None.
      chosen_ids, rejected_ids: the token ids a sampled completion was made of, its end
        token included when it ended before the token budget; None for texts, which
        are tokenized with the end token appended.
      prompt: the formatted prompt the completions answer, when it is known (self
        pairs: the one they were sampled from); None formats ``question``.
    """

    question: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    chosen_ids: tuple[int, ...] | None = None
    rejected_ids: tuple[int, ...] | None = None
    prompt: str | None = None


def _invalid(spec: str, why: str) -> ValueError:
    forms = "\n  ".join(PREFERENCE_DATA_FORMS)
    return ValueError(f"preference_data {spec!r}: {why}. Valid forms:\n  {forms}")


def _parse_preference_jsonl(spec: str) -> tuple[str, dict[str, str], int | None]:
    """(path, column options, max) of a ``preference-jsonl:PATH[#KEY=VALUE&...]`` spec."""
    path, options, limit = parse_file_spec(spec, _PREFERENCE_JSONL,
                                           _PREFERENCE_JSONL_OPTIONS, _invalid)
    if options.get("chosen") is not None and options.get("chosen") == options.get("rejected"):
        raise _invalid(spec, "chosen and rejected name the same column")
    return path, options, limit


def check_preference_data_spec(spec: str) -> None:
    """Checks a ``preference_data`` spec (:data:`PREFERENCE_DATA_FORMS`) without reading
    anything (a file is read, and its columns checked, when the session is prepared).

    Raises:
      ValueError: an empty or unknown spec, or a malformed preference-jsonl spec. A
        dataset spec (``gsm8k``, ``jsonl:PATH``, ...) is refused with the reason: its
        rows hold questions and answers, no chosen and rejected completions.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _invalid(str(spec), "empty spec")
    text = spec.strip()
    if text in (SELF, SELF_WITH_DEMONSTRATIONS):
        return
    kind = re.split(r"[:#]", text, maxsplit=1)[0]
    if kind == _PREFERENCE_JSONL:
        _parse_preference_jsonl(text)
        return
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.datasets import RUBRIC_KINDS

    if kind in ("gsm8k", "jsonl", "reasoning-gym", *RUBRIC_KINDS):
        raise _invalid(spec, f"{kind!r} is a dataset of questions (and answers or rubrics), "
                             "with no chosen and rejected completions to prefer; use 'self' to "
                             "pair the policy's own scored samples on the run's dataset, or "
                             "preference-jsonl:PATH with chosen and rejected columns")
    raise _invalid(spec, f"unknown kind {kind!r}")


def uses_demonstrations(spec: str) -> bool:
    """Whether the pairs of ``spec`` take candidates from the SFT demonstrations."""
    return spec.strip() == SELF_WITH_DEMONSTRATIONS


def _missing_column(spec: str, what: str, found: set, expected: str) -> ValueError:
    return ValueError(f"preference_data {spec!r} has no {what} column: found columns "
                      f"{sorted(found)}, expected {expected}")


def load_preference_jsonl(spec: str, *, seed: int,
                          max_examples: int | None = None) -> list[PreferencePair]:
    """The pairs of a ``preference-jsonl:PATH[...]`` file, in a seeded order.

    Columns: the question (``#question=COLUMN``, else ``question``, else ``prompt``),
    ``chosen`` and ``rejected`` (or the columns ``#chosen=`` and ``#rejected=`` name),
    each a non-empty string. A trailing end marker (``<end_of_turn>``, ...) is removed;
    the trainer appends the model's own.

    Args:
      seed: seeds the order (the same for the same seed).
      max_examples: cap used when the spec has no ``#max``.

    Returns:
      The usable pairs. Rows without a usable question, chosen or rejected text, or
      whose chosen and rejected texts are equal (no preference), are skipped and
      counted in one warning of the "jaxpost.data.preferences" logger.

    Raises:
      ValueError: a bad spec, a file without one of the columns (naming the columns
        found and expected), or no usable pair.
      FileNotFoundError: the file is missing.
    """

    check_preference_data_spec(spec)
    path, options, limit = _parse_preference_jsonl(spec)
    chosen_col = options.get("chosen", "chosen")
    rejected_col = options.get("rejected", "rejected")
    skipped: collections.Counter = collections.Counter()
    rows = read_jsonl(Path(path).expanduser(),
                      f"one JSON object per line with a question (or prompt), {chosen_col!r} "
                      f"and {rejected_col!r} column", skipped)
    found = set().union(*(row.keys() for row in rows)) if rows else set()
    if "question" in options:
        question_col = options["question"]
        if question_col not in found:
            raise _missing_column(spec, "question", found, f"{question_col!r}")
    else:
        question_col = next((c for c in _QUESTION_COLUMNS if c in found), None)
        if question_col is None:
            raise _missing_column(spec, "question", found,
                                  f"one of {list(_QUESTION_COLUMNS)} (name yours with "
                                  "#question=COLUMN)")
    for what, column in (("chosen", chosen_col), ("rejected", rejected_col)):
        if column not in found:
            raise _missing_column(spec, what, found, f"{column!r} (name yours with "
                                                     f"#{what}=COLUMN)")
    random.Random(seed).shuffle(rows)
    rows = rows[:limit if limit is not None else max_examples]
    pairs = []
    for row in rows:
        texts = {}
        for what, column in (("question", question_col), ("chosen", chosen_col),
                             ("rejected", rejected_col)):
            value = row.get(column)
            if not isinstance(value, str):
                texts = f"{'without' if value is None else 'non-string'} {what}"
                break
            value = value.strip() if what == "question" else strip_end_marker(value)
            if not value.strip():
                texts = f"empty {what}"
                break
            texts[what] = value
        if isinstance(texts, str):
            skipped[texts] += 1
        elif texts["chosen"].strip() == texts["rejected"].strip():
            skipped["chosen equal to rejected"] += 1
        else:
            pairs.append(PreferencePair(texts["question"], texts["chosen"], texts["rejected"]))
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if not pairs:
        raise ValueError(f"preference_data {spec!r} gives no usable pairs: "
                         f"{reasons or 'the file is empty'}")
    if skipped:
        logging.getLogger("jaxpost.data.preferences").warning(
            "%s: skipped %d of %d rows: %s", path, sum(skipped.values()),
            len(pairs) + sum(skipped.values()), reasons)
    return pairs


def score_completions(reward_fns: Sequence[Callable], prompts: Sequence[str],
                      completions: Sequence[str],
                      columns: Mapping[str, Sequence[Any]]) -> list[float]:
    """Each completion's total reward, as the run's GRPO would compute it.

    Calls every reward function (Tunix's signature, weights already applied) with the
    prompts, the completions and the dataset's other columns (one value per
    completion), and sums their values per completion; NaN counts as 0, as in Tunix's
    reward manager.

    Raises:
      ValueError: a reward function returns the wrong number of values.
    """
    totals = [0.0] * len(completions)
    for fn in reward_fns:
        values = list(fn(prompts=list(prompts), completions=list(completions), **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} returned {len(values)} "
                             f"values for {len(completions)} completions")
        totals = [t + (0.0 if math.isnan(float(v)) else float(v))
                  for t, v in zip(totals, values)]
    return totals


def best_and_worst(scores: Sequence[float]) -> tuple[int, int] | None:
    """``(best, worst)`` indices of a group's scores, or None when they all tie.

    Among equal scores the earliest index wins, so candidates listed first (the
    policy's own samples, before a demonstration) are preferred.
    """
    if not scores:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        return None
    return best, worst


def pairs_from_groups(questions: Sequence[str], groups: Sequence[Sequence[str]],
                      scores: Sequence[Sequence[float]],
                      ids: Sequence[Sequence[tuple[int, ...] | None]] | None = None,
                      prompts: Sequence[str] | None = None,
                      ) -> tuple[list[PreferencePair], int]:
    """One pair per group of scored candidates: the best chosen, the worst rejected.

    Args:
      questions: one question per group.
      groups: each group's candidate completions (texts).
      scores: each candidate's total reward, shaped like ``groups``.
      ids: each candidate's token ids (see :class:`PreferencePair`), or None.
      prompts: each group's formatted prompt, or None.

    Returns:
      ``(pairs, ties)``: the pairs in group order, and the number of groups skipped
      because all their candidates scored the same.

    Raises:
      ValueError: the arguments' lengths differ, or a score is not finite.
    """
    if not len(questions) == len(groups) == len(scores) or any(
            extra is not None and len(extra) != len(groups) for extra in (ids, prompts)):
        raise ValueError(f"{len(questions)} questions, {len(groups)} groups and {len(scores)} "
                         "score lists: expected one of each per group")
    pairs, ties = [], 0
    for g, (question, texts, values) in enumerate(zip(questions, groups, scores)):
        if len(texts) != len(values):
            raise ValueError(f"group {g} has {len(texts)} candidates and {len(values)} scores")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"group {g} has a score that is not finite: {list(values)}")
        picked = best_and_worst(values)
        if picked is None:
            ties += 1
            continue
        b, w = picked
        pairs.append(PreferencePair(
            question, texts[b], texts[w], chosen_score=float(values[b]),
            rejected_score=float(values[w]),
            chosen_ids=None if ids is None else ids[g][b],
            rejected_ids=None if ids is None else ids[g][w],
            prompt=None if prompts is None else prompts[g]))
    return pairs, ties
