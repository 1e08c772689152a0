"""Reward functions for GRPO: format, answer correctness, reasoning-gym verifiers, rubrics.

Every reward is a pure function with Tunix's signature::

    f(prompts: list[str], completions: list[str], **columns) -> list[float]

Tunix's ``RewardManager`` calls ``fn(prompts=..., completions=..., **columns)``, where
``columns`` are the other dataset columns of the batch (``answer``, ``question``,
``task``, ``entry``, ...), each a list aligned with ``completions``, plus whatever else
Tunix decides to pass; every reward therefore accepts ``**kwargs``. Tunix also fills
any parameter whose name matches a field of its algorithm config (``beta``,
``epsilon``, ``num_generations``, ...), so no reward here uses such a name.

Reading a completion (its answer, its number, whether it echoes the prompt) lives in
:mod:`jaxpost.rewards.answers`; this module scores. The built-ins take the tag names as keyword-only parameters (``reasoning_tag``,
``answer_tag``); :func:`create_reward_functions` binds them from the config and
applies the reward weights. The registry :data:`REWARDS` is an explicit dict.

``rubric`` (:func:`jaxpost.rewards.rubrics.rubric`) needs a judge, which the session builds
(it may need the model); :func:`create_reward_functions` binds it when given
``judge=``, with ``rubric_aggregation`` and ``rubric_category_weights`` from the config.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from jaxpost.rewards.answers import (  # noqa: F401  (re-exported)
    ECHO_MIN_WORDS,
    echoes_prompt,
    extract_answer,
    normalize_answer,
    numbers_equal,
    parse_number,
)
from jaxpost.data.prompts import END_MARKERS, strip_end_marker  # noqa: F401  (re-exported)
from jaxpost.rewards.rubrics import DEFAULT_CATEGORY_WEIGHTS, rubric

__all__ = [
    "ECHO_MIN_WORDS",
    "REWARDS",
    "RewardFn",
    "answer_match",
    "answer_number",
    "create_reward_functions",
    "echoes_prompt",
    "extract_answer",
    "format_approximate",
    "format_exact",
    "get_reward",
    "list_rewards",
    "normalize_answer",
    "parse_number",
    "reasoning_gym",
    "register_reward",
    "rubric",
    "uses_judge",
]

RewardFn = Callable[..., list[float]]

# Partial credit for a numeric answer close to the true one: (relative error, reward),
# checked in order. A tiny model gets a gradient towards the answer before it is exact.
_CLOSE_CREDIT: tuple[tuple[float, float], ...] = ((0.10, 0.5), (0.20, 0.25))


class _RewardConfig(Protocol):
    reward_functions: Sequence[str]
    reward_weights: Sequence[float] | None
    reasoning_tag: str
    answer_tag: str


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


# ---------------------------------------------------------------------------
# Built-in rewards


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


# ---------------------------------------------------------------------------
# Registry

REWARDS: dict[str, RewardFn] = {
    "format_exact": format_exact,
    "format_approximate": format_approximate,
    "answer_match": answer_match,
    "answer_number": answer_number,
    "reasoning_gym": reasoning_gym,
    "rubric": rubric,
}
# Rewards whose function takes a `judge` argument; create_reward_functions binds it.
_JUDGE_PARAM = "judge"


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> None:
    """Add ``fn`` to :data:`REWARDS` under ``name``.

    ``fn`` must have the Tunix signature ``fn(prompts, completions, **kwargs) ->
    list[float]``; if it has ``reasoning_tag`` / ``answer_tag`` parameters,
    :func:`create_reward_functions` binds them from the config.

    Raises:
      TypeError: ``fn`` is not callable.
      ValueError: ``name`` is already registered and ``overwrite`` is False.
    """
    if not callable(fn):
        raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if name in REWARDS and not overwrite:
        raise ValueError(
            f"reward {name!r} is already registered; pass overwrite=True to replace it"
        )
    REWARDS[name] = fn


def list_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(REWARDS)


def get_reward(name: str) -> RewardFn:
    """Return the registered reward ``name``.

    Raises:
      ValueError: unknown name; the message lists the known names and the closest one.
    """
    try:
        return REWARDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown reward {name!r}.{hint} Known rewards: {', '.join(list_rewards())}"
        ) from None


def _weighted(fn: RewardFn, weight: float) -> RewardFn:
    def weighted(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [weight * r for r in fn(prompts=prompts, completions=completions, **kwargs)]

    return weighted


def uses_judge(config: _RewardConfig) -> bool:
    """Whether one of the config's rewards needs a judge (``judge=`` of
    :func:`create_reward_functions`). Unknown names raise as in :func:`get_reward`."""
    return any(_JUDGE_PARAM in inspect.signature(get_reward(n)).parameters
               for n in config.reward_functions)


def check_reward_config(config: _RewardConfig) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Checks the reward names and weights of ``config`` without building anything.

    Returns:
      ``(names, weights)``, one float weight per name.

    Raises:
      ValueError: no reward names, a repeated name, an unknown name, or a weight count
        that differs from the name count.
    """
    names = tuple(config.reward_functions)
    if not names:
        raise ValueError("reward_functions is empty; known rewards: " + ", ".join(list_rewards()))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"reward_functions repeats {repeated}; use reward_weights to weight a reward"
        )
    weights = config.reward_weights
    if weights is None:
        weights = (1.0,) * len(names)
    elif len(weights) != len(names):
        raise ValueError(
            f"reward_weights has {len(weights)} values for {len(names)} reward_functions "
            f"{list(names)}"
        )
    for name in names:
        get_reward(name)
    return names, tuple(float(w) for w in weights)


def create_reward_functions(config: _RewardConfig, judge: Any = None) -> list[RewardFn]:
    """Build the reward callables that Tunix's RewardManager will call.

    Reads ``config.reward_functions`` (names in :data:`REWARDS`),
    ``config.reward_weights`` (``None`` for all 1.0, or one float per name),
    ``config.reasoning_tag`` and ``config.answer_tag``, and for rewards that take a
    judge (``rubric``) ``config.rubric_aggregation`` and
    ``config.rubric_category_weights``. Each returned callable has the Tunix
    signature, those parameters bound from the config (and ``judge`` bound to the
    ``judge`` argument), its output multiplied by its weight (when the weight is not
    1.0), and ``__name__`` equal to the registry name, which Tunix uses as the metric
    name ``rewards/<name>``.

    Args:
      config: the run's config (or any object with the fields above).
      judge: the judge for ``rubric`` (:func:`jaxpost.rewards.judges.build_judge`); required
        when a reward takes one.

    Raises:
      ValueError: no reward names, a repeated name, an unknown name, a weight count
        that differs from the name count, or a reward that needs a judge without one.
    """
    names, weights = check_reward_config(config)
    tags = {"reasoning_tag": config.reasoning_tag, "answer_tag": config.answer_tag}
    judged = {"judge": judge,
              "rubric_aggregation": getattr(config, "rubric_aggregation", "explicit"),
              "rubric_category_weights": tuple(getattr(config, "rubric_category_weights",
                                                       DEFAULT_CATEGORY_WEIGHTS))}

    built = []
    for name, weight in zip(names, weights):
        fn = get_reward(name)
        params = inspect.signature(fn).parameters
        bound_tags = {k: v for k, v in tags.items() if k in params}
        if _JUDGE_PARAM in params:
            if judge is None:
                raise ValueError(
                    f"reward {name!r} needs a judge: pass create_reward_functions(config, "
                    "judge=jaxpost.rewards.judges.build_judge("
                    "JudgeSettings.from_config(config), loaded)) (prepare_session does)")
            bound_tags.update({k: v for k, v in judged.items() if k in params})
        out: RewardFn = fn
        if bound_tags:
            out = functools.update_wrapper(functools.partial(fn, **bound_tags), fn)
        if float(weight) != 1.0:
            out = functools.update_wrapper(_weighted(out, float(weight)), fn)
        if out is fn:
            # A fresh wrapper, so that renaming it does not rename the registered function.
            out = functools.update_wrapper(_weighted(fn, 1.0), fn)
        out.__name__ = name
        out.__qualname__ = name
        built.append(out)
    return built
