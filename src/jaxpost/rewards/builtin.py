"""The built-in rewards: format, answer correctness, reasoning-gym verifiers.

Every reward is a pure function with Tunix's signature::

    f(prompts: list[str], completions: list[str], **columns) -> list[float]

Tunix's ``RewardManager`` calls ``fn(prompts=..., completions=..., **columns)``, where
``columns`` are the other dataset columns of the batch (``answer``, ``question``,
``task``, ``entry``, ...), each a list aligned with ``completions``, plus whatever else
Tunix decides to pass; every reward therefore accepts ``**kwargs``. Tunix also fills
any parameter whose name matches a field of its algorithm config (``beta``,
``epsilon``, ``num_generations``, ...), so no reward here uses such a name.

Reading a completion (its answer, its number, whether it echoes the prompt) lives in
:mod:`jaxpost.rewards.answers`; this module scores. The rewards take the tag names as
keyword-only parameters (``reasoning_tag``, ``answer_tag``), which
:func:`jaxpost.rewards.registry.create_reward_functions` binds from the config; the
registry (:data:`jaxpost.rewards.registry.REWARDS`) lists them by name.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxpost.data.prompts import strip_end_marker
from jaxpost.rewards.answers import (
    echoes_prompt,
    extract_answer,
    normalize_answer,
    numbers_equal,
    parse_number,
)

__all__ = [
    "answer_match",
    "answer_number",
    "format_approximate",
    "format_exact",
    "reasoning_gym",
]

# Partial credit for a numeric answer close to the true one: (relative error, reward),
# checked in order. A tiny model gets a gradient towards the answer before it is exact.
_CLOSE_CREDIT: tuple[tuple[float, float], ...] = ((0.10, 0.5), (0.20, 0.25))


def _echo_flags(
    reward: str, prompts: Sequence[str] | None, completions: list[str],
    question: Sequence[Any] | None,
) -> list[bool]:
    """:func:`echoes_prompt` per completion; all False when there are no prompts."""
    if prompts is None or len(prompts) == 0:
        return [False] * len(completions)
    for name, column in (("prompts", prompts), ("question", question)):
        if column is not None and len(column) != len(completions):
            raise ValueError(f"{reward}: {name} has {len(column)} values for "
                             f"{len(completions)} completions; pass one per completion")
    questions = [None] * len(completions) if question is None else [str(q) for q in question]
    return [echoes_prompt(str(p), c, q) for p, c, q in zip(prompts, completions, questions)]


def _require_column(
    reward: str, name: str, value: Any, completions: list[str], kwargs: dict
) -> list:
    if value is None:
        raise ValueError(
            f"{reward} needs a {name!r} column in the dataset; got columns: {sorted(kwargs)}"
        )
    if len(value) != len(completions):
        raise ValueError(
            f"{reward}: column {name!r} has {len(value)} values for {len(completions)} completions"
        )
    return list(value)


def format_exact(
    prompts: Sequence[str] | None,
    completions: list[str],
    *,
    question: Sequence[Any] | None = None,
    reasoning_tag: str = "reasoning",
    answer_tag: str = "answer",
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion is exactly ``<reasoning>R</reasoning><answer>A</answer>``.

    Surrounding whitespace and one trailing end marker (``<end_of_turn>``, ``<eos>``,
    ``</s>``, ``<|im_end|>``) are ignored; whitespace between the blocks is allowed;
    R and A must contain non-whitespace text; each of the four tags must appear exactly
    once; no other text may come before or after. Otherwise 0.0.

    A completion that copies the instruction (:func:`echoes_prompt` against its
    ``prompts`` entry and the optional ``question`` column) scores 0.0 whatever its
    tags: the system prompt names each tag once, so a base model that repeats it would
    otherwise be rewarded for not answering. ``prompts`` None or empty skips that check.

    Range: {0.0, 1.0}.

    Raises:
      ValueError: ``prompts`` (when given) or ``question`` differ in length from
        ``completions``.
    """
    del kwargs
    echoes = _echo_flags("format_exact", prompts, completions, question)
    r_open, r_close = f"<{reasoning_tag}>", f"</{reasoning_tag}>"
    a_open, a_close = f"<{answer_tag}>", f"</{answer_tag}>"
    pattern = re.compile(
        rf"^{re.escape(r_open)}\s*(.+?)\s*{re.escape(r_close)}\s*"
        rf"{re.escape(a_open)}\s*(.+?)\s*{re.escape(a_close)}$",
        re.DOTALL,
    )
    scores = []
    for completion, echo in zip(completions, echoes):
        text = strip_end_marker(completion)
        once = all(text.count(tag) == 1 for tag in (r_open, r_close, a_open, a_close))
        match = pattern.match(text) if once and not echo else None
        # The pattern alone lets a whitespace-only block through ("<answer> </answer>").
        ok = match is not None and all(group.strip() for group in match.groups())
        scores.append(1.0 if ok else 0.0)
    return scores


def format_approximate(
    prompts: Sequence[str] | None,
    completions: list[str],
    *,
    question: Sequence[Any] | None = None,
    reasoning_tag: str = "reasoning",
    answer_tag: str = "answer",
    **kwargs: Any,
) -> list[float]:
    """Partial credit for the format, so that a model far from it still gets a signal.

    For each of the four tags (``<reasoning>``, ``</reasoning>``, ``<answer>``,
    ``</answer>``): +0.25 when it appears exactly once, -0.25 when it appears more than
    once, 0 when absent. A further -0.25 when non-whitespace text follows the last
    ``</answer>`` (one trailing end marker such as ``<end_of_turn>`` is ignored). The
    sum is clipped to [-1, 1]. Tag order is not checked; :func:`format_exact` does that.

    A completion that copies the instruction (:func:`echoes_prompt` against its
    ``prompts`` entry and the optional ``question`` column) scores -1.0, the minimum:
    repeating the system prompt shows each tag once and would otherwise earn up to
    1.0. ``prompts`` None or empty skips that check.

    Range: [-1.0, 1.0] in steps of 0.25.

    Raises:
      ValueError: ``prompts`` (when given) or ``question`` differ in length from
        ``completions``.
    """
    del kwargs
    echoes = _echo_flags("format_approximate", prompts, completions, question)
    tags = (f"<{reasoning_tag}>", f"</{reasoning_tag}>", f"<{answer_tag}>", f"</{answer_tag}>")
    a_close = tags[3]
    scores = []
    for completion, echo in zip(completions, echoes):
        if echo:
            scores.append(-1.0)
            continue
        text = strip_end_marker(completion)
        score = 0.0
        for tag in tags:
            count = text.count(tag)
            if count == 1:
                score += 0.25
            elif count > 1:
                score -= 0.25
        end = text.rfind(a_close)
        if end != -1 and text[end + len(a_close) :].strip():
            score -= 0.25
        scores.append(min(1.0, max(-1.0, score)))
    return scores


def answer_match(
    prompts: list[str],
    completions: list[str],
    *,
    answer: Sequence[Any] | None = None,
    answer_tag: str = "answer",
    **kwargs: Any,
) -> list[float]:
    """Compare the text in the answer tag with the ``answer`` column.

    1.0 when the two are equal after :func:`normalize_answer`, or both parse as numbers
    (:func:`parse_number`) that are equal up to a relative 1e-6. When both are numbers
    but differ: 0.5 within 10% of the true answer, 0.25 within 20%, else 0.0. 0.0 when
    the completion has no complete answer tag.

    Range: {0.0, 0.25, 0.5, 1.0}.

    Raises:
      ValueError: the dataset has no ``answer`` column, or its length differs from
        ``completions``.
    """
    del prompts
    golds = _require_column("answer_match", "answer", answer, completions, kwargs)
    scores = []
    for completion, gold in zip(completions, golds):
        predicted = extract_answer(completion, answer_tag)
        if predicted is None:
            scores.append(0.0)
            continue
        gold = str(gold)
        if normalize_answer(predicted) == normalize_answer(gold):
            scores.append(1.0)
            continue
        x, y = parse_number(predicted), parse_number(gold)
        if x is None or y is None:
            scores.append(0.0)
            continue
        if numbers_equal(x, y):
            scores.append(1.0)
            continue
        score = 0.0
        for rel, credit in _CLOSE_CREDIT:
            if abs(x - y) <= rel * abs(y):
                score = credit
                break
        scores.append(score)
    return scores


def answer_number(
    prompts: list[str],
    completions: list[str],
    *,
    answer: Sequence[Any] | None = None,
    answer_tag: str = "answer",
    **kwargs: Any,
) -> list[float]:
    """1.0 when the first number in the answer tag equals the numeric ``answer`` column.

    Both sides go through :func:`parse_number`; equality is up to a relative 1e-6.
    0.0 when there is no answer tag or no number in it.

    Range: {0.0, 1.0}.

    Raises:
      ValueError: the dataset has no ``answer`` column, its length differs from
        ``completions``, or one of its values holds no number (use ``answer_match``
        for non-numeric datasets).
    """
    del prompts
    golds = _require_column("answer_number", "answer", answer, completions, kwargs)
    scores = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        y = parse_number(str(gold))
        if y is None:
            raise ValueError(
                f"answer_number needs numeric answers; answer[{i}] = {gold!r} holds no number"
            )
        predicted = extract_answer(completion, answer_tag)
        x = None if predicted is None else parse_number(predicted)
        scores.append(1.0 if x is not None and numbers_equal(x, y) else 0.0)
    return scores


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(task: str) -> Callable[..., float]:
    # Imported here: reasoning_gym takes ~2 s to import and most runs never need it.
    import reasoning_gym as rg

    # get_score_answer_fn builds the dataset class once with its default config;
    # caching keeps that off the per-batch path.
    return rg.get_score_answer_fn(task)


def reasoning_gym(
    prompts: list[str],
    completions: list[str],
    *,
    task: Sequence[str] | None = None,
    entry: Sequence[str | dict] | None = None,
    answer_tag: str = "answer",
    **kwargs: Any,
) -> list[float]:
    """Score the text in the answer tag with reasoning-gym's own verifier.

    For completion ``i``: ``reasoning_gym.get_score_answer_fn(task[i])(answer=...,
    entry=json.loads(entry[i]))``. ``entry`` holds the reasoning-gym entry as a JSON
    string (a dict is accepted as is). A completion without a complete answer tag
    scores 0.0. Scores of tasks with graded verifiers (partial credit) pass through.

    Range: [0.0, 1.0] (as returned by reasoning-gym).

    Raises:
      ValueError: the ``task`` or ``entry`` column is missing or has the wrong length,
        an entry is not valid JSON, or a task name is not a reasoning-gym dataset.
    """
    del prompts
    if task is None or entry is None:
        present = sorted([*kwargs, *(["task"] if task is not None else []),
                          *(["entry"] if entry is not None else [])])
        raise ValueError(
            "reasoning_gym needs 'task' and 'entry' columns in the dataset (entry: the "
            f"reasoning-gym entry dict as a JSON string); got columns: {present}"
        )
    tasks = _require_column("reasoning_gym", "task", task, completions, kwargs)
    entries = _require_column("reasoning_gym", "entry", entry, completions, kwargs)
    scores = []
    for i, completion in enumerate(completions):
        predicted = extract_answer(completion, answer_tag)
        if predicted is None:
            scores.append(0.0)
            continue
        raw = entries[i]
        try:
            item = raw if isinstance(raw, dict) else json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"reasoning_gym: entry[{i}] is not valid JSON: {err}") from err
        scorer = _reasoning_gym_scorer(str(tasks[i]))
        scores.append(float(scorer(answer=predicted, entry=item)))
    return scores
