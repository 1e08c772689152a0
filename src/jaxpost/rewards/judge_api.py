"""An OpenAI-compatible chat-completions server as the judge of the rubric reward
(:class:`APIJudge`)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from jaxpost.rewards.judge_common import (API_SCALE, CRITERION_PROMPT, RUBRIC_PROMPT, JudgeStats,
                                          rubric_lines)
from jaxpost.rewards.rubrics import CriterionQuery, RubricQuery
from jaxpost.runtime.credentials import redact

# The judges log under one name, whichever module holds them.
logger = logging.getLogger("jaxpost.rewards.judges")


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

    The key (a :class:`jaxpost.runtime.credentials.Secret`, or None for servers without one)
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
                  CRITERION_PROMPT.format(question=q.question, completion=q.completion,
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
        items = [(self._cache_key("rubric", q.question, q.completion, rubric_lines(q.rubric)),
                  RUBRIC_PROMPT.format(question=q.question, completion=q.completion,
                                       rubric=rubric_lines(q.rubric), scale=API_SCALE))
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
