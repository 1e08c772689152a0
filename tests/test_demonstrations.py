"""Demonstrations for the SFT warm-up: worked solutions, arithmetic rationales checked by
reasoning-gym's verifier, users' question/completion files, and bad input."""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import pytest

from jaxpost.config import DEFAULT_DATASET
from jaxpost.data.demonstrations import (
    Demonstration,
    check_sft_data_spec,
    load_demonstrations,
    strip_calculator_notes,
)
from jaxpost.data.rationales import RATIONALE_BUILDERS, evaluation_steps
from jaxpost.rewards.answers import extract_answer
from jaxpost.rewards.builtin import format_exact

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def well_formed(demos, reasoning_tag="reasoning", answer_tag="answer"):
    completions = [d.completion for d in demos]
    return format_exact(None, completions, reasoning_tag=reasoning_tag,
                        answer_tag=answer_tag) == [1.0] * len(demos)


def skip_message(caplog):
    [record] = [r for r in caplog.records if r.name == "jaxpost.data.demonstrations"]
    return record.getMessage()


# ---------------------------------------------------------------------------
# Step-by-step evaluation


@pytest.mark.parametrize("expression, chain, value", [
    ("4 - 1", "4 - 1 = 3", 3),
    ("3 + 4 * 2", "3 + 4 * 2 = 3 + 8 = 11", 11),
    ("3 + 4 * 2 - (5 - 1)", "3 + 4 * 2 - (5 - 1) = 3 + 4 * 2 - 4 = 3 + 8 - 4 = 11 - 4 = 7", 7),
    ("10 - 3 - 2", "10 - 3 - 2 = 7 - 2 = 5", 5),                  # left to right
    ("8 / 4 / 2", "8 / 4 / 2 = 2 / 2 = 1", 1),
    ("2 * (3 + 4 * (1 + 1))", "2 * (3 + 4 * (1 + 1)) = 2 * (3 + 4 * 2) = 2 * (3 + 8) "
     "= 2 * 11 = 22", 22),                                        # innermost first
    ("5 - 9", "5 - 9 = -4", -4),                                  # negative result
    ("2 - -1", "2 - -1 = 3", 3),                                  # negative operand
    ("( 56 + -33 ) - 84", "(56 + -33) - 84 = 23 - 84 = -61", -61),
    ("-(3 + 4) * 2", "-(3 + 4) * 2 = -7 * 2 = -14", -14),         # negated group
    ("3+-4*2", "3 + -4 * 2 = 3 + -8 = -5", -5),                   # no spaces
    ("7 / 2 * 2", "7 / 2 * 2 = (7/2) * 2 = 7", 7),                # exact, not floored
    ("1 / 3", "1 / 3 = (1/3)", Fraction(1, 3)),
    ("42", "42", 42),
])
def test_evaluation_steps(expression, chain, value):
    stages, result = evaluation_steps(expression)
    assert " = ".join(stages) == chain
    assert result == value


@pytest.mark.parametrize("expression, message", [
    ("1 / (2 - 2)", "division by zero"),
    ("3 ^ 2", "expected an operator"),
    ("3 +", "incomplete"),
    ("(3 + 4", "incomplete"),
    ("3 + 4)", "expected an operator"),
    ("x + 1", "expected a number"),
    ("", "incomplete"),
])
def test_evaluation_steps_rejects_bad_expressions(expression, message):
    with pytest.raises(ValueError, match=message):
        evaluation_steps(expression)


def test_strip_calculator_notes():
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\n"
                "Natalia  sold 48+24 = <<48+24=72>>72 clips altogether.  ")
    assert strip_calculator_notes(solution) == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.")
    assert strip_calculator_notes("Since 4 < 4.8 < 5, buy 5") == "Since 4 < 4.8 < 5, buy 5"


# ---------------------------------------------------------------------------
# reasoning-gym


def test_auto_on_the_default_dataset_gives_verified_arithmetic():
    from jaxpost.data.datasets import load_examples
    from jaxpost.rewards.builtin import reasoning_gym

    demos = load_demonstrations("auto", dataset=DEFAULT_DATASET, seed=0, max_examples=64)
    examples = load_examples(DEFAULT_DATASET, seed=0, max_examples=64)
    assert len(demos) == len(examples) == 64  # + and - only: no rationale is dropped
    assert [d.question for d in demos] == [e["question"] for e in examples]
    assert well_formed(demos)
    for demo, example in zip(demos, examples):
        a, op, b = demo.question.removeprefix("Calculate ").removesuffix(".").split()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert demo.answer == example["answer"] == str(expected)
        assert demo.completion == (f"<reasoning>{a} {op} {b} = {expected}</reasoning>\n"
                                   f"<answer>{expected}</answer>")
    scores = reasoning_gym([""] * len(demos), [d.completion for d in demos],
                           task=[e["task"] for e in examples], entry=[e["entry"] for e in examples])
    assert scores == [1.0] * len(demos)


def test_rationales_that_miss_the_reference_are_dropped(caplog):
    """reasoning-gym evaluates its parenthesis-free expressions left to right
    ("2 + 3 * 4" -> 20), so a precedence-respecting rationale disagrees with some
    references; those demonstrations are dropped, never given a wrong rationale."""
    spec = ("reasoning-gym:basic_arithmetic#operators=+,*&allow_parentheses=false"
            "&min_terms=3&max_terms=3&min_digits=1&max_digits=1")
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.demonstrations"):
        demos = load_demonstrations(spec, dataset=DEFAULT_DATASET, seed=0, max_examples=40)
    message = skip_message(caplog)
    assert "another value than the reference" in message
    dropped = int(message.split("skipped ")[1].split(" of 40")[0])
    assert 0 < dropped < 40 and len(demos) == 40 - dropped
    assert well_formed(demos)
    for demo in demos:
        reasoning = demo.completion.split("</reasoning>")[0].removeprefix("<reasoning>")
        expression = reasoning.split(" = ")[0]
        assert evaluation_steps(expression)[1] == Fraction(demo.answer)
        assert reasoning.split(" = ")[-1] == demo.answer


def test_the_task_verifier_has_the_last_word(monkeypatch):
    calls = []

    def reject(task):
        def score(answer, entry):
            calls.append((task, answer, entry["answer"]))
            return 0.0
        return score

    monkeypatch.setattr("jaxpost.rewards.builtin._reasoning_gym_scorer", reject)
    with pytest.raises(ValueError, match="no usable demonstrations: 8 rejected by the task's "
                                         "verifier"):
        load_demonstrations("auto", dataset=DEFAULT_DATASET, seed=0, max_examples=8)
    assert len(calls) == 8
    assert all(task == "basic_arithmetic" and answer == reference
               for task, answer, reference in calls)


def test_chain_sum_rationales():
    demos = load_demonstrations("reasoning-gym:chain_sum#max=10", dataset=DEFAULT_DATASET, seed=1)
    assert len(demos) == 10 and well_formed(demos)
    for demo in demos:
        expression = demo.question.split(": ")[-1].removesuffix(" =")
        assert demo.completion.startswith(f"<reasoning>{expression} = ")
        assert demo.answer == str(eval(expression))  # only + and - between integers


def test_task_without_a_rationale_builder_fails_before_generating(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("examples were loaded")

    monkeypatch.setattr("jaxpost.data.datasets.load_examples", boom)
    with pytest.raises(ValueError, match="leg_counting.*no rationale builder") as info:
        check_sft_data_spec("reasoning-gym:leg_counting")
    for name in (*RATIONALE_BUILDERS, "sft-jsonl:PATH"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="auto.*no rationale builder"):
        load_demonstrations("auto", dataset="reasoning-gym:leg_counting", seed=0)


# ---------------------------------------------------------------------------
# GSM8K and jsonl worked solutions


def test_real_gsm8k_train_split():
    path = GSM8K_DIR / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K data not found at {path} "
                    "(expected ../shared/data/gsm8k beside the repo)")
    demos = load_demonstrations(f"gsm8k:{path}", dataset=DEFAULT_DATASET, seed=0)
    assert len(demos) == 7473
    assert well_formed(demos)
    assert not any("<<" in d.completion or ">>" in d.completion for d in demos)
    natalia = next(d for d in demos if d.question.startswith("Natalia sold clips to 48"))
    assert natalia == Demonstration(
        natalia.question,
        "<reasoning>Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.</reasoning>\n"
        "<answer>72</answer>",
        "72")


def test_gsm8k_file_skips_rows_without_a_usable_solution(tmp_path, caplog):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "What is 1 + 1?", "answer": "#### 2"},                    # no solution
        {"question": "What is 3 + 3?", "answer": "<<3+3=6>>\n#### 6"},         # notes only
        {"question": "What is 4 + 4?", "answer": "Put it in <answer>8</answer>\n#### 8"},
    ])
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.demonstrations"):
        demos = load_demonstrations(f"gsm8k:{path}", dataset=DEFAULT_DATASET, seed=0)
    assert demos == [Demonstration("What is 2 + 3?",
                                   "<reasoning>2 + 3 = 5</reasoning>\n<answer>5</answer>", "5")]
    assert skip_message(caplog).endswith(
        "skipped 3 of 4 demonstrations: 2 without reasoning, 1 malformed")


def test_jsonl_reasoning_columns_and_custom_tags(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": i + 1, "work": f"{i} + 1 = {i + 1}",
             "solution": "unused"} for i in range(5)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    demos = load_demonstrations(f"jsonl:{path}#question=q&answer=a&reasoning=work",
                                dataset=DEFAULT_DATASET, seed=0, reasoning_tag="think",
                                answer_tag="final")
    assert len(demos) == 5 and well_formed(demos, "think", "final")
    three = next(d for d in demos if d.question == "What is 3 + 1?")
    assert three.completion == "<think>3 + 1 = 4</think>\n<final>4</final>"
    # Without #reasoning, a "solution" column is used.
    demos = load_demonstrations(f"jsonl:{path}#question=q&answer=a", dataset=DEFAULT_DATASET,
                                seed=0)
    assert {d.completion for d in demos} == {
        f"<reasoning>unused</reasoning>\n<answer>{i + 1}</answer>" for i in range(5)}


def test_auto_uses_the_run_dataset(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": f"q{i}", "answer": str(i), "reasoning": f"r{i}"} for i in range(6)])
    demos = load_demonstrations("auto", dataset=f"jsonl:{path}#max=4", seed=3)
    assert len(demos) == 4
    assert all(d.completion == f"<reasoning>r{d.answer}</reasoning>\n<answer>{d.answer}</answer>"
               for d in demos)


def test_source_without_a_worked_solution_column_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "1", "note": "x"}])
    with pytest.raises(ValueError, match=r"no worked-solution column: found columns "
                                         r"\['answer', 'note', 'question'\], expected one of "
                                         r"\['reasoning', 'solution'\]"):
        load_demonstrations(f"jsonl:{path}", dataset=DEFAULT_DATASET, seed=0)
    with pytest.raises(ValueError, match=r"expected one of \['work'\]"):
        load_demonstrations(f"jsonl:{path}#reasoning=work", dataset=DEFAULT_DATASET, seed=0)


def test_no_demonstration_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "q1", "answer": "1", "reasoning": "  "},
        {"question": "q2", "answer": "2", "reasoning": "see </reasoning> here"},
    ])
    with pytest.raises(ValueError, match="no usable demonstrations: 1 without reasoning, "
                                         "1 malformed"):
        load_demonstrations(f"jsonl:{path}", dataset=DEFAULT_DATASET, seed=0)


# ---------------------------------------------------------------------------
# sft-jsonl


def test_sft_jsonl_keeps_well_formed_completions(tmp_path, caplog):
    good = "<reasoning>2 + 2 = 4</reasoning>\n<answer>4</answer>"
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "What is 2 + 2?", "target": good},
        {"prompt": "What is 3 + 3?", "target": "<reasoning>3 + 3</reasoning><answer>6</answer>"
                                               "<end_of_turn>"},
        {"prompt": "What is 1 + 1?", "target": "It is 2."},                       # untagged
        {"prompt": "What is 5 + 5?", "target": "<reasoning>a</reasoning><reasoning>b"
                                               "</reasoning><answer>10</answer>"},  # repeated
        {"prompt": "What is 6 + 6?", "target": "<reasoning></reasoning><answer>12</answer>"},
        {"prompt": "What is 8 + 8?", "target": "<reasoning>8 + 8</reasoning><answer> </answer>"},
        {"prompt": "What is 7 + 7?"},                                               # no target
        "not json",
    ])
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.demonstrations"):
        demos = load_demonstrations(f"sft-jsonl:{path}#question=prompt&completion=target",
                                    dataset=DEFAULT_DATASET, seed=0)
    assert sorted(demos, key=lambda d: d.answer) == [
        Demonstration("What is 2 + 2?", good, "4"),
        Demonstration("What is 3 + 3?", "<reasoning>3 + 3</reasoning><answer>6</answer>", "6"),
    ]
    assert well_formed(demos)
    message = skip_message(caplog)
    assert "skipped 6 of 8 demonstrations: 3 malformed, " in message
    for reason in ("1 without answer", "1 without completion", "1 invalid JSON"):
        assert reason in message


def test_sft_jsonl_cap_and_order(tmp_path):
    rows = [{"question": f"q{i}", "completion": f"<reasoning>r</reasoning><answer>{i}</answer>"}
            for i in range(20)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    first = load_demonstrations(f"sft-jsonl:{path}#max=5", dataset=DEFAULT_DATASET, seed=1)
    assert len(first) == 5
    assert first == load_demonstrations(f"sft-jsonl:{path}", dataset=DEFAULT_DATASET, seed=1,
                                        max_examples=5)
    assert first != load_demonstrations(f"sft-jsonl:{path}#max=5", dataset=DEFAULT_DATASET,
                                        seed=2)
    assert all(extract_answer(d.completion) == d.answer for d in first)


def test_sft_jsonl_without_a_completion_column_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no completion column: found columns "
                                         r"\['answer', 'question'\], expected 'completion'"):
        load_demonstrations(f"sft-jsonl:{path}", dataset=DEFAULT_DATASET, seed=0)
    with pytest.raises(ValueError, match=r"no question column.*expected 'prompt'"):
        load_demonstrations(f"sft-jsonl:{path}#question=prompt", dataset=DEFAULT_DATASET, seed=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_demonstrations(f"sft-jsonl:{tmp_path / 'nope.jsonl'}", dataset=DEFAULT_DATASET,
                            seed=0)


# ---------------------------------------------------------------------------
# Spec checks


@pytest.mark.parametrize("spec", [
    "auto", "gsm8k", "gsm8k:train", "gsm8k:/data/train.jsonl#max=100",
    "jsonl:x.jsonl#question=q&answer=a&reasoning=r", "reasoning-gym:basic_arithmetic#max_terms=3",
    "reasoning-gym:chain_sum", "sft-jsonl:x.jsonl",
    "sft-jsonl:x.jsonl#question=q&completion=c&max=3",
])
def test_check_sft_data_spec_accepts(spec):
    check_sft_data_spec(spec)


@pytest.mark.parametrize("spec, message", [
    ("", "empty spec"),
    ("bogus:x", "unknown kind 'bogus'"),
    ("rubric-demo", "hold rubrics, not worked solutions"),
    ("sft-jsonl", "needs a file path"),
    ("sft-jsonl:x.jsonl#answer=a", "sft-jsonl options are"),
    ("sft-jsonl:x.jsonl#max=0", "max='0' is not a positive integer"),
    ("sft-jsonl:x.jsonl#question", "is not KEY=VALUE"),
    ("gsm8k#foo=1", "gsm8k takes no options"),
])
def test_check_sft_data_spec_rejects(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        check_sft_data_spec(spec)
    assert repr(spec) in str(info.value)
    assert "Valid forms" in str(info.value)
