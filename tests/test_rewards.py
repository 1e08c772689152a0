"""Unit tests for the built-in rewards and the registry: hand-written completions, good
and malformed."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest

from jaxpost.rewards.answers import (
    ECHO_MIN_WORDS,
    echoes_prompt,
    extract_answer,
    normalize_answer,
    parse_number,
)
from jaxpost.rewards.builtin import (
    answer_match,
    answer_number,
    format_approximate,
    format_exact,
    reasoning_gym,
)
from jaxpost.rewards.registry import (
    REWARDS,
    create_reward_functions,
    get_reward,
    list_rewards,
    register_reward,
)

GOOD = "<reasoning>2 + 2 is 4.</reasoning>\n<answer>4</answer>"


def _one(fn, completion, **columns):
    """Score a single completion."""
    (score,) = fn(prompts=["p"], completions=[completion], **columns)
    return score


def _config(names, weights=None, reasoning_tag="reasoning", answer_tag="answer"):
    return SimpleNamespace(
        reward_functions=tuple(names),
        reward_weights=weights,
        reasoning_tag=reasoning_tag,
        answer_tag=answer_tag,
    )


@pytest.fixture
def restore_registry():
    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)


# ---------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1000", 1000.0),
        ("1,000", 1000.0),
        ("$1000", 1000.0),
        ("$1,000.50", 1000.5),
        ("1000.0", 1000.0),
        ("-3", -3.0),
        ("-$5", -5.0),
        ("\u22127", -7.0),
        ("3/4", 0.75),
        ("-1/2", -0.5),
        ("50%", 50.0),
        ("42.", 42.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("The answer is 42 apples.", 42.0),
        ("x = 7, y = 9", 7.0),
        ("1,2,3", 1.0),
        ("no number here", None),
        ("", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Paris. ", "paris"),
        ("$1,000", "1000"),
        ("**42**", "42"),
        ("-3", "-3"),
        (".5", ".5"),
        ("New   York\nCity!", "new york city"),
        ('"yes"', "yes"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_extract_answer_takes_the_last_complete_tag():
    text = "<answer>3</answer> wait, no: <answer> 4 </answer>"
    assert extract_answer(text) == "4"


def test_extract_answer_ignores_trailing_unterminated_tag():
    assert extract_answer("<answer>3</answer> <answer>4") == "3"


def test_extract_answer_missing_or_empty():
    assert extract_answer("the answer is 4") is None
    assert extract_answer("<answer>4") is None
    assert extract_answer("4</answer>") is None
    assert extract_answer("<answer>  </answer>") == ""


def test_extract_answer_custom_tag():
    assert extract_answer("<final>12</final><answer>3</answer>", answer_tag="final") == "12"


# ---------------------------------------------------------------------------
# format_exact


@pytest.mark.parametrize(
    "completion",
    [
        GOOD,
        "<reasoning>x</reasoning><answer>4</answer>",
        "  <reasoning>\nmulti\nline\n</reasoning>\n\n<answer> 4 </answer>\n",
        GOOD + "<end_of_turn>",
        GOOD + "\n<eos>",
        GOOD + "</s>",
        GOOD + "<|im_end|>",
    ],
)
def test_format_exact_accepts(completion):
    assert _one(format_exact, completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<reasoning>2 + 2 is 4.</reasoning>",  # missing answer
        "<answer>4</answer>",  # missing reasoning
        "<reasoning>x</reasoning><answer>4",  # unclosed answer
        "<reasoning></reasoning><answer>4</answer>",  # empty reasoning
        "<reasoning>x</reasoning><answer> </answer>",  # empty answer
        "<answer>4</answer><reasoning>x</reasoning>",  # wrong order
        "Sure! " + GOOD,  # text before
        GOOD + " Hope this helps.",  # text after
        GOOD + "<end_of_turn> more",  # text after the end marker
        "<reasoning>a</reasoning><reasoning>b</reasoning><answer>4</answer>",  # repeated
        "<reasoning>x <answer>3</answer></reasoning><answer>4</answer>",  # nested repeat
        "",
    ],
)
def test_format_exact_rejects(completion):
    assert _one(format_exact, completion) == 0.0


def test_format_exact_custom_tags():
    think = "<think>2 + 2</think><final>4</final>"
    assert _one(format_exact, think, reasoning_tag="think", answer_tag="final") == 1.0
    assert _one(format_exact, think) == 0.0
    assert _one(format_exact, GOOD, reasoning_tag="think", answer_tag="final") == 0.0


def test_format_exact_returns_one_score_per_completion():
    scores = format_exact(
        prompts=["a", "b", "c"], completions=[GOOD, "nope", GOOD], extra=[1, 2, 3]
    )
    assert scores == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------
# format_approximate


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        (GOOD + "<end_of_turn>", 1.0),
        ("no tags at all", 0.0),
        ("<reasoning>x</reasoning>", 0.5),
        ("<reasoning>x</reasoning><answer>4", 0.75),
        ("<answer>4</answer>", 0.5),
        (GOOD + " Hope this helps.", 0.75),  # trailing text
        ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>4</answer>", 0.0),
        # every tag repeated, plus trailing text: -1.25 clipped to -1.
        (GOOD + GOOD + " bye", -1.0),
        (GOOD + GOOD, -1.0),
    ],
)
def test_format_approximate_values(completion, expected):
    assert _one(format_approximate, completion) == pytest.approx(expected)


def test_format_approximate_custom_tags():
    think = "<think>x</think><answer>4</answer>"
    assert _one(format_approximate, think, reasoning_tag="think") == 1.0
    assert _one(format_approximate, GOOD, reasoning_tag="think") == 0.5


# ---------------------------------------------------------------------------
# Echo of the instruction

SHORT_Q = "Calculate 4 - 1."
LONG_Q = "A farmer has 12 cows and buys 5 more. How many cows does he have now?"


def _gemma_prompt(question):
    from jaxpost.config import ColabTrainingConfig
    from jaxpost.data.prompts import format_prompt

    return format_prompt(question, ColabTrainingConfig(), template="gemma")


def _format_scores(completion, question, with_question=True):
    columns = {"question": [question]} if with_question else {}
    prompts = [_gemma_prompt(question)]
    return (format_exact(prompts, [completion], **columns)[0],
            format_approximate(prompts, [completion], **columns)[0])


@pytest.mark.parametrize("with_question", [True, False])
def test_echo_of_the_system_prompt_scores_at_most_zero(with_question):
    from jaxpost.config import DEFAULT_SYSTEM_PROMPT

    echo = DEFAULT_SYSTEM_PROMPT + "\n\n" + SHORT_Q
    # Without the prompt the echo earns most of the credit: each tag once.
    assert _one(format_approximate, echo) == 0.75
    assert _format_scores(echo, SHORT_Q, with_question) == (0.0, -1.0)
    assert echoes_prompt(_gemma_prompt(SHORT_Q), echo, SHORT_Q if with_question else None)


def test_echo_wrapped_in_the_format_is_still_an_echo():
    from jaxpost.config import DEFAULT_SYSTEM_PROMPT

    untagged = DEFAULT_SYSTEM_PROMPT.split(" between")[0]  # "You are given ... your reasoning"
    wrapped = f"<reasoning>{untagged}</reasoning>\n<answer>3</answer>"
    assert _one(format_exact, wrapped) == 1.0
    assert _format_scores(wrapped, SHORT_Q) == (0.0, -1.0)


def test_well_formed_answer_is_not_an_echo():
    good = "<reasoning>4 - 1 = 3</reasoning>\n<answer>3</answer>"
    assert _format_scores(good, SHORT_Q) == (1.0, 1.0)
    assert _format_scores(good, SHORT_Q, with_question=False) == (1.0, 1.0)


def test_short_question_restated_in_the_reasoning_is_not_an_echo():
    restated = ("<reasoning>Calculate 4 - 1. Taking 1 from 4 leaves 3.</reasoning>\n"
                "<answer>3</answer>")
    assert not echoes_prompt(_gemma_prompt(SHORT_Q), restated, SHORT_Q)
    assert _format_scores(restated, SHORT_Q) == (1.0, 1.0)


def test_long_question_copied_whole_is_an_echo():
    copied = f"<reasoning>{LONG_Q} 12 + 5 = 17</reasoning>\n<answer>17</answer>"
    assert echoes_prompt(_gemma_prompt(LONG_Q), copied, LONG_Q)
    assert _format_scores(copied, LONG_Q) == (0.0, -1.0)
    # Case and punctuation do not hide the copy.
    shouted = f"<reasoning>{LONG_Q.upper().replace('.', '')} 17</reasoning><answer>17</answer>"
    assert echoes_prompt(_gemma_prompt(LONG_Q), shouted, LONG_Q)


def test_partial_copies_shorter_than_the_threshold_are_not_echoes():
    assert ECHO_MIN_WORDS == 8
    prompt = _gemma_prompt(LONG_Q)
    seven = "<reasoning>A farmer has 12 cows and buys 5: 12 + 5 = 17</reasoning><answer>17</answer>"
    assert not echoes_prompt(prompt, seven, LONG_Q)
    assert _format_scores(seven, LONG_Q) == (1.0, 1.0)
    # Seven words of the system prompt pass, the eighth makes a copy.
    instruction = "think about it step by step and write".split()
    for n, expected in ((7, False), (8, True)):
        completion = f"<reasoning>{' '.join(instruction[:n])}: 17</reasoning><answer>17</answer>"
        assert echoes_prompt(prompt, completion, LONG_Q) is expected


def test_echo_check_ignores_text_that_only_the_question_holds():
    """A question as long as the system prompt is not instruction: copying 8 of its
    words is not an echo, while the same words do count when no question is given."""
    prompt = _gemma_prompt(LONG_Q)
    part = "<reasoning>a farmer has 12 cows and buys 5 more, so 17</reasoning><answer>17</answer>"
    assert not echoes_prompt(prompt, part, LONG_Q)
    assert echoes_prompt(prompt, part)


def test_echo_check_needs_aligned_columns():
    with pytest.raises(ValueError, match="prompts has 2 values for 1 completions"):
        format_exact(["p", "p"], [GOOD])
    with pytest.raises(ValueError, match="question has 2 values for 1 completions"):
        format_approximate(["p"], [GOOD], question=["q", "q"])
    # No prompts: no echo check, the tags alone decide.
    assert format_exact(None, [GOOD]) == [1.0]
    assert format_approximate([], [GOOD]) == [1.0]


def test_echo_check_with_tunix_columns():
    """Tunix passes prompts and columns as numpy str arrays, repeated per generation."""
    import numpy as np

    from jaxpost.config import DEFAULT_SYSTEM_PROMPT

    fns = create_reward_functions(_config(["format_exact", "format_approximate"]))
    prompts = np.repeat(np.array([_gemma_prompt(SHORT_Q)]), 2)
    completions = [DEFAULT_SYSTEM_PROMPT, "<reasoning>4 - 1 = 3</reasoning><answer>3</answer>"]
    question = np.repeat(np.array([SHORT_Q]), 2)
    assert [fn(prompts=prompts, completions=completions, question=question) for fn in fns] == [
        [0.0, 1.0], [-1.0, 1.0]]


def test_answer_rewards_do_not_look_at_the_prompt():
    from jaxpost.config import DEFAULT_SYSTEM_PROMPT

    echo_then_answer = DEFAULT_SYSTEM_PROMPT + " <answer>3</answer>"
    for fn in (answer_match, answer_number):
        for prompts in (["p"], [_gemma_prompt(SHORT_Q)]):
            assert fn(prompts, [echo_then_answer], answer=["3"], question=[SHORT_Q]) == [1.0]


# ---------------------------------------------------------------------------
# answer_match / answer_number


@pytest.mark.parametrize("predicted", ["1000", "1,000", "$1000", "1000.0", "$1,000.", " 1000 "])
def test_answer_match_equal_forms(predicted):
    completion = f"<reasoning>r</reasoning><answer>{predicted}</answer>"
    assert _one(answer_match, completion, answer=["1000"]) == 1.0


@pytest.mark.parametrize(
    "predicted, gold, expected",
    [
        ("Paris", "paris", 1.0),
        ("0.75", "3/4", 1.0),
        ("1050", "1000", 0.5),  # 5% off
        ("900", "1000", 0.5),  # 10% off, boundary included
        ("1150", "1000", 0.25),  # 15% off
        ("1300", "1000", 0.0),  # 30% off
        ("-1000", "1000", 0.0),
        ("0.1", "0", 0.0),
        ("London", "Paris", 0.0),
        ("4", "Paris", 0.0),
        ("", "4", 0.0),
    ],
)
def test_answer_match_values(predicted, gold, expected):
    completion = f"<reasoning>r</reasoning><answer>{predicted}</answer>"
    assert _one(answer_match, completion, answer=[gold]) == expected


def test_answer_match_without_answer_tag_is_zero():
    assert _one(answer_match, "<reasoning>r</reasoning> the answer is 4", answer=["4"]) == 0.0


def test_answer_match_uses_last_answer_and_accepts_non_string_gold():
    completion = "<answer>3</answer> no, <answer>4</answer>"
    assert _one(answer_match, completion, answer=[4]) == 1.0


def test_answer_match_missing_column_names_columns():
    with pytest.raises(ValueError, match=r"answer_match needs an? 'answer' column.*question"):
        answer_match(prompts=["p"], completions=[GOOD], question=["q"])


def test_answer_match_length_mismatch():
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        answer_match(prompts=["p"], completions=[GOOD], answer=["4", "5"])


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ("4", 1.0),
        ("4.0", 1.0),
        ("The answer is $4.", 1.0),
        ("4 or 5", 1.0),
        ("5 or 4", 0.0),
        ("4.1", 0.0),  # no partial credit here
        ("four", 0.0),
    ],
)
def test_answer_number_values(predicted, expected):
    completion = f"<reasoning>r</reasoning><answer>{predicted}</answer>"
    assert _one(answer_number, completion, answer=["4"]) == expected


def test_answer_number_without_tag_and_errors():
    assert _one(answer_number, "4", answer=["4"]) == 0.0
    with pytest.raises(ValueError, match="answer_number needs an? 'answer' column"):
        answer_number(prompts=["p"], completions=[GOOD])
    with pytest.raises(ValueError, match="numeric answers"):
        answer_number(prompts=["p"], completions=[GOOD], answer=["Paris"])


def test_answer_rewards_custom_answer_tag():
    completion = "<think>r</think><final>4</final>"
    assert _one(answer_match, completion, answer=["4"], answer_tag="final") == 1.0
    assert _one(answer_match, completion, answer=["4"]) == 0.0


# ---------------------------------------------------------------------------
# reasoning_gym


@pytest.fixture(scope="module")
def rg_entries():
    rg = pytest.importorskip("reasoning_gym")
    return list(rg.create_dataset("basic_arithmetic", size=3, seed=1))


def test_reasoning_gym_scores_real_entries(rg_entries):
    entry = rg_entries[0]
    gold = entry["answer"]
    wrong = str(int(gold) + 1)
    completions = [
        f"<reasoning>work</reasoning><answer>{gold}</answer>",
        f"<reasoning>work</reasoning><answer>{wrong}</answer>",
        f"<reasoning>work</reasoning> {gold}",  # no answer tag
    ]
    scores = reasoning_gym(
        prompts=[entry["question"]] * 3,
        completions=completions,
        task=["basic_arithmetic"] * 3,
        entry=[json.dumps(entry)] * 3,
        answer=[gold] * 3,
    )
    assert scores[0] == 1.0
    assert scores[1] < 1.0
    assert scores[2] == 0.0


def test_reasoning_gym_per_row_entries_and_dict_entries(rg_entries):
    completions = [f"<answer>{e['answer']}</answer>" for e in rg_entries]
    scores = reasoning_gym(
        prompts=["p"] * len(rg_entries),
        completions=completions,
        task=["basic_arithmetic"] * len(rg_entries),
        entry=rg_entries,
    )
    assert scores == [1.0] * len(rg_entries)
    # Rotated entries: each answer is scored against another question.
    rotated = [json.dumps(e) for e in rg_entries[1:] + rg_entries[:1]]
    scores = reasoning_gym(
        prompts=["p"] * len(rg_entries),
        completions=completions,
        task=["basic_arithmetic"] * len(rg_entries),
        entry=rotated,
    )
    assert all(s < 1.0 for s in scores)


def test_reasoning_gym_missing_columns():
    with pytest.raises(ValueError, match=r"'task' and 'entry'.*\['answer', 'entry'\]"):
        reasoning_gym(prompts=["p"], completions=[GOOD], answer=["4"], entry=["{}"])


def test_reasoning_gym_bad_entry_and_unknown_task(rg_entries):
    with pytest.raises(ValueError, match=r"entry\[0\] is not valid JSON"):
        reasoning_gym(prompts=["p"], completions=[GOOD], task=["basic_arithmetic"], entry=["{"])
    with pytest.raises(ValueError, match="not_a_task"):
        reasoning_gym(
            prompts=["p"],
            completions=[GOOD],
            task=["not_a_task"],
            entry=[json.dumps(rg_entries[0])],
        )


# ---------------------------------------------------------------------------
# Registry


def test_registry_lists_builtins():
    assert list_rewards() == sorted(
        ["format_exact", "format_approximate", "answer_match", "answer_number", "reasoning_gym",
         "rubric"]
    )
    assert get_reward("format_exact") is format_exact


def test_builtins_have_tunix_signature_and_no_algo_config_names():
    reserved = {"beta", "epsilon", "num_generations", "num_iterations", "temperature",
                "loss_algo", "kl_loss_mode", "algo_variant", "reward_manager"}
    for name, fn in REWARDS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["prompts", "completions"], name
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), name
        assert not reserved & set(params), name
        assert "Range" in (fn.__doc__ or ""), name


def test_get_reward_unknown_lists_known_and_closest():
    with pytest.raises(ValueError) as info:
        get_reward("format_exct")
    message = str(info.value)
    assert "Did you mean 'format_exact'?" in message
    for name in list_rewards():
        assert name in message


def test_register_reward(restore_registry):
    def length_penalty(prompts, completions, **kwargs):
        """Range [-1, 0]."""
        return [-min(1.0, len(c) / 1000) for c in completions]

    register_reward("length_penalty", length_penalty)
    assert get_reward("length_penalty") is length_penalty
    assert "length_penalty" in list_rewards()
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_penalty", length_penalty)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format_exact", length_penalty)
    register_reward("format_exact", length_penalty, overwrite=True)
    assert get_reward("format_exact") is length_penalty
    with pytest.raises(TypeError, match="callable"):
        register_reward("not_a_function", 3)


# ---------------------------------------------------------------------------
# create_reward_functions


def test_create_reward_functions_names_and_weights():
    fns = create_reward_functions(
        _config(["format_exact", "answer_match"], weights=(2.0, 0.5))
    )
    assert [fn.__name__ for fn in fns] == ["format_exact", "answer_match"]
    completions = [GOOD, "<answer>5</answer>"]
    columns = {"answer": ["4", "4"], "question": ["q", "q"]}
    assert fns[0](prompts=["p", "p"], completions=completions, **columns) == [2.0, 0.0]
    assert fns[1](prompts=["p", "p"], completions=completions, **columns) == [0.5, 0.0]
    # The registered functions are untouched.
    assert format_exact.__name__ == "format_exact"
    assert format_exact(prompts=["p"], completions=[GOOD]) == [1.0]


def test_create_reward_functions_default_weights():
    fns = create_reward_functions(_config(["format_approximate", "answer_number"]))
    assert [fn.__name__ for fn in fns] == ["format_approximate", "answer_number"]
    assert fns[0](prompts=["p"], completions=[GOOD]) == [1.0]
    assert fns[1](prompts=["p"], completions=[GOOD], answer=["4"]) == [1.0]


def test_create_reward_functions_binds_custom_tags():
    fns = create_reward_functions(
        _config(["format_exact", "answer_match"], reasoning_tag="think", answer_tag="final")
    )
    think = "<think>2 + 2</think><final>4</final>"
    assert [fn(prompts=["p"], completions=[think], answer=["4"])[0] for fn in fns] == [1.0, 1.0]
    assert [fn(prompts=["p"], completions=[GOOD], answer=["4"])[0] for fn in fns] == [0.0, 0.0]


def test_create_reward_functions_custom_reward_without_tags(restore_registry):
    def always_one(prompts, completions, **kwargs):
        """Range {1}."""
        return [1.0] * len(completions)

    register_reward("always", always_one)
    (fn,) = create_reward_functions(_config(["always"], weights=(3.0,)))
    assert fn.__name__ == "always"
    assert fn(prompts=["p", "q"], completions=["a", "b"]) == [3.0, 3.0]
    (fn,) = create_reward_functions(_config(["always"]))
    assert fn.__name__ == "always"
    assert always_one.__name__ == "always_one"


def test_create_reward_functions_errors():
    with pytest.raises(ValueError, match="Did you mean 'answer_match'"):
        create_reward_functions(_config(["answer_mach"]))
    with pytest.raises(ValueError, match="1 values for 2 reward_functions"):
        create_reward_functions(_config(["format_exact", "answer_match"], weights=(1.0,)))
    with pytest.raises(ValueError, match="empty"):
        create_reward_functions(_config([]))
    with pytest.raises(ValueError, match="repeats"):
        create_reward_functions(_config(["format_exact", "format_exact"]))


def test_created_rewards_work_with_tunix_reward_manager():
    manager_mod = pytest.importorskip("tunix.rl.reward_manager")
    grpo = pytest.importorskip("tunix.rl.grpo.grpo_learner")
    fns = create_reward_functions(
        _config(["format_exact", "format_approximate", "answer_match"], weights=(1.0, 0.5, 2.0))
    )
    manager = manager_mod.SequenceRewardManager(reward_fns=fns, algo_config=grpo.GRPOConfig())
    completions = [GOOD, "<answer>3</answer>"]
    info = manager(
        prompts=["p", "p"], completions=completions, answer=["4", "4"], question=["q", "q"]
    )
    # GOOD: 1 + 0.5 * 1 + 2 * 1; second: 0 + 0.5 * 0.5 + 2 * 0.
    assert list(info["rewards"]) == pytest.approx([3.5, 0.25])
    assert {"rewards/format_exact", "rewards/format_approximate", "rewards/answer_match"} <= set(
        info["log_metrics"]
    )


def test_create_reward_functions_accepts_the_real_config():
    config_mod = pytest.importorskip("jaxpost.config")
    config = config_mod.ColabTrainingConfig()
    fns = create_reward_functions(config)
    assert [fn.__name__ for fn in fns] == list(config.reward_functions)
