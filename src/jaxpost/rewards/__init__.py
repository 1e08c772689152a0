"""Rewards: the registry, the built-in rewards, rubrics, and judges.

* :mod:`~jaxpost.rewards.registry`: the registry (:func:`register_reward`,
  :func:`get_reward`, :func:`create_reward_functions`).
* :mod:`~jaxpost.rewards.builtin`: the built-in rewards (format, answer correctness,
  reasoning-gym verifiers).
* :mod:`~jaxpost.rewards.answers`: reading a completion's answer, the same everywhere.
* :mod:`~jaxpost.rewards.rubrics`: rubric data and the ``rubric`` reward's aggregation.
* :mod:`~jaxpost.rewards.judges`: :func:`build_judge`, the judge a rubric reward asks, of
  :class:`JudgeSettings`;
  :mod:`~jaxpost.rewards.judge_model` (a local model) and
  :mod:`~jaxpost.rewards.judge_api` (an OpenAI-compatible service) implement it.

The names below are importable from ``jaxpost.rewards`` itself.
"""

from jaxpost._exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ECHO_MIN_WORDS": "jaxpost.rewards.answers",
    "JudgeSettings": "jaxpost.rewards.judges",
    "REWARDS": "jaxpost.rewards.registry",
    "RewardFn": "jaxpost.rewards.registry",
    "answer_match": "jaxpost.rewards.builtin",
    "answer_number": "jaxpost.rewards.builtin",
    "build_judge": "jaxpost.rewards.judges",
    "check_reward_config": "jaxpost.rewards.registry",
    "create_reward_functions": "jaxpost.rewards.registry",
    "echoes_prompt": "jaxpost.rewards.answers",
    "extract_answer": "jaxpost.rewards.answers",
    "format_approximate": "jaxpost.rewards.builtin",
    "format_exact": "jaxpost.rewards.builtin",
    "get_reward": "jaxpost.rewards.registry",
    "list_rewards": "jaxpost.rewards.registry",
    "normalize_answer": "jaxpost.rewards.answers",
    "numbers_equal": "jaxpost.rewards.answers",
    "parse_number": "jaxpost.rewards.answers",
    "reasoning_gym": "jaxpost.rewards.builtin",
    "register_reward": "jaxpost.rewards.registry",
    "rubric": "jaxpost.rewards.rubrics",
    "uses_judge": "jaxpost.rewards.registry",
})
