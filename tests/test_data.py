import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxpost.data.datasets import (
    DatasetSpec,
    load_examples,
    num_train_batches,
    parse_dataset_spec,
    prepare_datasets,
)

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"


def write_jsonl(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_config(dataset, **overrides):
    fields = dict(
        model="embedded:gemma3-270m",
        chat_template="auto",
        system_prompt="Use <{reasoning_tag}> and <{answer_tag}>.",
        reasoning_tag="reasoning",
        answer_tag="answer",
        dataset=dataset,
        max_examples=None,
        eval_size=6,
        seed=0,
        batch_size=4,
        num_batches=5,
        max_steps=None,
        num_iterations=1,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.fixture
def qa_file(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": i + 1, "source": "hand"} for i in range(30)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gsm8k", DatasetSpec("gsm8k")),
        ("gsm8k:test", DatasetSpec("gsm8k", "test")),
        ("gsm8k:/data/train.jsonl#max=100", DatasetSpec("gsm8k", "/data/train.jsonl", 100)),
        (
            "reasoning-gym:basic_arithmetic#min_terms=2&max_terms=2",
            DatasetSpec("reasoning-gym", "basic_arithmetic", None, {"min_terms": 2, "max_terms": 2}),
        ),
        (
            "reasoning-gym:chain_sum#max=50#min_digits=1&allow_negation=true&ratio=0.5",
            DatasetSpec(
                "reasoning-gym",
                "chain_sum",
                50,
                {"min_digits": 1, "allow_negation": True, "ratio": 0.5},
            ),
        ),
        (
            "jsonl:qa.jsonl#question=problem&answer=solution",
            DatasetSpec("jsonl", "qa.jsonl", None, {"question": "problem", "answer": "solution"}),
        ),
    ],
)
def test_parse_dataset_spec(spec, expected):
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty spec"),
        ("mnist", "unknown dataset kind 'mnist'"),
        ("gsm8k:", "nothing after 'gsm8k:'"),
        ("reasoning-gym", "needs a task name"),
        ("jsonl", "needs a file path"),
        ("gsm8k#max=0", "max='0'"),
        ("gsm8k#max=ten", "max='ten'"),
        ("gsm8k#split=test", "gsm8k takes no options"),
        ("jsonl:x.jsonl#label=y", "jsonl options"),
        ("jsonl:x.jsonl#question", "not KEY=VALUE"),
        ("jsonl:x.jsonl#question=a&question=b", "given twice"),
        ("reasoning-gym:basic_arithmetic#size=10", "set from #max and the seed"),
    ],
)
def test_parse_dataset_spec_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_dataset_spec(spec)
    assert "Valid forms" in str(info.value)
    assert "reasoning-gym:TASK" in str(info.value)


def test_gsm8k_jsonl_skips_malformed_rows(tmp_path, caplog, capsys):
    path = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "How much money?", "answer": "It is 1,000 + 234 = 1234.\n#### 1,234"},
            {"question": "No answer here"},
            {"question": "No marker", "answer": "the answer is 5"},
            '{"question": "broken json", "answer": ',
            {"question": "  ", "answer": "#### 2"},
            "",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.datasets"):
        examples = load_examples(f"gsm8k:{path}", seed=0)

    by_question = {e["question"]: e for e in examples}
    assert set(by_question) == {"How many?", "How much money?"}
    assert by_question["How much money?"]["answer"] == "1234"
    assert by_question["How much money?"]["solution"] == "It is 1,000 + 234 = 1234."
    assert by_question["How many?"]["answer"] == "7"

    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxpost.data.datasets"]
    assert len(warnings) == 1
    message = warnings[0]
    assert "skipped 4 of 6 rows" in message
    for reason in ("missing 'answer': 1", "no '####' in answer: 1", "invalid JSON: 1", "empty 'question': 1"):
        assert reason in message
    assert "skipped 4 of 6 rows" in capsys.readouterr().out


def test_no_warning_when_nothing_is_skipped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "#### 1"}])
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.datasets"):
        load_examples(f"gsm8k:{path}", seed=0)
    assert not [r for r in caplog.records if r.name == "jaxpost.data.datasets"]


def test_real_gsm8k_test_split():
    path = GSM8K_DIR / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K data not found at {path}")
    examples = load_examples(f"gsm8k:{path}", seed=0)
    assert len(examples) == 1319
    assert all(e["answer"] and "," not in e["answer"] and "####" not in e["answer"] for e in examples)
    janet = next(e for e in examples if e["question"].startswith("Janet\u2019s ducks lay 16 eggs"))
    assert janet["answer"] == "18"


def test_missing_file_names_path_and_format(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="####") as info:
        load_examples(f"gsm8k:{missing}", seed=0)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="question column"):
        load_examples(f"jsonl:{missing}", seed=0)


def test_jsonl_column_mapping_keeps_other_columns(qa_file):
    examples = load_examples(f"jsonl:{qa_file}#question=q&answer=a", seed=0)
    assert len(examples) == 30
    example = next(e for e in examples if e["question"] == "What is 4 + 1?")
    assert example == {"question": "What is 4 + 1?", "answer": "5", "source": "hand"}


def test_jsonl_default_columns_missing_skips_everything(qa_file):
    with pytest.raises(ValueError, match=f"jsonl:{qa_file}"):
        load_examples(f"jsonl:{qa_file}", seed=0)


def test_max_examples_spec_wins_over_argument(qa_file):
    spec = f"jsonl:{qa_file}#question=q&answer=a"
    assert len(load_examples(spec, seed=0, max_examples=7)) == 7
    assert len(load_examples(spec + "#max=3", seed=0, max_examples=7)) == 3


def test_load_examples_order_depends_on_seed_only(qa_file):
    spec = f"jsonl:{qa_file}#question=q&answer=a"
    first = [e["question"] for e in load_examples(spec, seed=1)]
    assert first == [e["question"] for e in load_examples(spec, seed=1)]
    assert first != [e["question"] for e in load_examples(spec, seed=2)]


def test_reasoning_gym_items():
    spec = "reasoning-gym:basic_arithmetic#min_terms=2&max_terms=2"
    examples = load_examples(spec, seed=3, max_examples=8)
    assert len(examples) == 8
    for example in examples:
        assert set(example) == {"question", "answer", "task", "entry"}
        assert example["task"] == "basic_arithmetic"
        entry = json.loads(example["entry"])
        assert entry["question"] == example["question"]
        assert str(entry["answer"]) == example["answer"]
        assert entry["metadata"]["num_terms"] == 2
    assert examples == load_examples(spec, seed=3, max_examples=8)
    assert examples != load_examples(spec, seed=4, max_examples=8)


def test_reasoning_gym_default_size():
    assert len(load_examples("reasoning-gym:basic_arithmetic", seed=0)) == 512


def test_reasoning_gym_unknown_task_and_option():
    with pytest.raises(ValueError, match="basic_arithmetic") as info:
        load_examples("reasoning-gym:basic_arithmetc", seed=0)
    assert "available tasks" in str(info.value)
    with pytest.raises(ValueError, match="no options \\['bogus'\\]"):
        load_examples("reasoning-gym:basic_arithmetic#bogus=1", seed=0)
    with pytest.raises(ValueError, match="invalid options"):
        load_examples("reasoning-gym:basic_arithmetic#min_terms=5&max_terms=2", seed=0)


def all_rows(dataset):
    rows = []
    for batch in dataset:
        rows.extend(batch["question"].tolist())
    return rows


def test_prepare_datasets_batches(qa_file):
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a")
    train, evaluation = prepare_datasets(config)

    batches = list(train)
    assert len(train) == len(batches) == 5
    for batch in batches:
        assert set(batch) == {"prompts", "question", "answer", "source"}
        prompts = batch["prompts"]
        assert isinstance(prompts, np.ndarray) and prompts.dtype.kind == "U"
        assert prompts.shape == (4,)
        for prompt, question in zip(prompts.tolist(), batch["question"].tolist()):
            assert prompt.startswith("<start_of_turn>user\nUse <reasoning> and <answer>.\n\n")
            assert prompt.endswith(f"{question}<end_of_turn>\n<start_of_turn>model\n")

    eval_questions = all_rows(evaluation)
    assert len(eval_questions) == 6 == len(set(eval_questions))
    assert not set(eval_questions) & set(all_rows(train))


def test_prepare_datasets_repeats_past_one_epoch(qa_file):
    # 24 train examples make 6 batches of 4; 10 batches need a second epoch.
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a", num_batches=10)
    train, evaluation = prepare_datasets(config)
    batches = list(train)
    assert len(batches) == 10
    assert all(b["prompts"].shape == (4,) for b in batches)
    train_questions = all_rows(train)
    assert len(set(train_questions)) == 24
    assert not set(train_questions) & set(all_rows(evaluation))


def test_prepare_datasets_is_deterministic(qa_file):
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a")
    first, _ = prepare_datasets(config)
    second, _ = prepare_datasets(config)
    assert all_rows(first) == all_rows(second)


def test_max_steps_counts_optimizer_steps():
    config = make_config("gsm8k", num_batches=100, max_steps=7, num_iterations=2)
    assert num_train_batches(config) == 4
    assert num_train_batches(make_config("gsm8k", num_batches=9)) == 9


def test_prepare_datasets_uses_max_steps(qa_file):
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a", max_steps=3, num_batches=50)
    train, _ = prepare_datasets(config)
    assert len(list(train)) == 3


def test_prepare_datasets_without_eval(qa_file):
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a", eval_size=0)
    train, evaluation = prepare_datasets(config)
    assert evaluation is None
    assert len(list(train)) == 5


def test_prepare_datasets_with_reasoning_gym():
    config = make_config(
        "reasoning-gym:basic_arithmetic", max_examples=20, eval_size=4, chat_template="chatml"
    )
    train, evaluation = prepare_datasets(config)
    batch = next(iter(train))
    assert set(batch) == {"prompts", "question", "answer", "task", "entry"}
    assert batch["prompts"][0].startswith("<|im_start|>system\n")
    assert batch["task"].tolist() == ["basic_arithmetic"] * 4
    assert len(all_rows(evaluation)) == 4


def test_empty_dataset_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}, "not json"])
    with pytest.raises(ValueError, match=f"gsm8k:{path}"):
        prepare_datasets(make_config(f"gsm8k:{path}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable examples"):
        prepare_datasets(make_config(f"jsonl:{empty}"))


def test_eval_size_too_large(qa_file):
    with pytest.raises(ValueError, match="eval_size=30.*30 examples"):
        prepare_datasets(make_config(f"jsonl:{qa_file}#question=q&answer=a", eval_size=30))


def test_too_few_train_examples_for_a_batch(qa_file):
    config = make_config(f"jsonl:{qa_file}#question=q&answer=a", eval_size=27)
    with pytest.raises(ValueError, match="3 train examples.*batch_size=4"):
        prepare_datasets(config)


def test_prepare_datasets_makes_columns_batchable(tmp_path, caplog):
    rows = [
        {"question": f"q{i}", "answer": str(i), "tags": ["x", i], **({"note": "n"} if i % 2 else {})}
        for i in range(12)
    ]
    path = write_jsonl(tmp_path / "extra.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="jaxpost.data.datasets"):
        train, _ = prepare_datasets(make_config(f"jsonl:{path}", eval_size=2, num_batches=2))
    batch = next(iter(train))
    assert set(batch) == {"prompts", "question", "answer", "tags"}
    assert json.loads(batch["tags"][0]) == ["x", int(batch["answer"][0])]
    assert any("['note']" in r.getMessage() for r in caplog.records)


def test_comma_separated_option_becomes_tuple():
    spec = parse_dataset_spec("reasoning-gym:basic_arithmetic#operators=+,-&max_terms=2")
    assert spec.options == {"operators": ("+", "-"), "max_terms": 2}
