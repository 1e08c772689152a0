"""The reward registry: reward names -> functions, and the callables a run trains with.

:data:`REWARDS` is an explicit dict of the built-in rewards
(:mod:`jaxpost.rewards.builtin`: format, answer correctness, reasoning-gym verifiers)
and ``rubric`` (:func:`jaxpost.rewards.rubrics.rubric`); :func:`register_reward` adds
one of your own. Every reward has Tunix's signature
``f(prompts, completions, **columns) -> list[float]``.

:func:`create_reward_functions` looks up the config's reward names, binds the tag names
(``reasoning_tag``, ``answer_tag``) from the config and applies the reward weights.
``rubric`` needs a judge, which the session builds (it may need the model);
:func:`create_reward_functions` binds it when given ``judge=``, with
``rubric_aggregation`` and ``rubric_category_weights`` from the config.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from jaxpost.rewards.builtin import (
    answer_match,
    answer_number,
    format_approximate,
    format_exact,
    reasoning_gym,
)
from jaxpost.rewards.rubrics import DEFAULT_CATEGORY_WEIGHTS, rubric

__all__ = [
    "REWARDS",
    "RewardFn",
    "check_reward_config",
    "create_reward_functions",
    "get_reward",
    "list_rewards",
    "register_reward",
    "uses_judge",
]

RewardFn = Callable[..., list[float]]


class _RewardConfig(Protocol):
    reward_functions: Sequence[str]
    reward_weights: Sequence[float] | None
    reasoning_tag: str
    answer_tag: str


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
