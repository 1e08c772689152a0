"""Judges for the rubric reward: a language model, an OpenAI-compatible API, or keywords.

Every judge answers two kinds of question (see :class:`jaxpost.rewards.rubrics.Judge`):

* ``score_criteria(queries) -> [s or None]``: for each (question, completion,
  criterion), s in [0, 1], how surely the completion satisfies the criterion;
* ``rate_rubrics(queries) -> [r or None]``: for each (question, completion, rubric), a
  rating r in [1, 10] of the completion against the whole rubric.

None means the judge could not score that item (a timeout after its retries, an
unparsable reply); the reward leaves it out rather than count it as 0. Each judge
counts its work in ``stats`` (:class:`JudgeStats`), which training logs as
``judge/calls``, ``judge/seconds``, ``judge/failures`` and ``judge/cache_hits``.

Judges:

* :class:`ModelJudge` -- a causal LM (by default the session's frozen reference model)
  asked one yes/no question per criterion; s = P(yes) / (P(yes) + P(no)) from its
  next-token distribution, so the score is graded.
* :class:`APIJudge` -- chat completions from an OpenAI-compatible server; the key comes
  from the secret stores (never from the config) and is never logged.
* :class:`LexicalJudge` -- keyword coverage of each criterion; deterministic and
  offline, for smoke runs. A weak stand-in: it cannot tell "X is not Y" from "X is Y".

:func:`build_judge` makes the one :class:`JudgeSettings` ask for. The model judge lives in
``jaxpost.rewards.judge_model``, the API judge in ``jaxpost.rewards.judge_api``, the questions and
counters they share in ``jaxpost.rewards.judge_common``; all are importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from jaxpost.config import (JUDGE_KINDS, REFERENCE_JUDGE,  # noqa: F401  (re-exported)
                            ColabTrainingConfig)
from jaxpost.data.prompts import model_chat_template, resolve_chat_template
from jaxpost.models.loading import load_model
from jaxpost.rewards.judge_api import APIJudge, JudgeRequestError  # noqa: F401  (re-exported)
from jaxpost.rewards.judge_common import JudgeStats, judge_metrics_fn  # noqa: F401  (re-exported)
from jaxpost.rewards.judge_model import ModelJudge
from jaxpost.rewards.rubrics import (CATEGORIES, CriterionQuery, RubricJudgeError, RubricQuery,
                                     explicit_reward)
from jaxpost.runtime.credentials import resolve_secret

logger = logging.getLogger("jaxpost.rewards.judges")


_WORD = re.compile(r"[a-z0-9]+")
# Words that say how a rubric is phrased, not what the answer should contain.
_STOPWORDS = frozenset("""
a an the and or of to in on at for by with from as is are was were be been being it its
this that these those than then there their they them which who whom what when where why
how does do did not no yes answer response states state mentions mention explains explain
explain correctly identifies identify notes gives give describes describe includes include
uses use says say provides provide should must clearly correct correctly answer's about
into over under more most less such also only any all each both either some very
""".split())


def keywords(text: str) -> list[str]:
    """Content words of ``text`` (lower case, 3+ characters, rubric phrasing removed)."""
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in _STOPWORDS]


class LexicalJudge:
    """Keyword coverage: s = share of a criterion's content words found in the answer.

    A word counts as found when the answer contains a word with the same first five
    letters ("evaporates" matches "evaporation"). A criterion without content words
    cannot be scored (None). The implicit rating is 1 + 9 x the explicit aggregation
    of these coverages with equal category weights. Deterministic and offline, for
    smoke runs only: it ignores negation and meaning.
    """

    def __init__(self):
        self.stats = JudgeStats()

    @staticmethod
    def _coverage(criterion: str, completion: str) -> float | None:
        wanted = keywords(criterion)
        if not wanted:
            return None
        stems = {w[:5] for w in _WORD.findall(completion.lower())}
        return sum(w[:5] in stems for w in wanted) / len(wanted)

    def score_criteria(self, queries: Sequence[CriterionQuery]) -> list[float | None]:
        t0 = time.perf_counter()
        out = [self._coverage(q.criterion, q.completion) for q in queries]
        self.stats.add(calls=len(queries), seconds=time.perf_counter() - t0,
                       failures=sum(s is None for s in out))
        return out

    def rate_rubrics(self, queries: Sequence[RubricQuery]) -> list[float | None]:
        t0 = time.perf_counter()
        out: list[float | None] = []
        for q in queries:
            scores = [self._coverage(c.text, q.completion) for c in q.rubric]
            try:
                out.append(1.0 + 9.0 * explicit_reward(q.rubric, scores, (1.0,) * len(CATEGORIES)))
            except RubricJudgeError:
                out.append(None)
        self.stats.add(calls=len(queries), seconds=time.perf_counter() - t0,
                       failures=sum(r is None for r in out))
        return out


def resolve_judge_key(name: str, explicit: str | None = None, sources=None):
    """The API key called ``name``, looked up like the hub secrets: explicit value,
    Colab secrets, Kaggle secrets, then the environment.

    Returns:
      A :class:`jaxpost.runtime.credentials.Secret`, or None when no store has it.
    """
    return resolve_secret(name, explicit, sources=sources)


# JudgeSettings' defaults are the config's, so that the two cannot drift apart.
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ColabTrainingConfig)}


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Which judge :func:`build_judge` makes, and how: a value, not a whole config.

    Attributes:
      kind: "model", "api" or "lexical" (a config's ``judge``).
      model: for ``kind="model"``: "reference" (the session's own model) or a model source
        to load (a config's ``judge_model``).
      batch_size: rows per forward pass of a model judge.
      dtype, seed: what a judge model other than the reference is loaded with.
      api_base_url, api_model: for ``kind="api"``: the server (".../v1") and its model.
      api_key_name: the name of the secret holding the API key (never the key itself).
      api_timeout, api_retries, api_concurrency: seconds per request, tries after the
        first, requests in flight.
    """

    kind: str
    model: str = _CONFIG_DEFAULTS["judge_model"]
    batch_size: int = _CONFIG_DEFAULTS["judge_batch_size"]
    dtype: str = _CONFIG_DEFAULTS["dtype"]
    seed: int = _CONFIG_DEFAULTS["seed"]
    api_base_url: str = _CONFIG_DEFAULTS["judge_api_base_url"]
    api_model: str = _CONFIG_DEFAULTS["judge_api_model"]
    api_key_name: str = _CONFIG_DEFAULTS["judge_api_key_name"]
    api_timeout: float = _CONFIG_DEFAULTS["judge_api_timeout"]
    api_retries: int = _CONFIG_DEFAULTS["judge_api_retries"]
    api_concurrency: int = _CONFIG_DEFAULTS["judge_api_concurrency"]

    @classmethod
    def from_config(cls, config: Any) -> JudgeSettings:
        """The judge settings of a run's config: its ``judge``, ``judge_model``,
        ``judge_batch_size``, ``dtype``, ``seed`` and ``judge_api_*`` fields."""
        return cls(kind=config.judge, model=config.judge_model,
                   batch_size=config.judge_batch_size, dtype=config.dtype, seed=config.seed,
                   api_base_url=config.judge_api_base_url, api_model=config.judge_api_model,
                   api_key_name=config.judge_api_key_name,
                   api_timeout=config.judge_api_timeout,
                   api_retries=config.judge_api_retries,
                   api_concurrency=config.judge_api_concurrency)


def build_judge(settings: JudgeSettings, loaded=None, *, template: str | None = None,
                api_key=None) -> Any:
    """The judge ``settings`` ask for (``settings.kind``).

    Args:
      settings: the judge's kind and settings (:meth:`JudgeSettings.from_config` gives a
        run's).
      loaded: the session's loaded model; ``kind="model"`` with ``model="reference"``
        judges with it (no second load), any other ``model`` is loaded with
        :func:`jaxpost.models.loading.load_model` on its mesh.
      template: the chat template of ``loaded`` (the session's); default: the one its
        source implies (:func:`jaxpost.data.prompts.model_chat_template`).
      api_key: a Secret for ``kind="api"``; default: looked up by
        ``settings.api_key_name`` with :func:`resolve_judge_key`.

    Raises:
      ValueError: an unknown judge kind, a model judge without a model, or a bad API
        setting.
    """
    if settings.kind == "lexical":
        return LexicalJudge()
    if settings.kind == "api":
        key = api_key if api_key is not None else resolve_judge_key(settings.api_key_name)
        if key is None:
            logger.info("no secret %s found; calling the judge API without a key",
                        settings.api_key_name)
        return APIJudge(settings.api_base_url, settings.api_model, key,
                        timeout=settings.api_timeout, retries=settings.api_retries,
                        concurrency=settings.api_concurrency)
    if settings.kind != "model":
        raise ValueError(f"judge={settings.kind!r} is invalid: one of {JUDGE_KINDS}")
    if settings.model == REFERENCE_JUDGE:
        if loaded is None:
            raise ValueError("judge_model='reference' judges with the session's model; "
                             "pass loaded=")
        return ModelJudge(loaded, template or model_chat_template(loaded),
                          batch_size=settings.batch_size)
    judge_loaded = load_model(settings.model, dtype=settings.dtype,
                              mesh=None if loaded is None else loaded.mesh, seed=settings.seed)
    return ModelJudge(judge_loaded, resolve_chat_template(settings.model, "auto"),
                      batch_size=settings.batch_size)
