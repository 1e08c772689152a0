"""DPO's preference pairs: spec checks, preference files with bad rows, and pairs from
scored completions."""

from __future__ import annotations

import json
import logging
import math

import pytest

from jaxpost.config import ColabTrainingConfig
from jaxpost.data.preferences import (
    best_and_worst,
    check_preference_data_spec,
    load_preference_jsonl,
    pairs_from_groups,
    score_completions,
)
from jaxpost.rewards.registry import create_reward_functions


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("spec", ["self", " self+demonstrations ", "preference-jsonl:p.jsonl",
                                  "preference-jsonl:~/p.jsonl#question=q&chosen=a&rejected=b",
                                  "preference-jsonl:p.jsonl#max=3"])
def test_good_specs_pass(spec):
    check_preference_data_spec(spec)


@pytest.mark.parametrize("spec,message", [
    ("", "empty spec"),
    ("gsm8k", "no chosen and rejected completions"),
    ("jsonl:qa.jsonl", "no chosen and rejected completions"),
    ("rubric-demo", "no chosen and rejected completions"),
    ("preferences:p.jsonl", "unknown kind 'preferences'"),
    ("preference-jsonl", "needs a file path"),
    ("preference-jsonl:p.jsonl#answer=x", "options are"),
    ("preference-jsonl:p.jsonl#max=0", "max='0' is not a positive integer"),
    ("preference-jsonl:p.jsonl#chosen=x&rejected=x", "name the same column"),
    ("preference-jsonl:p.jsonl#chosen", "is not KEY=VALUE"),
])
def test_bad_specs_fail_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        check_preference_data_spec(spec)
    assert "Valid forms" in str(info.value)


def test_preference_file_keeps_good_rows_and_counts_bad_ones(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "What is 1 + 1?", "chosen": "<answer>2</answer><end_of_turn>",
         "rejected": "<answer>3</answer>"},
        {"question": "What is 2 + 2?", "chosen": "4", "rejected": "5", "extra": 1},
        "not json",
        "[1, 2]",
        {"question": "q", "chosen": "same", "rejected": " same "},
        {"question": "q", "chosen": "", "rejected": "x"},
        {"question": "q", "chosen": "x"},
        {"question": ["q"], "chosen": "x", "rejected": "y"},
    ])
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.preferences"):
        pairs = load_preference_jsonl(f"preference-jsonl:{path}", seed=0)
    assert sorted(p.question for p in pairs) == ["What is 1 + 1?", "What is 2 + 2?"]
    first = next(p for p in pairs if p.question == "What is 1 + 1?")
    # The end marker goes: the trainer appends the model's own.
    assert (first.chosen, first.rejected) == ("<answer>2</answer>", "<answer>3</answer>")
    assert first.chosen_ids is None and first.prompt is None
    [record] = [r for r in caplog.records if r.name == "jaxpost.data.preferences"]
    message = record.getMessage()
    assert "skipped 6 of 8 rows" in message
    for reason in ("1 invalid JSON", "1 not a JSON object",
                   "1 chosen equal to rejected", "1 empty chosen", "1 without rejected",
                   "1 non-string question"):
        assert reason in message, (reason, message)


def test_preference_file_columns_by_name_prompt_fallback_and_max(tmp_path):
    rows = [{"prompt": f"Q{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs = load_preference_jsonl(f"preference-jsonl:{path}#chosen=good&rejected=bad&max=3",
                                  seed=1)
    assert len(pairs) == 3
    assert all(p.chosen == "g" + p.question[1:] and p.rejected == "b" + p.question[1:]
               for p in pairs)
    again = load_preference_jsonl(f"preference-jsonl:{path}#chosen=good&rejected=bad&max=3",
                                  seed=1)
    assert pairs == again  # the same seed, the same order
    capped = load_preference_jsonl(f"preference-jsonl:{path}#chosen=good&rejected=bad",
                                   seed=1, max_examples=2)
    assert len(capped) == 2


@pytest.mark.parametrize("rows,spec_tail,message", [
    ([{"text": "q", "chosen": "a", "rejected": "b"}], "",
     r"no question column: found columns \['chosen', 'rejected', 'text'\], expected one of "
     r"\['question', 'prompt'\]"),
    ([{"question": "q", "chosen": "a", "rejected": "b"}], "#question=ask",
     "no question column"),
    ([{"question": "q", "preferred": "a", "rejected": "b"}], "",
     r"no chosen column: found columns \['preferred', 'question', 'rejected'\]"),
    ([{"question": "q", "chosen": "a", "worse": "b"}], "", "no rejected column"),
])
def test_preference_file_without_a_column_fails_naming_it(tmp_path, rows, spec_tail, message):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_preference_jsonl(f"preference-jsonl:{path}{spec_tail}", seed=0)


def test_preference_file_without_usable_rows_or_missing_fails(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ValueError, match="no usable pairs: 1 chosen equal to rejected"):
        load_preference_jsonl(f"preference-jsonl:{path}", seed=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preference_jsonl(f"preference-jsonl:{tmp_path / 'missing.jsonl'}", seed=0)


def test_best_and_worst_skips_ties_and_prefers_earlier_candidates():
    assert best_and_worst([0.0, 2.0, 1.0]) == (1, 0)
    assert best_and_worst([1.0, 1.0, 1.0]) is None
    assert best_and_worst([]) is None
    # Equal best scores: the first (a sample, listed before a demonstration) is chosen;
    # equal worst scores: the first is rejected.
    assert best_and_worst([3.0, 0.0, 0.0, 3.0]) == (0, 1)


def test_pairs_from_groups_pairs_best_with_worst_and_counts_ties():
    pairs, ties = pairs_from_groups(
        ["q1", "q2", "q3"],
        [["a", "b", "c"], ["d", "e"], ["f", "g", "h"]],
        [[0.5, 2.0, -1.0], [1.0, 1.0], [0.0, 0.0, 1.0]],
        ids=[[(1,), (2,), (3,)], [(4,), (5,)], [(6,), (7,), None]],
        prompts=["P1", "P2", "P3"])
    assert ties == 1
    assert [(p.question, p.chosen, p.rejected) for p in pairs] == [("q1", "b", "c"),
                                                                  ("q3", "h", "f")]
    assert (pairs[0].chosen_score, pairs[0].rejected_score) == (2.0, -1.0)
    assert (pairs[0].chosen_ids, pairs[0].rejected_ids, pairs[0].prompt) == ((2,), (3,), "P1")
    assert pairs[1].chosen_ids is None  # a text candidate, tokenized later
    with pytest.raises(ValueError, match="not finite"):
        pairs_from_groups(["q"], [["a", "b"]], [[1.0, math.nan]])
    with pytest.raises(ValueError, match="2 candidates and 1 scores"):
        pairs_from_groups(["q"], [["a", "b"]], [[1.0]])
    with pytest.raises(ValueError, match="one of each per group"):
        pairs_from_groups(["q", "r"], [["a", "b"]], [[1.0, 0.0]])


def test_scores_are_the_runs_weighted_reward_sum():
    config = ColabTrainingConfig(reward_functions=("format_exact", "answer_match"),
                                 reward_weights=(1.0, 2.0))
    fns = create_reward_functions(config)
    completions = ["<reasoning>1 + 1 = 2</reasoning>\n<answer>2</answer>",
                   "<reasoning>1 + 1 = 3</reasoning>\n<answer>3</answer>",
                   "two"]
    totals = score_completions(fns, ["Calculate 1 + 1."] * 3, completions,
                               {"question": ["Calculate 1 + 1."] * 3, "answer": ["2"] * 3})
    assert totals == [3.0, 1.0, 0.0]

    def nan_reward(prompts, completions, **kwargs):
        return [math.nan, 1.0, 0.5]

    def short_reward(prompts, completions, **kwargs):
        return [1.0]

    assert score_completions([nan_reward], ["p"] * 3, ["a", "b", "c"], {}) == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="returned 1 values for 3 completions"):
        score_completions([short_reward], ["p"] * 3, ["a", "b", "c"], {})
