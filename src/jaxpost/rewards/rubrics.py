"""Rubrics as rewards: rubric data, its loaders, and the ``rubric`` reward's aggregation.

A rubric is a list of criteria, each a short statement about a good (or bad) answer to
one question, with a weight or a category (Gunjal et al. 2025, "Rubrics as Rewards",
arXiv 2507.17746; Liu et al. 2025, "OpenRubrics", arXiv 2510.07743):

* ``essential``, ``important``, ``optional``: things a good answer does; satisfying one
  adds its weight.
* ``pitfall``: a mistake; committing one subtracts its weight.

A criterion with an explicit ``weight`` uses it (a negative weight makes it a pitfall);
otherwise its category's weight comes from the config (``rubric_category_weights``, in
the order of :data:`CATEGORIES`; the pitfall entry is the size of the penalty).

In a dataset the rubric travels as a JSON string column ``rubric`` holding the
normalised criteria ``[{"text": str, "category": str, "weight": float | null}, ...]``
(Grain batches only scalar columns), next to ``question`` and ``answer`` (the
reference answer, possibly empty).

The judges that decide criteria live in :mod:`jaxpost.rewards.judges`; this module combines
their decisions into one reward per completion (:func:`explicit_reward`,
:func:`implicit_reward`) and registers nothing by itself: :mod:`jaxpost.rewards.registry` lists
:func:`rubric` in its registry.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from jaxpost.data.jsonl import read_jsonl
from jaxpost.data.prompts import strip_end_marker

logger = logging.getLogger("jaxpost.rewards.rubrics")

# The criteria's categories, in the order of a rubric_category_weights tuple.
CATEGORIES = ("essential", "important", "optional", "pitfall")
# RaR's own scale: Essential 5, Important 3-4, Optional 1-2, Pitfall -1 to -2.
DEFAULT_CATEGORY_WEIGHTS = (5.0, 3.0, 1.0, 2.0)
AGGREGATIONS = ("explicit", "implicit")

DEMO_RUBRICS = "rubrics_demo.jsonl"

# Hub datasets: name -> (repo id, default split). Columns are mapped in _ROW_MAPPERS.
HUB_RUBRIC_DATASETS = {
    "rar-medicine": ("ScaleAI/RaR-Medicine", "train"),
    "rar-science": ("ScaleAI/RaR-Science", "train"),
    "openrubrics": ("OpenRubrics/OpenRubric-v2", "train"),
}
# OpenRubrics writes one criterion per line, tagged "[Hard Rule]" or "[Principle]".
_OPENRUBRICS_TAGS = {"hard rule": "essential", "principle": "important"}
_OPENRUBRICS_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*])?\s*(?P<text>.*?)\s*"
                               r"\[(?P<tag>hard rule|principle)\]\s*\.?\s*$", re.IGNORECASE)


class MalformedRubric(ValueError):
    """A rubric that cannot be used; the message says why (used to count skipped rows)."""


class RubricJudgeError(RuntimeError):
    """No criterion of a completion could be scored: the reward would be undefined."""


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One rubric criterion.

    Attributes:
      text: the statement the judge checks (non-empty).
      category: one of :data:`CATEGORIES`.
      weight: explicit weight, or None to use the category's weight. Positive for
        criteria to satisfy, negative for pitfalls.
    """

    text: str
    category: str = "important"
    weight: float | None = None

    @property
    def is_pitfall(self) -> bool:
        return self.category == "pitfall"

    def signed_weight(self, category_weights: Sequence[float] = DEFAULT_CATEGORY_WEIGHTS) -> float:
        """The weight with its sign: > 0 for a criterion to satisfy, < 0 for a pitfall."""
        if self.weight is not None:
            return float(self.weight)
        w = float(category_weights[CATEGORIES.index(self.category)])
        return -w if self.is_pitfall else w

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "category": self.category, "weight": self.weight}


Rubric = tuple[Criterion, ...]


# ---------------------------------------------------------------------------
# Parsing


def _criterion(item: Any, where: str) -> Criterion:
    if isinstance(item, str):
        text, category, weight = item, "important", None
    elif isinstance(item, Mapping):
        text = item.get("text", item.get("description"))
        category = item.get("category")
        weight = item.get("weight")
    else:
        raise MalformedRubric(f"{where} is a {type(item).__name__}, not a str or object")
    if not isinstance(text, str) or not text.strip():
        raise MalformedRubric(f"{where} has no text")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight == 0:
            raise MalformedRubric(f"{where} has weight {weight!r}; expected a non-zero number")
        weight = float(weight)
    if category is None:
        category = "important" if weight is None or weight > 0 else "pitfall"
    if not isinstance(category, str) or category.lower() not in CATEGORIES:
        raise MalformedRubric(f"{where} has category {category!r}; expected one of {CATEGORIES}")
    category = category.lower()
    if weight is not None and (weight < 0) != (category == "pitfall"):
        raise MalformedRubric(f"{where}: category {category!r} contradicts weight {weight}")
    return Criterion(text.strip(), category, weight)


def parse_rubric(raw: Any) -> Rubric:
    """Criteria from a rubric in any accepted form.

    Accepts a list (or a JSON string of a list) whose items are plain strings
    (category "important"), or objects with ``text`` (or ``description``, RaR's name)
    and an optional ``weight`` (non-zero number; negative = pitfall) and/or
    ``category`` (one of :data:`CATEGORIES`, any case). Without either, a criterion is
    "important".

    Raises:
      MalformedRubric: not a non-empty list, an item without text, a bad weight or
        category, or a category that contradicts the weight's sign; the message says
        which item.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MalformedRubric(f"rubric is not valid JSON ({e.msg})") from None
    if not isinstance(raw, (list, tuple)) or isinstance(raw, (str, bytes)):
        raise MalformedRubric(f"rubric is a {type(raw).__name__}, not a list of criteria")
    if not raw:
        raise MalformedRubric("rubric has no criteria")
    return tuple(_criterion(item, f"criterion {i}") for i, item in enumerate(raw))


def rubric_to_json(rubric: Sequence[Criterion]) -> str:
    """The dataset-column form of a rubric (see the module docstring)."""
    return json.dumps([c.to_json() for c in rubric], ensure_ascii=False)


def parse_openrubrics_text(text: Any) -> Rubric:
    """Criteria from OpenRubrics' text form: one per line, ending in ``[Hard Rule]`` or
    ``[Principle]`` (numbering or bullets allowed). Hard rules become "essential",
    principles "important"; other lines are ignored.

    Raises:
      MalformedRubric: not a string, or no tagged line.
    """
    if not isinstance(text, str):
        raise MalformedRubric(f"rubric is a {type(text).__name__}, not OpenRubrics text")
    criteria = []
    for line in text.splitlines():
        m = _OPENRUBRICS_LINE.match(line)
        if m and m.group("text"):
            criteria.append(Criterion(m.group("text"), _OPENRUBRICS_TAGS[m.group("tag").lower()]))
    if not criteria:
        raise MalformedRubric("no line tagged [Hard Rule] or [Principle]")
    return tuple(criteria)


# ---------------------------------------------------------------------------
# Row mapping and loaders


def _example(question: Any, reference: Any, rubric: Rubric) -> dict[str, Any]:
    if not isinstance(question, str) or not question.strip():
        raise MalformedRubric("missing or empty question")
    ref = reference if isinstance(reference, str) else ("" if reference is None else str(reference))
    return {"question": question.strip(), "answer": ref.strip(), "rubric": rubric_to_json(rubric)}


def rubric_jsonl_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """jaxpost's rubric JSONL: ``question``, optional ``reference_answer`` (or
    ``answer``), ``rubric`` (see :func:`parse_rubric`)."""
    reference = row.get("reference_answer", row.get("answer"))
    return _example(row.get("question"), reference, parse_rubric(row.get("rubric")))


def rar_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """RaR-Medicine / RaR-Science (ScaleAI): ``question``, ``reference_answer`` and
    ``rubric``, a list of ``{"title", "description", "weight"}`` with integer weights
    (negative for pitfalls). ``rubric_list``, ``rubric_count`` and ``question_source``
    are not used."""
    items = row.get("rubric")
    if hasattr(items, "tolist"):  # a numpy array from parquet
        items = items.tolist()
    return _example(row.get("question"), row.get("reference_answer"), parse_rubric(items))


def openrubrics_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """OpenRubrics: the prompt in ``instruction`` (or ``prompt``), the rubric as text
    in ``rubric`` (:func:`parse_openrubrics_text`); no reference answer.

    The repo id comes from the dataset cards; these column names follow the paper's
    description and were not checked against the hub files, so a mismatch shows up as
    every row skipped ("missing or empty question" / "not OpenRubrics text")."""
    question = row.get("instruction", row.get("prompt"))
    return _example(question, None, parse_openrubrics_text(row.get("rubric")))


_ROW_MAPPERS = {"rubric-jsonl": rubric_jsonl_row, "rubric-demo": rubric_jsonl_row,
                "rar-medicine": rar_row, "rar-science": rar_row, "openrubrics": openrubrics_row}


def demo_rubrics_path() -> Path:
    """The shipped example rubrics: short science explanations a small model can try."""
    return Path(str(resources.files("jaxpost") / "assets" / DEMO_RUBRICS))


def _read_rows(path: Path, skipped: collections.Counter) -> list[dict]:
    """Rows of a local JSONL or parquet file (a directory: its files, sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .jsonl or .parquet files")
        return [row for f in files for row in _read_rows(f, skipped)]
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"rubric dataset file {path} not found")
        # pyarrow is a heavy import: only for a parquet file
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path, "JSONL or parquet rows with question and rubric columns", skipped)


def _hub_rows(repo: str, split: str) -> list[dict]:
    import datasets  # heavy; only needed for hub datasets

    return [dict(r) for r in datasets.load_dataset(repo, split=split)]


def policy_rubric(rubric: Any) -> list[str]:
    """A rubric as the policy's prompt lists it: each criterion's text, pitfalls
    (negative weights) as "Avoid: ..." so that they do not read as goals.

    Args:
      rubric: any form :func:`parse_rubric` accepts (the `rubric`
        column of a rubric dataset: a list of criteria, or its JSON).

    Raises:
      MalformedRubric: as :func:`parse_rubric`.
    """
    return [f"Avoid: {c.text}" if c.is_pitfall else c.text for c in parse_rubric(rubric)]


def load_rubric_rows(kind: str, arg: str | None, skipped: collections.Counter) -> list[dict]:
    """Examples ``{"question", "answer", "rubric"}`` of one rubric dataset.

    Args:
      kind: "rubric-demo", "rubric-jsonl", or a key of :data:`HUB_RUBRIC_DATASETS`.
      arg: a local file or directory (JSONL or parquet, in the hub dataset's own
        columns for hub kinds), or for hub kinds a split name (default: train).
      skipped: counts rows left out, by reason (malformed rubrics included).

    Raises:
      FileNotFoundError: a local path that does not exist.
      ValueError: an unknown kind.
    """
    if kind not in _ROW_MAPPERS:
        raise ValueError(f"unknown rubric dataset kind {kind!r}; known: {sorted(_ROW_MAPPERS)}")
    if kind == "rubric-demo":
        rows = _read_rows(demo_rubrics_path(), skipped)
    elif kind == "rubric-jsonl":
        rows = _read_rows(Path(arg).expanduser(), skipped)
    else:
        repo, split = HUB_RUBRIC_DATASETS[kind]
        local = Path(arg).expanduser() if arg else None
        if local is not None and (local.exists() or "/" in arg or "." in arg):
            rows = _read_rows(local, skipped)
        else:
            rows = _hub_rows(repo, arg or split)
    mapper = _ROW_MAPPERS[kind]
    examples = []
    for row in rows:
        try:
            examples.append(mapper(row))
        except MalformedRubric as e:
            # The index in the message differs per row; count by its kind only.
            skipped["malformed rubric: " + re.sub(r"criterion \d+", "criterion N", str(e))] += 1
    return examples


# ---------------------------------------------------------------------------
# Aggregation


class Judge(Protocol):
    """What the rubric reward needs from a judge (see :mod:`jaxpost.rewards.judges`)."""

    def score_criteria(self, queries: Sequence["CriterionQuery"]) -> list[float | None]: ...

    def rate_rubrics(self, queries: Sequence["RubricQuery"]) -> list[float | None]: ...


@dataclasses.dataclass(frozen=True)
class CriterionQuery:
    """Does ``completion`` (the answer to ``question``) satisfy ``criterion``?"""

    question: str
    completion: str
    criterion: str


@dataclasses.dataclass(frozen=True)
class RubricQuery:
    """How well does ``completion`` meet the whole ``rubric``, from 1 to 10?"""

    question: str
    completion: str
    rubric: Rubric


def explicit_reward(rubric: Sequence[Criterion], scores: Sequence[float | None],
                    category_weights: Sequence[float] = DEFAULT_CATEGORY_WEIGHTS) -> float:
    """RaR's explicit aggregation of per-criterion judge decisions, in [0, 1].

    With s_j in [0, 1] the judge's score of criterion j (1 = satisfied; for a pitfall,
    1 = the mistake was made), w_j its signed weight (:meth:`Criterion.signed_weight`),
    S the criteria the judge could score (``scores[j] is not None``), P = {j in S:
    w_j > 0} and N = {j in S: w_j < 0}:

        reward = clip( (sum_{P} w_j s_j - sum_{N} |w_j| s_j) / sum_{P} w_j , 0, 1 )

    so satisfying every scored criterion and no pitfall gives 1, and pitfalls take
    away their weight relative to the positive total. When no positive criterion was
    scored (a rubric of pitfalls only, or their scores failed):
    reward = 1 - sum_{N} |w_j| s_j / sum_{N} |w_j|. Unscored criteria are left out of
    both sums, never counted as 0.

    Raises:
      RubricJudgeError: no criterion was scored.
      ValueError: ``scores`` and ``rubric`` differ in length, or a score is outside [0, 1].
    """
    if len(scores) != len(rubric):
        raise ValueError(f"{len(scores)} scores for a rubric of {len(rubric)} criteria")
    pos = neg = pos_total = neg_total = 0.0
    scored = 0
    for criterion, s in zip(rubric, scores):
        if s is None:
            continue
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"judge score {s!r} for {criterion.text!r} is outside [0, 1]")
        scored += 1
        w = criterion.signed_weight(category_weights)
        if w > 0:
            pos, pos_total = pos + w * s, pos_total + w
        else:
            neg, neg_total = neg + (-w) * s, neg_total - w
    if not scored:
        raise RubricJudgeError(f"the judge could score none of the {len(rubric)} criteria")
    if pos_total == 0.0:
        return 1.0 - neg / neg_total
    return min(1.0, max(0.0, (pos - neg) / pos_total))


def implicit_reward(rating: float | None) -> float:
    """RaR's implicit aggregation: the judge's 1-10 rating of the whole rubric,
    mapped linearly to [0, 1] as (rating - 1) / 9.

    Raises:
      RubricJudgeError: the judge gave no rating.
      ValueError: a rating outside [1, 10].
    """
    if rating is None:
        raise RubricJudgeError("the judge gave no rating for the rubric")
    if not 1.0 <= rating <= 10.0:
        raise ValueError(f"judge rating {rating!r} is outside [1, 10]")
    return (rating - 1.0) / 9.0


def rubric(
    prompts: list[str],
    completions: list[str],
    *,
    judge: Judge | None = None,
    rubric_aggregation: str = "explicit",
    rubric_category_weights: Sequence[float] = DEFAULT_CATEGORY_WEIGHTS,
    question: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Rubric reward: a judge checks the completion against its question's rubric.

    Needs the dataset columns ``rubric`` (JSON, see the module docstring) and
    ``question``; ``judge`` is bound by :func:`jaxpost.rewards.registry.create_reward_functions`
    (the session builds it). ``rubric_aggregation="explicit"``: the judge scores each
    criterion and :func:`explicit_reward` combines them; ``"implicit"``: the judge
    rates the whole rubric from 1 to 10 and :func:`implicit_reward` maps it. The
    completion is judged whole (reasoning and answer), less a trailing end marker.

    Range: [0.0, 1.0].

    Raises:
      ValueError: no judge, a missing or misaligned column, a malformed rubric, or an
        unknown aggregation.
      RubricJudgeError: the judge could score no criterion of some completion (after
        its retries); this stops the training step rather than reward it with 0.
    """
    del prompts
    if judge is None:
        raise ValueError("the rubric reward needs a judge: set judge in the config and build "
                         "the rewards with create_reward_functions(config, judge=...)")
    if rubric_aggregation not in AGGREGATIONS:
        raise ValueError(f"rubric_aggregation={rubric_aggregation!r} is not one of {AGGREGATIONS}")
    raw_rubrics = kwargs.get("rubric")
    for name, col in (("rubric", raw_rubrics), ("question", question)):
        if col is None:
            raise ValueError(f"rubric needs a {name!r} column in the dataset (use a rubric "
                             f"dataset such as rubric-demo); got columns: {sorted(kwargs)}")
        if len(col) != len(completions):
            raise ValueError(f"rubric: column {name!r} has {len(col)} values for "
                             f"{len(completions)} completions")
    rubrics = [parse_rubric(str(r)) for r in raw_rubrics]
    texts = [strip_end_marker(c) for c in completions]
    questions = [str(q) for q in question]
    if rubric_aggregation == "implicit":
        ratings = judge.rate_rubrics([RubricQuery(q, t, r)
                                      for q, t, r in zip(questions, texts, rubrics)])
        return [implicit_reward(x) for x in ratings]
    queries = [CriterionQuery(q, t, c.text)
               for q, t, r in zip(questions, texts, rubrics) for c in r]
    scores = judge.score_criteria(queries)
    failed = sum(s is None for s in scores)
    if failed:
        logger.warning("rubric: the judge could not score %d of %d criteria; they are left "
                       "out of their completions' rewards", failed, len(scores))
    out, start = [], 0
    for r in rubrics:
        out.append(explicit_reward(r, scores[start:start + len(r)], rubric_category_weights))
        start += len(r)
    return out
