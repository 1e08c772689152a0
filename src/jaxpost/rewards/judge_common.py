"""What every judge shares: the questions it is asked and the counters of its work.

The questions are plain text; a model judge wraps them in its own chat turn, an API
judge sends them as one user message.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


CRITERION_PROMPT = (
    "You grade answers. Read the question, the answer and one criterion, then reply "
    "with a single word: Yes if the answer meets the criterion, No if it does not.\n\n"
    "Question: {question}\n\nAnswer: {completion}\n\nCriterion: {criterion}\n\n"
    "Does the answer meet the criterion? Reply Yes or No.")
RUBRIC_PROMPT = (
    "You grade answers. Read the question, the answer and the rubric, then rate how well "
    "the answer meets the rubric. Items marked 'pitfall' are mistakes that lower the "
    "rating.\n\nQuestion: {question}\n\nAnswer: {completion}\n\nRubric:\n{rubric}\n\n"
    "{scale}")
API_SCALE = "Reply with one integer from 1 (meets none) to 10 (meets all), nothing else."
# A small model's next token is one digit, so it rates 0-9; rating = 1 + digit.
MODEL_SCALE = "Reply with one digit from 0 (meets none) to 9 (meets all)."


class JudgeStats:
    """Counters of a judge's work, safe to update from several threads.

    Attributes:
      calls: judge queries answered by the judge itself (model rows, API requests);
        cache hits are not calls.
      seconds: wall time spent in the judge.
      failures: items left unscored (after retries).
      cache_hits: items answered from the cache.
    """

    FIELDS = ("calls", "seconds", "failures", "cache_hits")

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._values[k] += v

    def snapshot(self) -> dict[str, float]:
        """A copy of the counters: ``{"calls": ..., "seconds": ..., ...}``."""
        with self._lock:
            return dict(self._values)

    def __getattr__(self, name: str) -> float:
        if name in JudgeStats.FIELDS:
            return self.snapshot()[name]
        raise AttributeError(name)


def judge_metrics_fn(judge: Any):
    """A Tunix metric function that logs the judge's work since its previous call.

    Tunix calls metric functions once per rollout batch, right after the rewards, so
    each call reports that batch's judge work: ``judge/calls``, ``judge/seconds``,
    ``judge/failures``, ``judge/cache_hits`` (summed over a step's batches).
    """
    last = judge.stats.snapshot()

    def judge_metrics(prompts, completions, rewards, advantages, **kwargs):
        del prompts, completions, rewards, advantages, kwargs
        nonlocal last
        now = judge.stats.snapshot()
        delta = {k: now[k] - last[k] for k in JudgeStats.FIELDS}
        last = now
        return {f"judge/{k}": (v, np.sum) for k, v in delta.items()}

    return judge_metrics


def rubric_lines(rubric) -> str:
    """A rubric as the judge reads it: one "- (category) text" line per criterion."""
    return "\n".join(f"- ({c.category}) {c.text}" for c in rubric)
