"""Evaluation metrics: a dataset example's completions -> its record -> the report's metrics.

Pure functions (no model): :func:`score_completions` scores one example's completions
with the reward functions training uses, :func:`aggregate` averages the records.

Metrics (means over examples; each example has ``num_samples`` completions):

* ``accuracy`` -- fraction of completions whose answer is exactly right: the
  ``reasoning_gym`` verifier for reasoning-gym datasets (score 1.0), ``answer_match``
  (score 1.0, i.e. equal after normalisation) otherwise;
* ``format_rate`` -- fraction with ``format_exact`` 1.0;
* ``partial_credit`` -- mean ``answer_match`` score (1, 0.5 within 10%, 0.25 within 20%);
* ``pass@k`` -- the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code"), ``1 - C(n - c, k) / C(n, k)`` for n samples, c correct;
* ``mean_completion_tokens`` -- completion length, the text re-tokenised;
* ``truncated_rate`` -- fraction whose re-tokenised length reaches ``max_new_tokens``
  (cut off before finishing; re-tokenising can count a token fewer, so a lower bound).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from jaxpost.rewards import builtin as rewards
from jaxpost.rewards.answers import extract_answer

__all__ = ["aggregate", "pass_at_k", "score_completions"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021).

    The probability that at least one of ``k`` completions drawn without replacement
    from ``n`` generated ones, ``c`` of them correct, is correct.

    Raises:
      ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.

    >>> pass_at_k(5, 0, 1), pass_at_k(5, 5, 3), pass_at_k(4, 1, 2)
    (0.0, 1.0, 0.5)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    # The product form of the ratio of binomials stays exact in floats for large n.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _answer_reward_name(example: dict) -> str:
    return "reasoning_gym" if "task" in example and "entry" in example else "answer_match"


def _count_tokens(tokenizer, text: str) -> int:
    ids = list(tokenizer.encode(text))
    if ids and ids[0] == tokenizer.bos_id():
        ids = ids[1:]
    return len(ids)


def score_completions(example: dict, completions: Sequence[str], *, reasoning_tag: str = "reasoning",
                      answer_tag: str = "answer", max_new_tokens: int | None = None,
                      k: int = 1, tokenizer=None, prompt: str | None = None) -> dict[str, Any]:
    """Scores one example's completions and returns its per-example record.

    Args:
      example: a dataset example (``question``, ``answer`` and, for reasoning-gym,
        ``task`` and ``entry``), as from ``jaxpost.data.datasets.load_examples``.
      completions: the example's n >= k completions.
      reasoning_tag, answer_tag: the tags the prompt asked for.
      max_new_tokens: the generation budget, for ``truncated``; None leaves it out.
      k: the k of pass@k.
      tokenizer: a tokenizer adapter (``encode``, ``bos_id``) for token counts; None
        leaves them out.
      prompt: the full formatted prompt the completions answer; ``format`` then counts a
        completion that copies the instruction as badly formatted
        (``jaxpost.rewards.answers.echoes_prompt``). None skips that check.

    Returns:
      A JSON-serialisable dict: ``question``, ``reference``, ``answer_reward`` (the
      reward that decides correctness), and per completion (lists in order)
      ``completions``, ``extracted`` (text in the answer tag, or None), ``answer_score``,
      ``correct`` (answer score 1.0), ``format`` (``format_exact``),
      ``partial_credit`` (``answer_match``), ``tokens`` and ``truncated`` (when a
      tokenizer is given); and ``pass@k``.
    """
    completions = list(completions)
    n = len(completions)
    columns = {key: [example[key]] * n for key in ("answer", "task", "entry") if key in example}
    tags = {"reasoning_tag": reasoning_tag, "answer_tag": answer_tag}
    reward_name = _answer_reward_name(example)
    prompts = [example["question"]] * n
    partial = rewards.answer_match(prompts, completions, answer_tag=answer_tag, **columns)
    if reward_name == "reasoning_gym":
        answer_scores = rewards.reasoning_gym(prompts, completions, answer_tag=answer_tag,
                                              **columns)
    else:
        answer_scores = partial
    correct = [score >= 1.0 for score in answer_scores]
    record: dict[str, Any] = {
        "question": example["question"],
        "reference": example["answer"],
        "answer_reward": reward_name,
        "completions": completions,
        "extracted": [extract_answer(c, answer_tag) for c in completions],
        "answer_score": [float(s) for s in answer_scores],
        "correct": correct,
        "format": rewards.format_exact([prompt] * n if prompt is not None else None,
                                       completions, question=[example["question"]] * n, **tags),
        "partial_credit": [float(s) for s in partial],
        f"pass@{k}": pass_at_k(n, sum(correct), k),
    }
    if tokenizer is not None:
        tokens = [_count_tokens(tokenizer, c) for c in completions]
        record["tokens"] = tokens
        if max_new_tokens is not None:
            record["truncated"] = [t >= max_new_tokens for t in tokens]
    return record


def aggregate(records: Sequence[dict], k: int = 1) -> dict[str, float]:
    """The report's metrics from per-example records of :func:`score_completions`.

    Each example counts once: a per-completion value is first averaged over the
    example's completions, then over examples. Token metrics appear only when the
    records have ``tokens`` / ``truncated``.

    Raises:
      ValueError: no records.
    """
    if not records:
        raise ValueError("no examples to aggregate")

    def mean_of(key: str) -> float:
        return sum(sum(map(float, r[key])) / len(r[key]) for r in records) / len(records)

    metrics = {
        "accuracy": mean_of("correct"),
        "format_rate": mean_of("format"),
        "partial_credit": mean_of("partial_credit"),
        f"pass@{k}": sum(r[f"pass@{k}"] for r in records) / len(records),
    }
    if all("tokens" in r for r in records):
        metrics["mean_completion_tokens"] = mean_of("tokens")
    if all("truncated" in r for r in records):
        metrics["truncated_rate"] = mean_of("truncated")
    return metrics
