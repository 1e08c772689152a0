"""A causal language model as the judge of the rubric reward (:class:`ModelJudge`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpost.data.prompts import PromptFormat, format_prompt
from jaxpost.rewards.judge_common import (CRITERION_PROMPT, MODEL_SCALE, RUBRIC_PROMPT, JudgeStats,
                                          rubric_lines)
from jaxpost.rewards.rubrics import CriterionQuery, RubricQuery
from jaxpost.runtime.mesh import use_mesh
from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits
from jaxpost.tunix_ext.logps import positions_and_attention

# The judges log under one name, whichever module holds them.
logger = logging.getLogger("jaxpost.rewards.judges")


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
      loaded: a :class:`jaxpost.models.loading.LoadedModel` (model, tokenizer, mesh).
      template: chat template name of that model (``jaxpost.data.prompts``).
      batch_size: rows per forward pass.
      max_tokens: longest judge prompt in tokens; a longer one keeps its BOS and its
        last ``max_tokens - 1`` tokens (the criterion and the question to answer).
    """

    def __init__(self, loaded, template: str, batch_size: int = 16, max_tokens: int = 1024):

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

        model = nnx.merge(graphdef, state)
        mask = tokens != pad
        positions, attn = positions_and_attention(mask)
        if isinstance(model, Gemma3TrimmedLogits):
            # Unembedding only the last position: 262k-wide logits for one row, not all.
            logits, _ = model(tokens, positions, None, attn, decode_only_last_token=True)
        else:
            logits, _ = model(tokens, positions, None, attn)
        return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)

    def _prompt(self, body: str) -> str:
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
        prompts = [self._prompt(CRITERION_PROMPT.format(
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
        prompts = [self._prompt(RUBRIC_PROMPT.format(
            question=q.question, completion=q.completion, rubric=rubric_lines(q.rubric),
            scale=MODEL_SCALE)) for q in queries]
        lp = self._logprobs(prompts)
        digit_lp = lp[:, [d[0] for d in self._digits]]  # [n, 10]
        p = np.exp(digit_lp - np.logaddexp.reduce(digit_lp, axis=1, keepdims=True))
        ratings = 1.0 + p @ np.arange(10, dtype=np.float64)
        self.stats.add(calls=len(queries), seconds=time.perf_counter() - t0)
        return [float(r) for r in ratings]
