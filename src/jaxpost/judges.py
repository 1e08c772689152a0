"""Judges for the rubric reward: a language model, an OpenAI-compatible API, or keywords.

Every judge answers two kinds of question (see :class:`jaxpost.rubrics.Judge`):

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
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpost.config import JUDGE_KINDS, REFERENCE_JUDGE  # noqa: F401  (re-exported)
from jaxpost.rubrics import CATEGORIES, CriterionQuery, RubricQuery

logger = logging.getLogger("jaxpost.judges")


_CRITERION_PROMPT = (
    "You grade answers. Read the question, the answer and one criterion, then reply "
    "with a single word: Yes if the answer meets the criterion, No if it does not.\n\n"
    "Question: {question}\n\nAnswer: {completion}\n\nCriterion: {criterion}\n\n"
    "Does the answer meet the criterion? Reply Yes or No.")
_RUBRIC_PROMPT = (
    "You grade answers. Read the question, the answer and the rubric, then rate how well "
    "the answer meets the rubric. Items marked 'pitfall' are mistakes that lower the "
    "rating.\n\nQuestion: {question}\n\nAnswer: {completion}\n\nRubric:\n{rubric}\n\n"
    "{scale}")
_API_SCALE = "Reply with one integer from 1 (meets none) to 10 (meets all), nothing else."
# A small model's next token is one digit, so it rates 0-9; rating = 1 + digit.
_MODEL_SCALE = "Reply with one digit from 0 (meets none) to 9 (meets all)."


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


def _rubric_lines(rubric) -> str:
    return "\n".join(f"- ({c.category}) {c.text}" for c in rubric)


# ---------------------------------------------------------------------------
# Lexical


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
        from jaxpost.rubrics import RubricJudgeError, explicit_reward

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


# ---------------------------------------------------------------------------
# Model


def _bucket(n: int, step: int = 64) -> int:
    """The next multiple of ``step`` >= n: few shapes (few compiles), little padding.

    Powers of two would waste up to half of each row; judge prompts of a run differ
    mostly by completion length, which max_new_tokens bounds, so the multiples of 64
    in use stay few.
    """
    return max(step, -(-n // step) * step)


def _single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = []
    for w in words:
        toks = list(tokenizer.encode(w))
        if toks and toks[0] == tokenizer.bos_id():
            toks = toks[1:]
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(int(toks[0]))
    return ids


class ModelJudge:
    """A causal LM as judge, read from its next-token probabilities.

    For a criterion the judge sees one chat turn (question, answer, criterion, "Reply
    Yes or No") and s = P(yes) / (P(yes) + P(no)), where P(yes) sums the probabilities
    of the single-token spellings "Yes", "yes", " Yes", " yes" (likewise for no). For a
    rubric rating it is asked for a digit 0-9 and the rating is 1 + E[digit] under the
    next-token distribution renormalised over the ten digits, in [1, 10].

    Rows are scored ``batch_size`` at a time, left-padded to a multiple of 64 tokens
    and to a full batch, so the jitted forward pass compiles once per length bucket. The model's state is an argument of the jitted function, not a
    constant in it, so a trained model can be judged without a recompile.

    Args:
      loaded: a :class:`jaxpost.models.LoadedModel` (model, tokenizer, mesh).
      template: chat template name of that model (``jaxpost.prompts``).
      batch_size: rows per forward pass.
      max_tokens: longest judge prompt in tokens; a longer one keeps its BOS and its
        last ``max_tokens - 1`` tokens (the criterion and the question to answer).
    """

    def __init__(self, loaded, template: str, batch_size: int = 16, max_tokens: int = 1024):
        import jax
        from flax import nnx

        from jaxpost.prompts import PromptFormat

        self.loaded = loaded
        self.template = template
        # The judge's own turn: the model's template, no system text.
        self._format = PromptFormat(template)
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens)
        self.stats = JudgeStats()
        tok = loaded.tokenizer
        self._yes = _single_token_ids(tok, ["Yes", "yes", " Yes", " yes"])
        self._no = _single_token_ids(tok, ["No", "no", " No", " no"])
        self._digits = [_single_token_ids(tok, [str(d)]) for d in range(10)]
        if not self._yes or not self._no or any(len(d) != 1 for d in self._digits):
            raise ValueError(f"judge model {loaded.source!r}: its tokenizer has no single-token "
                             "'Yes'/'No' or digits; use judge=api or another judge_model")
        self._pad = int(tok.pad_id())
        # The graph structure (no arrays) is fixed here; the parameters are arguments.
        graphdef, _ = nnx.split(loaded.model)
        self._forward = jax.jit(functools.partial(self._last_logprobs, graphdef, self._pad))

    @staticmethod
    def _last_logprobs(graphdef, pad, state, tokens):
        """Log-probabilities of the next token after each row: [batch, vocab]."""
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from tunix.sft import utils as sft_utils

        from jaxpost.fast_logits import Gemma3TrimmedLogits

        model = nnx.merge(graphdef, state)
        mask = tokens != pad
        positions = sft_utils.build_positions_from_mask(mask)
        attn = sft_utils.make_causal_attn_mask(mask)
        if isinstance(model, Gemma3TrimmedLogits):
            # Unembedding only the last position: 262k-wide logits for one row, not all.
            logits, _ = model(tokens, positions, None, attn, decode_only_last_token=True)
        else:
            logits, _ = model(tokens, positions, None, attn)
        return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)

    def _prompt(self, body: str) -> str:
        from jaxpost.prompts import format_prompt

        return format_prompt(body, self._format)

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        tok = self.loaded.tokenizer
        out = []
        for p in prompts:
            ids = list(tok.encode(p))
            if len(ids) > self.max_tokens:
                logger.warning("judge prompt of %d tokens cut to its last %d", len(ids),
                               self.max_tokens)
                ids = ids[:1] + ids[-(self.max_tokens - 1):]
            out.append(ids)
        return out

    def _logprobs(self, prompts: list[str]) -> np.ndarray:
        """[len(prompts), vocab] next-token log-probabilities, batch by batch."""
        from flax import nnx

        from jaxpost.mesh import use_mesh

        pad = self._pad
        ids = self._encode(prompts)
        state = nnx.state(self.loaded.model)
        rows = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            length = _bucket(max(len(x) for x in chunk))
            tokens = np.full((self.batch_size, length), pad, dtype=np.int32)  # [batch, seq]
            for i in range(self.batch_size):
                x = chunk[i] if i < len(chunk) else chunk[0]  # filler rows: a copy of row 0
                tokens[i, length - len(x):] = x  # left-padded: the last position is the end
            with use_mesh(self.loaded.mesh):
                lp = self._forward(state, tokens)
            rows.append(np.asarray(lp)[: len(chunk)])
        return np.concatenate(rows, axis=0)

    def score_criteria(self, queries: Sequence[CriterionQuery]) -> list[float | None]:
        if not queries:
            return []
        t0 = time.perf_counter()
        prompts = [self._prompt(_CRITERION_PROMPT.format(
            question=q.question, completion=q.completion, criterion=q.criterion))
            for q in queries]
        lp = self._logprobs(prompts)
        yes = np.logaddexp.reduce(lp[:, self._yes], axis=1)
        no = np.logaddexp.reduce(lp[:, self._no], axis=1)
        scores = 1.0 / (1.0 + np.exp(no - yes))  # P(yes) / (P(yes) + P(no))
        self.stats.add(calls=len(queries), seconds=time.perf_counter() - t0)
        return [float(s) for s in scores]

    def rate_rubrics(self, queries: Sequence[RubricQuery]) -> list[float | None]:
        if not queries:
            return []
        t0 = time.perf_counter()
        prompts = [self._prompt(_RUBRIC_PROMPT.format(
            question=q.question, completion=q.completion, rubric=_rubric_lines(q.rubric),
            scale=_MODEL_SCALE)) for q in queries]
        lp = self._logprobs(prompts)
        digit_lp = lp[:, [d[0] for d in self._digits]]  # [n, 10]
        p = np.exp(digit_lp - np.logaddexp.reduce(digit_lp, axis=1, keepdims=True))
        ratings = 1.0 + p @ np.arange(10, dtype=np.float64)
        self.stats.add(calls=len(queries), seconds=time.perf_counter() - t0)
        return [float(r) for r in ratings]


# ---------------------------------------------------------------------------
# API


class JudgeRequestError(RuntimeError):
    """An API judge request failed for good (after retries); the key is never in it."""


class APIJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint as judge.

    Each criterion is one request (temperature 0) asking for Yes or No; the first word
    of the reply decides (s = 1.0 or 0.0); any other reply is unparsable and leaves the
    criterion unscored. A rubric rating asks for an integer 1-10 (the first integer in
    the reply, if in range). Requests run ``concurrency`` at a time; a timeout, a
    connection error, HTTP 429 or 5xx is retried up to ``retries`` times with
    exponential backoff (``backoff`` x 2^attempt seconds); other HTTP errors are not.
    Replies are cached by (question, completion, criterion) -- or the whole rubric for
    ratings -- so a repeated completion costs no request.

    The key (a :class:`jaxpost.credentials.Secret`, or None for servers without one)
    goes only into the ``Authorization`` header; logs and exceptions have it redacted.
    """

    def __init__(self, base_url: str, model: str, api_key=None, *, timeout: float = 30.0,
                 retries: int = 3, concurrency: int = 4, backoff: float = 0.5,
                 max_tokens: int = 8):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge_api_base_url={base_url!r} is invalid: must start with "
                             "http:// or https://")
        if not model:
            raise ValueError("judge_api_model is empty: name the judge model the server serves")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.concurrency = int(concurrency)
        self.backoff = float(backoff)
        self.max_tokens = int(max_tokens)
        self.stats = JudgeStats()
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"APIJudge(url={self.url!r}, model={self.model!r}, key={'***' if self._key else None})"

    def _redact(self, text: str) -> str:
        from jaxpost.credentials import redact

        return redact(text, [self._key.reveal()] if self._key is not None else [])

    def _post(self, content: str) -> str:
        """The reply text of one chat request, with retries; raises JudgeRequestError."""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.stats.add(calls=1)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = f"malformed response ({type(e).__name__})"
                break
        raise JudgeRequestError(self._redact(f"judge request to {self.url} failed after "
                                             f"{attempt + 1} attempt(s): {last}"))

    def _ask(self, key: str, content: str) -> str | None:
        with self._lock:
            if key in self._cache:
                self.stats.add(cache_hits=1)
                return self._cache[key]
        try:
            reply = self._post(content)
        except JudgeRequestError as e:
            logger.warning("%s", e)
            return None
        with self._lock:
            self._cache[key] = reply
        return reply

    def _run(self, items: list[tuple[str, str]]) -> list[str | None]:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(lambda kc: self._ask(*kc), items))
        self.stats.add(seconds=time.perf_counter() - t0)
        return replies

    @staticmethod
    def _cache_key(*parts: str) -> str:
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def score_criteria(self, queries: Sequence[CriterionQuery]) -> list[float | None]:
        items = [(self._cache_key("criterion", q.question, q.completion, q.criterion),
                  _CRITERION_PROMPT.format(question=q.question, completion=q.completion,
                                           criterion=q.criterion)) for q in queries]
        out: list[float | None] = []
        for q, reply in zip(queries, self._run(items)):
            word = re.match(r"\W*(\w+)", reply or "")
            decision = {"yes": 1.0, "no": 0.0}.get(word.group(1).lower() if word else "")
            if reply is not None and decision is None:
                logger.warning("judge reply %r to criterion %r is neither Yes nor No; the "
                               "criterion is left unscored", reply[:80], q.criterion[:80])
            if decision is None:
                self.stats.add(failures=1)
            out.append(decision)
        return out

    def rate_rubrics(self, queries: Sequence[RubricQuery]) -> list[float | None]:
        items = [(self._cache_key("rubric", q.question, q.completion, _rubric_lines(q.rubric)),
                  _RUBRIC_PROMPT.format(question=q.question, completion=q.completion,
                                        rubric=_rubric_lines(q.rubric), scale=_API_SCALE))
                 for q in queries]
        out: list[float | None] = []
        for reply in self._run(items):
            m = re.search(r"\d+", reply or "")
            rating = float(m.group()) if m and 1 <= int(m.group()) <= 10 else None
            if reply is not None and rating is None:
                logger.warning("judge reply %r holds no rating from 1 to 10", reply[:80])
            if rating is None:
                self.stats.add(failures=1)
            out.append(rating)
        return out


def resolve_judge_key(name: str, explicit: str | None = None, sources=None):
    """The API key called ``name``, looked up like the hub secrets: explicit value,
    Colab secrets, Kaggle secrets, then the environment.

    Returns:
      A :class:`jaxpost.credentials.Secret`, or None when no store has it.
    """
    from jaxpost.credentials import resolve_secret

    return resolve_secret(name, explicit, sources=sources)


def build_judge(config: Any, loaded=None, *, template: str | None = None,
                api_key=None) -> Any:
    """The judge a config asks for (``config.judge``).

    Args:
      config: reads ``judge``, ``judge_model``, ``judge_batch_size``, ``dtype``, ``seed``
        and the ``judge_api_*`` fields.
      loaded: the session's loaded model; ``judge="model"`` with
        ``judge_model="reference"`` judges with it (no second load), any other
        ``judge_model`` is loaded with :func:`jaxpost.models.load_model` on its mesh.
      template: the chat template of ``loaded`` (default: resolved from the config).
      api_key: a Secret for ``judge="api"``; default: looked up by
        ``config.judge_api_key_name`` with :func:`resolve_judge_key`.

    Raises:
      ValueError: an unknown judge kind, a model judge without a model, or a bad API
        setting.
    """
    from jaxpost.prompts import resolve_chat_template

    if config.judge == "lexical":
        return LexicalJudge()
    if config.judge == "api":
        key = api_key if api_key is not None else resolve_judge_key(config.judge_api_key_name)
        if key is None:
            logger.info("no secret %s found; calling the judge API without a key",
                        config.judge_api_key_name)
        return APIJudge(config.judge_api_base_url, config.judge_api_model, key,
                        timeout=config.judge_api_timeout, retries=config.judge_api_retries,
                        concurrency=config.judge_api_concurrency)
    if config.judge != "model":
        raise ValueError(f"judge={config.judge!r} is invalid: one of {JUDGE_KINDS}")
    if config.judge_model == REFERENCE_JUDGE:
        if loaded is None:
            raise ValueError("judge_model='reference' judges with the session's model; "
                             "pass loaded=")
        template = template or resolve_chat_template(config.model, config.chat_template)
        return ModelJudge(loaded, template, batch_size=config.judge_batch_size)
    from jaxpost.models import load_model

    judge_loaded = load_model(config.judge_model, dtype=config.dtype,
                              mesh=None if loaded is None else loaded.mesh, seed=config.seed)
    return ModelJudge(judge_loaded, resolve_chat_template(config.judge_model, "auto"),
                      batch_size=config.judge_batch_size)
