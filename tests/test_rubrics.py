"""Rubric data, the rubric reward's aggregations, the lexical judge and the rubric config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxpost.config import ColabTrainingConfig, get_preset
from jaxpost.data.datasets import load_examples, parse_dataset_spec, prepare_datasets
from jaxpost.rewards.judges import LexicalJudge
from jaxpost.rewards.registry import create_reward_functions, uses_judge
from jaxpost.rewards.rubrics import (
    Criterion,
    CriterionQuery,
    MalformedRubric,
    RubricJudgeError,
    explicit_reward,
    implicit_reward,
    parse_openrubrics_text,
    parse_rubric,
    rubric,
    rubric_to_json,
)

W = (5.0, 3.0, 1.0, 2.0)  # essential, important, optional, pitfall


class TableJudge:
    """Answers from a table: (completion, criterion) -> score; rubric ratings by completion."""

    def __init__(self, scores=None, ratings=None):
        self.scores = scores or {}
        self.ratings = ratings or {}
        self.seen = []

    def score_criteria(self, queries):
        self.seen.extend(queries)
        return [self.scores.get((q.completion, q.criterion)) for q in queries]

    def rate_rubrics(self, queries):
        self.seen.extend(queries)
        return [self.ratings.get(q.completion) for q in queries]


RUBRIC = (Criterion("Says that ice is less dense than water", "essential"),
          Criterion("Says that water expands when it freezes", "important"),
          Criterion("Mentions hydrogen bonds", "optional"),
          Criterion("Claims ice floats because it contains air", "pitfall"))


# ---------------------------------------------------------------------------
# Parsing


def test_parse_rubric_forms_and_weights():
    crit = parse_rubric(json.dumps([
        "Plain criterion",
        {"text": "Essential one", "category": "Essential"},
        {"description": "RaR style", "title": "t", "weight": 4},
        {"description": "Pitfall Criteria: wrong", "weight": -2},
        {"text": "Named pitfall", "category": "pitfall"},
    ]))
    assert [c.category for c in crit] == ["important", "essential", "important", "pitfall",
                                          "pitfall"]
    assert [c.signed_weight(W) for c in crit] == [3.0, 5.0, 4.0, -2.0, -2.0]
    assert parse_rubric(rubric_to_json(crit)) == crit


@pytest.mark.parametrize("raw, why", [
    ("not json", "not valid JSON"),
    ("{}", "not a list"),
    ("[]", "no criteria"),
    ('[{"weight": 3}]', "criterion 0 has no text"),
    ('["ok", {"text": "x", "weight": 0}]', "criterion 1 has weight 0"),
    ('[{"text": "x", "category": "vital"}]', "category 'vital'"),
    ('[{"text": "x", "category": "pitfall", "weight": 3}]', "contradicts"),
    ('[{"text": "x", "weight": true}]', "weight True"),
])
def test_malformed_rubrics_say_why(raw, why):
    with pytest.raises(MalformedRubric, match=why):
        parse_rubric(raw)


def test_openrubrics_text():
    text = ("1. The response must give the final answer in Celsius. [Hard Rule]\n"
            "Some preamble that is not a criterion\n"
            "- The response should explain each step clearly. [Principle]")
    crit = parse_openrubrics_text(text)
    assert [(c.text, c.category) for c in crit] == [
        ("The response must give the final answer in Celsius.", "essential"),
        ("The response should explain each step clearly.", "important")]
    with pytest.raises(MalformedRubric, match="no line tagged"):
        parse_openrubrics_text("just prose")


# ---------------------------------------------------------------------------
# Loaders


def test_rubric_jsonl_skips_malformed_rows_in_one_line(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    rows = [
        {"question": "Why is the sky blue?", "reference_answer": "Scattering.",
         "rubric": [{"text": "Mentions scattering", "category": "essential"}]},
        {"question": "Q2", "rubric": ["Plain"]},
        {"question": "Q3", "rubric": []},
        {"question": "", "rubric": ["x"]},
        {"question": "Q5", "rubric": [{"text": "x", "weight": "heavy"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    examples = load_examples(f"rubric-jsonl:{path}", seed=0)
    assert sorted(e["question"] for e in examples) == ["Q2", "Why is the sky blue?"]
    sky = next(e for e in examples if e["question"].startswith("Why"))
    assert sky["answer"] == "Scattering."
    assert parse_rubric(sky["rubric"]) == (Criterion("Mentions scattering", "essential"),)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "skipped" in line]
    assert len(warnings) == 1
    assert "skipped 4 of 6 rows" in warnings[0] and "malformed rubric" in warnings[0]


def test_rar_parquet_in_hub_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rubric_type = pa.list_(pa.struct([("description", pa.string()), ("title", pa.string()),
                                      ("weight", pa.int64())]))
    table = pa.table({
        "question": ["A patient has a fever. What should be checked first?", "Bad row"],
        "reference_answer": ["Vital signs.", "x"],
        "question_source": ["medical_o1", "medical_o1"],
        "rubric": pa.array([
            [{"description": "Essential Criteria: checks vital signs", "title": "Vitals",
              "weight": 5},
             {"description": "Pitfall Criteria: prescribes antibiotics at once",
              "title": "Antibiotics", "weight": -2}],
            [],
        ], type=rubric_type),
        "rubric_list": [["a", "b"], []],
        "rubric_count": [2, 0],
    })
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    examples = load_examples(f"rar-medicine:{tmp_path / 'data'}", seed=0)
    assert len(examples) == 1
    crit = parse_rubric(examples[0]["rubric"])
    assert [(c.category, c.signed_weight(W)) for c in crit] == [("important", 5.0),
                                                                 ("pitfall", -2.0)]
    assert examples[0]["answer"] == "Vital signs."


def test_openrubrics_jsonl_in_hub_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({
        "instruction": "Write a haiku about rain.",
        "rubric": "1. The response must have three lines. [Hard Rule]\n"
                  "2. The response should evoke the sound of rain. [Principle]",
        "source": "ultrafeedback"}) + "\n")
    [example] = load_examples(f"openrubrics:{path}", seed=0)
    assert example["question"] == "Write a haiku about rain."
    assert [c.category for c in parse_rubric(example["rubric"])] == ["essential", "important"]


def test_rubric_dataset_specs():
    assert parse_dataset_spec("rubric-demo#max=4").max_examples == 4
    assert parse_dataset_spec("rar-science:test").arg == "test"
    with pytest.raises(ValueError, match="rubric-jsonl needs a file path"):
        parse_dataset_spec("rubric-jsonl")
    with pytest.raises(ValueError, match="takes no options"):
        parse_dataset_spec("rar-medicine#question=q")


def test_demo_rubrics_load_and_the_prompt_flag():
    config = dataclasses.replace(get_preset("rubric_smoke"), max_steps=1)
    examples = load_examples(config.dataset, seed=0)
    assert 10 <= len(examples) <= 20
    assert any(parse_rubric(e["rubric"])[-1].is_pitfall for e in examples)
    hidden, _ = prepare_datasets(config)
    assert "judged on" not in str(hidden[0]["prompts"][0])
    shown, _ = prepare_datasets(dataclasses.replace(config, rubric_in_prompt=True))
    prompts = [str(p) for batch in shown for p in batch["prompts"]]
    assert all("Your answer will be judged on:" in p for p in prompts)
    assert any("- Avoid: Claims" in p for p in prompts)
    with pytest.raises(ValueError, match="rubric_in_prompt=True needs a rubric dataset"):
        prepare_datasets(dataclasses.replace(get_preset("smoke"), rubric_in_prompt=True))


# ---------------------------------------------------------------------------
# Aggregation


def test_explicit_reward_weights_and_pitfalls():
    assert explicit_reward(RUBRIC, [1, 1, 1, 0], W) == 1.0
    assert explicit_reward(RUBRIC, [1, 0, 0, 0], W) == pytest.approx(5 / 9)
    # A pitfall takes its weight away, relative to the positive total: (5 + 3 - 2) / 9.
    assert explicit_reward(RUBRIC, [1, 1, 0, 1], W) == pytest.approx(6 / 9)
    # Graded scores count in proportion.
    assert explicit_reward(RUBRIC, [0.5, 0.5, 0.5, 0.5], W) == pytest.approx((4.5 - 1) / 9)
    # Never below 0.
    assert explicit_reward(RUBRIC, [0, 0, 0, 1], W) == 0.0


def test_unscorable_criteria_are_left_out_not_zero():
    # Without the important criterion: (5 + 1) / (5 + 1) = 1, not (5 + 1) / 9.
    assert explicit_reward(RUBRIC, [1, None, 1, 0], W) == 1.0
    # Only the pitfall scored: 1 - share of pitfall weight triggered.
    assert explicit_reward(RUBRIC, [None, None, None, 0.25], W) == pytest.approx(0.75)
    with pytest.raises(RubricJudgeError, match="none of the 4 criteria"):
        explicit_reward(RUBRIC, [None] * 4, W)
    with pytest.raises(ValueError, match="outside"):
        explicit_reward(RUBRIC, [1.5, 0, 0, 0], W)


def test_implicit_reward():
    assert implicit_reward(1) == 0.0 and implicit_reward(10) == 1.0
    assert implicit_reward(7) == pytest.approx(6 / 9)
    with pytest.raises(RubricJudgeError):
        implicit_reward(None)
    with pytest.raises(ValueError, match="outside"):
        implicit_reward(11)


def _columns(completions, crit=RUBRIC):
    n = len(completions)
    return {"question": ["Why does ice float?"] * n, "rubric": [rubric_to_json(crit)] * n}


def test_rubric_reward_with_a_table_judge():
    good = "<reasoning>Water expands as it freezes.</reasoning><answer>Ice is less dense.</answer>"
    bad = "<reasoning>Air bubbles.</reasoning><answer>It contains air.</answer>"
    texts = [c.text for c in RUBRIC]
    judge = TableJudge(scores={
        **{(good, t): s for t, s in zip(texts, [1.0, 1.0, None, 0.0])},
        **{(bad, t): s for t, s in zip(texts, [0.0, 0.0, 0.0, 1.0])},
    }, ratings={good: 9.0, bad: 2.0})
    completions = [good + "<end_of_turn>", bad]
    scores = rubric(["p", "p"], completions, judge=judge, rubric_category_weights=W,
                    **_columns(completions))
    assert scores == [1.0, 0.0]
    # The end marker is not shown to the judge; every criterion was asked once.
    assert {q.completion for q in judge.seen} == {good, bad} and len(judge.seen) == 8
    implicit = rubric(["p", "p"], completions, judge=judge, rubric_aggregation="implicit",
                      **_columns(completions))
    assert implicit == pytest.approx([8 / 9, 1 / 9])


def test_rubric_reward_errors():
    cols = _columns(["a"])
    with pytest.raises(ValueError, match="needs a judge"):
        rubric(["p"], ["a"], **cols)
    with pytest.raises(ValueError, match="'rubric' column"):
        rubric(["p"], ["a"], judge=TableJudge(), question=["q"])
    with pytest.raises(ValueError, match="aggregation"):
        rubric(["p"], ["a"], judge=TableJudge(), rubric_aggregation="mean", **cols)
    with pytest.raises(RubricJudgeError):  # the table knows nothing: every criterion fails
        rubric(["p"], ["a"], judge=TableJudge(), **cols)


def test_create_reward_functions_binds_the_judge_and_config():
    config = dataclasses.replace(get_preset("rubric_smoke"), rubric_aggregation="implicit",
                                 reward_weights=(1.0, 2.0))
    assert uses_judge(config) and not uses_judge(get_preset("smoke"))
    with pytest.raises(ValueError, match="needs a judge"):
        create_reward_functions(config)
    judge = TableJudge(ratings={"x": 10.0})
    fmt, rub = create_reward_functions(config, judge=judge)
    assert rub.__name__ == "rubric"
    assert rub(prompts=["p"], completions=["x"], **_columns(["x"])) == [2.0]


# ---------------------------------------------------------------------------
# Lexical judge


def test_lexical_judge_is_graded_and_weak():
    judge = LexicalJudge()
    completions = ["Ice is less dense than liquid water because water expands on freezing.",
                   "Ice floats since it contains air."]
    scores = rubric(["p", "p"], completions, judge=judge, rubric_category_weights=W,
                    **_columns(completions))
    assert scores[0] > 0.6 > scores[1]
    # "Says that" and "the" are rubric phrasing: coverage counts content words only.
    [s] = judge.score_criteria([CriterionQuery("q", "Light goes faster.",
                                               "Says that light travels faster than sound")])
    assert s == pytest.approx(2 / 4)  # light, faster found; travels, sound missing
    stats = judge.stats.snapshot()
    assert stats["calls"] == 9 and stats["failures"] == 0


def test_lexical_judge_cannot_score_a_criterion_without_content_words():
    judge = LexicalJudge()
    assert judge.score_criteria([CriterionQuery("q", "anything", "Is correct.")]) == [None]
    assert judge.stats.snapshot()["failures"] == 1


# ---------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("changes, field", [
    ({"judge": "oracle"}, "judge="),
    ({"rubric_aggregation": "mean"}, "rubric_aggregation="),
    ({"rubric_category_weights": (5.0, 3.0, 1.0)}, "rubric_category_weights="),
    ({"rubric_category_weights": (5.0, 0.0, 1.0, 2.0)}, "rubric_category_weights="),
    ({"judge_model": "gpt:4"}, "judge_model="),
    ({"judge_api_key_name": "sk-abc123 secret"}, "judge_api_key_name='<hidden>'"),
    ({"judge_api_base_url": "ftp://x"}, "judge_api_base_url="),
    ({"judge": "api"}, "judge_api_base_url="),
    ({"judge": "api", "judge_api_base_url": "http://127.0.0.1:1/v1"}, "judge_api_model="),
    ({"judge_batch_size": 0}, "judge_batch_size="),
    ({"judge_api_retries": -1}, "judge_api_retries="),
])
def test_bad_judge_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")) as err:
        dataclasses.replace(get_preset("rubric_demo"), **changes)
    assert "sk-abc123" not in str(err.value)


def test_rubric_presets():
    demo = get_preset("rubric_demo")
    assert demo.model == "embedded:gemma3-270m" and demo.judge == "model"
    assert demo.judge_model == "reference" and "rubric" in demo.reward_functions
    smoke = get_preset("rubric_smoke")
    assert smoke.model == "random:gemma3-tiny" and smoke.max_steps == 2
    assert ColabTrainingConfig().judge == "model"  # unused unless "rubric" is a reward
