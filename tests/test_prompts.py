import json
from types import SimpleNamespace

import pytest

from jaxpost.data.prompts import (
    format_prompt,
    jinja_chat_template,
    resolve_chat_template,
    stop_strings,
    system_text,
)

QUESTION = "What is 2 + 3?"
SYSTEM = "Think in <{reasoning_tag}> tags, answer in <{answer_tag}> tags."
SYSTEM_FILLED = "Think in <reasoning> tags, answer in <answer> tags."


def make_config(chat_template="gemma", system_prompt=SYSTEM, model="embedded:gemma3-270m"):
    return SimpleNamespace(
        model=model,
        chat_template=chat_template,
        system_prompt=system_prompt,
        reasoning_tag="reasoning",
        answer_tag="answer",
    )


@pytest.mark.parametrize(
    "template, expected",
    [
        (
            "gemma",
            "<start_of_turn>user\n"
            f"{SYSTEM_FILLED}\n\n{QUESTION}<end_of_turn>\n"
            "<start_of_turn>model\n",
        ),
        (
            "chatml",
            f"<|im_start|>system\n{SYSTEM_FILLED}<|im_end|>\n"
            f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (
            "llama3",
            f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_FILLED}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("none", f"{SYSTEM_FILLED}\n\n{QUESTION}\n"),
    ],
)
def test_template_strings(template, expected):
    assert format_prompt(QUESTION, make_config(template)) == expected


def test_literal_system_prompt_is_used_verbatim():
    literal = 'Reply as JSON {"a": 1} inside <reasoning></reasoning><answer></answer>.'
    prompt = format_prompt(QUESTION, make_config("none", system_prompt=literal))
    assert prompt == f"{literal}\n\n{QUESTION}\n"


def test_tag_names_come_from_config():
    config = make_config("none")
    config.reasoning_tag, config.answer_tag = "think", "final"
    assert format_prompt(QUESTION, config).startswith(
        "Think in <think> tags, answer in <final> tags."
    )


def test_auto_template_resolves_from_model():
    assert format_prompt(QUESTION, make_config("auto", model="hf:Qwen/Qwen2.5-0.5B-Instruct")).startswith(
        "<|im_start|>system\n"
    )


def test_explicit_template_argument_skips_resolution():
    config = make_config("auto", model="not-a-real-source")
    assert format_prompt(QUESTION, config, template="none") == f"{SYSTEM_FILLED}\n\n{QUESTION}\n"


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question_raises(question):
    with pytest.raises(ValueError, match="question"):
        format_prompt(question, make_config())


def test_rubric_lines_are_listed_after_the_question():
    class Criterion:
        def __init__(self, text):
            self.text = text

    prompt = format_prompt(
        QUESTION, make_config("none"), rubric=["Shows each step", Criterion("Final number is correct")]
    )
    assert prompt == (
        f"{SYSTEM_FILLED}\n\n{QUESTION}\n\n"
        "Your answer will be judged on:\n"
        "- Shows each step\n"
        "- Final number is correct\n"
    )


def test_rubric_goes_in_the_gemma_user_turn():
    prompt = format_prompt(QUESTION, make_config("gemma"), rubric=["Shows each step"])
    assert prompt.endswith(
        "Your answer will be judged on:\n- Shows each step<end_of_turn>\n<start_of_turn>model\n"
    )


def test_bad_rubric_items_raise():
    with pytest.raises(TypeError, match="rubric criterion"):
        format_prompt(QUESTION, make_config(), rubric=[42])
    with pytest.raises(ValueError, match="empty"):
        format_prompt(QUESTION, make_config(), rubric=["  "])


def test_empty_system_prompt_leaves_out_the_system_block():
    config = make_config(system_prompt="")
    assert format_prompt(QUESTION, config) == (
        f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    )
    assert format_prompt(QUESTION, config, template="chatml").startswith("<|im_start|>user\n")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("embedded:gemma3-270m", "gemma"),
        ("random:gemma3-tiny", "gemma"),
        ("kaggle:google/gemma-3/flax/gemma3-1b-it", "gemma"),
        ("hf:google/gemma-3-1b-it", "gemma"),
        ("hf:Qwen/Qwen2.5-0.5B-Instruct", "chatml"),
        ("hf:meta-llama/Llama-3.2-1B-Instruct", "llama3"),
        ("hf:microsoft/phi-2", "none"),
    ],
)
def test_resolve_auto_from_source_name(source, expected):
    assert resolve_chat_template(source) == expected


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("gemma3", "gemma"),
        ("gemma3_text", "gemma"),
        ("gemma2", "gemma"),
        ("gemma", "gemma"),
        ("qwen2", "chatml"),
        ("qwen3", "chatml"),
        ("llama", "llama3"),
        ("mistral", "none"),
    ],
)
def test_resolve_auto_from_local_config_json(tmp_path, model_type, expected):
    # The directory name must not matter, only config.json.
    model_dir = tmp_path / "some-qwen-named-dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert resolve_chat_template(str(model_dir), "auto") == expected


def test_resolve_local_dir_without_config_json_is_none(tmp_path):
    assert resolve_chat_template(str(tmp_path)) == "none"


def test_resolve_explicit_template_wins():
    assert resolve_chat_template("hf:Qwen/Qwen2.5-0.5B-Instruct", "gemma") == "gemma"


def test_resolve_rejects_unknown_template_and_source(tmp_path):
    with pytest.raises(ValueError, match="chat_template='mistral'"):
        resolve_chat_template("embedded:gemma3-270m", "mistral")
    with pytest.raises(ValueError, match="cannot infer"):
        resolve_chat_template(str(tmp_path / "missing"))


def test_stop_strings():
    assert stop_strings("gemma") == ["<end_of_turn>"]
    assert stop_strings("chatml") == ["<|im_end|>"]
    assert stop_strings("llama3") == ["<|eot_id|>"]
    assert stop_strings("none") == []
    with pytest.raises(ValueError):
        stop_strings("auto")


def _render(template: str, messages, *, transformers_like: bool, generation: bool = True) -> str:
    """Renders a chat template as Hugging Face's tokenizers do (sandboxed, trim_blocks and
    lstrip_blocks) or with Jinja's defaults (as llama-cpp-python does)."""
    from jinja2 import Environment
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
           if transformers_like else Environment())
    return env.from_string(template).render(messages=messages, bos_token="<bos>",
                                            add_generation_prompt=generation,
                                            raise_exception=raise_exception)


# System prompts a Jinja string literal must carry unchanged: quotes, backslashes,
# braces that look like Jinja, tabs, non-ASCII text.
TRICKY_SYSTEM = ("Say \"hi\" and don't stop.\nUse {{ braces }}, {% tags %} and a \\ "
                 "backslash;\tthen\r\n<{answer_tag}>naïve 東京</{answer_tag}>")


@pytest.mark.parametrize("transformers_like", [True, False])
@pytest.mark.parametrize("system_prompt", ["", SYSTEM, TRICKY_SYSTEM])
@pytest.mark.parametrize("template", ["gemma", "chatml", "llama3", "none"])
def test_jinja_template_renders_format_prompt(template, system_prompt, transformers_like):
    config = make_config(template, system_prompt)
    system = system_text(config)
    question = "  What is 7 + 5?\n"
    want = "<bos>" + format_prompt(question, config, template=template)
    jinja = jinja_chat_template(template, system)
    user = [{"role": "user", "content": question}]
    assert _render(jinja, user, transformers_like=transformers_like) == want
    # A system message given by the caller takes the place of the run's.
    other = jinja_chat_template(template, "something else")
    messages = [{"role": "system", "content": system}] + user
    assert _render(other, messages, transformers_like=transformers_like) == want


def test_gemma_jinja_template_continues_a_conversation_like_the_hubs():
    jinja = jinja_chat_template("gemma", "Be brief.")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "2 + 2?"}]}]
    assert _render(jinja, messages, transformers_like=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2 + 2?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="alternate"):
        _render(jinja, messages[:1] * 2, transformers_like=True)
    assert not jinja_chat_template("gemma", bos=False).startswith("{{ bos_token }}")
    with pytest.raises(ValueError, match="auto"):
        jinja_chat_template("auto")


def test_generate_chat_prompts_take_the_trained_format_unless_flags_override():
    """``jaxpost generate --chat``: the adapters' run's template and system prompt, else the
    model family's template and no system text; ``--chat-template`` and
    ``--system-prompt`` override either."""
    import argparse

    from jaxpost.cli import _chat_prompts
    from jaxpost.config import ColabTrainingConfig
    from jaxpost.data.prompts import PromptFormat

    loaded = SimpleNamespace(source="embedded:gemma3-270m", path=None)
    trained = ColabTrainingConfig(chat_template="chatml", system_prompt=SYSTEM)

    def prompts(trained, chat_template="auto", system_prompt=None):
        args = argparse.Namespace(prompt=[QUESTION], chat_template=chat_template,
                                  system_prompt=system_prompt)
        return _chat_prompts(args, loaded, trained)

    assert prompts(None) == [format_prompt(QUESTION, PromptFormat("gemma"))]
    assert prompts(None, "llama3", "Be brief.") == [
        format_prompt(QUESTION, PromptFormat("llama3", "Be brief."))]
    assert prompts(trained) == [format_prompt(QUESTION, trained)]
    assert SYSTEM_FILLED in prompts(trained)[0]
    assert prompts(trained, "gemma", "") == [format_prompt(QUESTION, PromptFormat("gemma"))]
