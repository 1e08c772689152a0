"""The notebook's helpers that show a config's prompts, data and rewards without a model:
``format_prompt``, ``prepare_datasets`` and ``create_reward_functions`` of
``jaxpost.colab_pipeline``, checked against what training itself builds."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxpost import colab_pipeline
from jaxpost.colab_pipeline import (create_reward_functions, format_prompt, get_preset,
                                    prepare_datasets)
from jaxpost.data.prompts import PromptFormat, system_text

QUESTION = "What is 7 + 5?"


@pytest.fixture(scope="module")
def smoke():
    return get_preset("smoke")


@pytest.fixture(scope="module")
def smoke_data(smoke):
    return prepare_datasets(smoke)


def _examples(dataset):
    """The items of a batched dataset, one dict per example."""
    out = []
    for batch in dataset:
        for i in range(len(batch["prompts"])):
            out.append({k: v[i] for k, v in batch.items()})
    return out


def test_helpers_are_public():
    for name in ("format_prompt", "prepare_datasets", "create_reward_functions"):
        assert name in colab_pipeline.__all__
        assert getattr(colab_pipeline, name).__doc__


# ---------------------------------------------------------------------------
# format_prompt


def test_prompt_holds_question_and_system_prompt(smoke):
    prompt = format_prompt(QUESTION, smoke)
    assert QUESTION in prompt
    system = system_text(smoke)
    assert system and system in prompt
    # The format instructions name both tags.
    assert "<reasoning>" in prompt and "<answer>" in prompt
    # The tiny random model is a Gemma: its chat turn, ending where the model answers.
    assert prompt.startswith("<start_of_turn>user\n")
    assert prompt.endswith("<start_of_turn>model\n")
    assert prompt.index(system) < prompt.index(QUESTION)


def test_prompt_follows_the_configs_template_and_system_prompt(smoke):
    chatml = dataclasses.replace(smoke, chat_template="chatml",
                                 system_prompt="Answer in <{answer_tag}> tags only.")
    prompt = format_prompt(QUESTION, chatml)
    assert prompt == ("<|im_start|>system\nAnswer in <answer> tags only.<|im_end|>\n"
                      f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    bare = dataclasses.replace(smoke, chat_template="none", system_prompt="")
    assert format_prompt(f"  {QUESTION}\n", bare) == f"{QUESTION}\n"


def test_prompt_equals_the_training_prompts(smoke, smoke_data):
    train, evaluation = smoke_data
    examples = _examples(train) + _examples(evaluation)
    assert examples
    for example in examples:
        assert format_prompt(str(example["question"]), smoke) == str(example["prompts"])


def test_prompt_rejects_an_empty_question(smoke):
    with pytest.raises(ValueError, match="question"):
        format_prompt("   ", smoke)


def test_rubric_is_listed_as_training_lists_it():
    config = dataclasses.replace(get_preset("rubric_smoke"), rubric_in_prompt=True)
    train, evaluation = prepare_datasets(config)
    examples = _examples(train) + _examples(evaluation)
    for example in examples:
        with_rubric = format_prompt(str(example["question"]), config,
                                    rubric=str(example["rubric"]))
        assert with_rubric == str(example["prompts"])
        assert with_rubric != format_prompt(str(example["question"]), config)
        assert "Your answer will be judged on:" in with_rubric
    # Pitfalls read as things to avoid, in the order of the rubric.
    rubric = json.dumps([{"text": "Names the unit", "weight": 2},
                         {"text": "Guesses without reasoning", "weight": -1}])
    prompt = format_prompt(QUESTION, config, rubric=rubric)
    assert ("Your answer will be judged on:\n- Names the unit\n"
            "- Avoid: Guesses without reasoning") in prompt


def test_rubric_is_left_out_unless_the_config_shows_it():
    config = get_preset("rubric_smoke")
    assert not config.rubric_in_prompt
    train, _ = prepare_datasets(config)
    example = _examples(train)[0]
    prompt = format_prompt(str(example["question"]), config, rubric=str(example["rubric"]))
    assert prompt == str(example["prompts"])
    assert "judged on" not in prompt


def test_malformed_rubric_is_refused(smoke):
    from jaxpost.rewards.rubrics import MalformedRubric

    config = dataclasses.replace(smoke, rubric_in_prompt=True)
    with pytest.raises(MalformedRubric):
        format_prompt(QUESTION, config, rubric="not json")


def test_prompt_format_gives_the_same_text(smoke):
    fmt = PromptFormat.from_config(smoke)
    assert fmt.template == "gemma"
    from jaxpost.data.prompts import format_prompt as format_with

    assert format_with(QUESTION, fmt) == format_prompt(QUESTION, smoke)
    assert format_with(QUESTION, smoke) == format_prompt(QUESTION, smoke)


def test_prompt_format_refuses_unresolved_template():
    with pytest.raises(ValueError, match="template='auto'"):
        PromptFormat("auto")


# ---------------------------------------------------------------------------
# prepare_datasets


def test_datasets_hold_the_configs_task_and_disjoint_questions(smoke, smoke_data):
    train, evaluation = smoke_data
    assert evaluation is not None
    train_examples, eval_examples = _examples(train), _examples(evaluation)
    assert len(eval_examples) == smoke.eval_size
    assert len(train) > 0 and len(train_examples) == len(train) * smoke.batch_size
    # The default data: reasoning-gym's sums and differences of two one-digit numbers.
    for example in train_examples + eval_examples:
        assert example["task"] == "basic_arithmetic"
        assert str(example["prompts"]).strip()
        assert json.loads(str(example["entry"]))["question"] == example["question"]
    train_questions = {str(e["question"]) for e in train_examples}
    eval_questions = {str(e["question"]) for e in eval_examples}
    assert train_questions and eval_questions
    assert train_questions != eval_questions
    assert not eval_questions <= train_questions


def test_datasets_refuse_an_eval_size_that_leaves_nothing(smoke):
    with pytest.raises(ValueError, match="eval_size"):
        prepare_datasets(dataclasses.replace(smoke, eval_size=smoke.max_examples))


# ---------------------------------------------------------------------------
# create_reward_functions


def _columns(example):
    return {k: [v] for k, v in example.items() if k != "prompts"}


def _total(fns, prompt, completion, columns):
    return sum(fn([prompt], [completion], **columns)[0] for fn in fns)


def test_rewards_rank_a_correct_formatted_answer_above_a_malformed_wrong_one(smoke,
                                                                           smoke_data):
    fns = create_reward_functions(smoke)
    assert [fn.__name__ for fn in fns] == list(smoke.reward_functions)
    train, _ = smoke_data
    for example in _examples(train)[:4]:
        prompt, answer = str(example["prompts"]), str(example["answer"])
        good = f"<reasoning>I compute it.</reasoning><answer>{answer}</answer>"
        wrong = str(int(float(answer)) + 37)
        bad = f"I think the answer is {wrong}"
        columns = _columns(example)
        scores_good = [fn([prompt], [good], **columns)[0] for fn in fns]
        scores_bad = [fn([prompt], [bad], **columns)[0] for fn in fns]
        assert all(s > 0 for s in scores_good), scores_good
        assert _total(fns, prompt, good, columns) > _total(fns, prompt, bad, columns)
        assert sum(scores_bad) < sum(scores_good)


def test_rewards_follow_the_configs_weights_names_and_tags(smoke, smoke_data):
    train, _ = smoke_data
    example = _examples(train)[0]
    prompt, answer, columns = str(example["prompts"]), str(example["answer"]), _columns(example)
    good = f"<reasoning>I compute it.</reasoning><answer>{answer}</answer>"

    plain = create_reward_functions(smoke)
    weighted = create_reward_functions(dataclasses.replace(smoke, reward_weights=(2.0, 0.5, 3.0)))
    for fn, wfn, weight in zip(plain, weighted, (2.0, 0.5, 3.0)):
        assert wfn([prompt], [good], **columns)[0] == pytest.approx(
            weight * fn([prompt], [good], **columns)[0])

    [only] = create_reward_functions(dataclasses.replace(smoke, reward_functions=("answer_match",),
                                                         reward_weights=None))
    assert only.__name__ == "answer_match"

    tagged = dataclasses.replace(smoke, reasoning_tag="think", answer_tag="final",
                                 system_prompt="Think in <think>, answer in <final>.")
    fns = {fn.__name__: fn for fn in create_reward_functions(tagged)}
    own_tags = f"<think>I compute it.</think><final>{answer}</final>"
    assert fns["format_exact"]([prompt], [own_tags], **columns) == [1.0]
    assert fns["format_exact"]([prompt], [good], **columns) == [0.0]
    assert fns["answer_match"]([prompt], [own_tags], **columns) == [1.0]


def test_rewards_refuse_a_judged_reward_without_a_judge():
    with pytest.raises(ValueError, match="judge"):
        create_reward_functions(get_preset("rubric_smoke"))


def test_rewards_refuse_unknown_names(smoke):
    with pytest.raises(ValueError, match="unknown reward"):
        create_reward_functions(dataclasses.replace(smoke, reward_functions=("format_exakt",),
                                                    reward_weights=None))


# ---------------------------------------------------------------------------
# PromptFormat where a config used to be faked


def test_chat_prompt_takes_a_prompt_format():
    from jaxpost.data.prompts import format_prompt as format_with
    from jaxpost.sampling import chat_prompt

    fmt = PromptFormat("chatml", "Answer in <{answer_tag}> tags.", "think", "final")
    prompt = chat_prompt(QUESTION, None, prompt_config=fmt)
    assert prompt == format_with(QUESTION, fmt)
    assert prompt.startswith("<|im_start|>system\nAnswer in <final> tags.<|im_end|>\n")
    # An explicit template wins over the format's.
    assert chat_prompt(QUESTION, None, "none", prompt_config=fmt) == (
        f"Answer in <final> tags.\n\n{QUESTION}\n")


def test_evaluating_a_base_model_formats_as_a_default_config_of_it():
    from jaxpost.config import ColabTrainingConfig
    from jaxpost.evaluate import _prompt_format

    for source in ("embedded:gemma3-270m", "hf:Qwen/Qwen2.5-0.5B-Instruct"):
        assert _prompt_format(source, None, None) == PromptFormat.from_config(
            ColabTrainingConfig(model=source))
