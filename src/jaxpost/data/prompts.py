"""Prompt formatting: chat templates, system prompt and question -> prompt text.

The prompt is plain text without BOS (the tokenizer adds BOS). It ends where the
model's turn begins, so the completion is the model's answer in the
`<reasoning>...</reasoning><answer>...</answer>` format asked for by the system
prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger("jaxpost.data.prompts")

CHAT_TEMPLATES = ("auto", "gemma", "chatml", "llama3", "none")

_STOP_STRINGS = {
    "gemma": ["<end_of_turn>"],
    "chatml": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
    "none": [],
}

# End-of-turn markers a decoder may leave at the end of a completion (Gemma, Llama/
# SentencePiece, ChatML). They are not the model's text, so format rewards ignore one.
END_MARKERS: tuple[str, ...] = ("<end_of_turn>", "<eos>", "</s>", "<|im_end|>")


def strip_end_marker(completion: str) -> str:
    """The completion without surrounding whitespace and a trailing end-of-turn marker."""
    text = completion.strip()
    for marker in END_MARKERS:
        if text.endswith(marker):
            return text[: -len(marker)].rstrip()
    return text


# Hugging Face `config.json` model_type -> template.
_MODEL_TYPE_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "llama": "llama3",
}

_SOURCE_PREFIXES = ("embedded:", "random:", "kaggle:", "hf:")


def _template_from_name(name: str) -> str:
    lowered = name.lower()
    if "gemma" in lowered:
        return "gemma"
    if "qwen" in lowered:
        return "chatml"
    if "llama" in lowered:
        return "llama3"
    return "none"


def _template_from_local_dir(directory: Path) -> str:
    config_path = directory / "config.json"
    if not config_path.is_file():
        logger.warning(
            "chat_template='auto': %s has no config.json, using template 'none'; "
            "set chat_template to one of %s to choose one.",
            directory,
            CHAT_TEMPLATES[1:],
        )
        return "none"
    with config_path.open(encoding="utf-8") as f:
        model_type = json.load(f).get("model_type", "")
    return _MODEL_TYPE_TEMPLATES.get(str(model_type).lower(), "none")


def resolve_chat_template(model_source: str, chat_template: str = "auto") -> str:
    """Returns the concrete chat template ("gemma", "chatml", "llama3" or "none").

    An explicit `chat_template` is returned as is. For "auto" the template is
    inferred from `model_source`:
      - "embedded:NAME", "random:NAME", "kaggle:HANDLE": from the name
        (gemma -> "gemma", qwen -> "chatml", llama -> "llama3", else "none");
      - "hf:ORG/NAME": from NAME, same rules;
      - a local directory: from `model_type` in its config.json.

    Raises:
      ValueError: unknown `chat_template`, or a source that is neither a known
        prefix nor an existing directory.
    """
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(
            f"chat_template={chat_template!r} is not one of {CHAT_TEMPLATES}"
        )
    if chat_template != "auto":
        return chat_template
    if model_source.startswith("hf:"):
        return _template_from_name(model_source[len("hf:") :].rsplit("/", 1)[-1])
    if model_source.startswith(_SOURCE_PREFIXES):
        return _template_from_name(model_source.split(":", 1)[1])
    path = Path(model_source).expanduser()
    if path.is_dir():
        return _template_from_local_dir(path)
    raise ValueError(
        f"cannot infer a chat template for model={model_source!r}: expected one of "
        f"{', '.join(p + '...' for p in _SOURCE_PREFIXES)} or an existing local "
        f"directory; or set chat_template to one of {CHAT_TEMPLATES[1:]}"
    )


def model_chat_template(loaded: Any, chat_template: str = "auto") -> str:
    """:func:`resolve_chat_template` for a loaded model (``jaxpost.models.loading.LoadedModel``).

    A ``gguf:`` source names a file, not a family: its template comes from the Hugging
    Face directory it was converted into (``loaded.path``, whose config.json names the
    architecture). Every other source resolves as :func:`resolve_chat_template` does.
    """
    source = loaded.source
    if chat_template == "auto" and source.startswith("gguf:") and loaded.path is not None:
        source = str(loaded.path)
    return resolve_chat_template(source, chat_template)


def stop_strings(template: str) -> list[str]:
    """End-of-turn markers that end a completion under `template`."""
    if template not in _STOP_STRINGS:
        raise ValueError(
            f"template={template!r} is not one of {tuple(_STOP_STRINGS)}"
        )
    return list(_STOP_STRINGS[template])


def system_text(config: Any) -> str:
    """The system prompt with `{reasoning_tag}`/`{answer_tag}` filled in.

    Args:
      config: a :class:`PromptFormat`, or any object with `system_prompt`,
        `reasoning_tag` and `answer_tag` (a run's config).

    Plain replacement rather than `str.format`, so that a literal prompt with
    other braces (a JSON example, say) is left untouched.
    """
    return (
        config.system_prompt.replace("{reasoning_tag}", config.reasoning_tag)
        .replace("{answer_tag}", config.answer_tag)
        .strip()
    )


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """Everything that turns a question into prompt text: a value, not a whole config.

    Built once per run (:meth:`from_config`, which resolves the chat template, and may
    read the model's config.json for that), then passed to :func:`format_prompt` for
    every question.

    Attributes:
      template: a resolved chat template: "gemma", "chatml", "llama3" or "none".
      system_prompt: the system prompt, `{reasoning_tag}`/`{answer_tag}` not yet
        filled in; "" leaves out the system block.
      reasoning_tag, answer_tag: the tag names the system prompt asks for (and the
        rewards parse).
    """

    template: str
    system_prompt: str = ""
    reasoning_tag: str = "reasoning"
    answer_tag: str = "answer"

    def __post_init__(self) -> None:
        if self.template not in _STOP_STRINGS:
            raise ValueError(
                f"template={self.template!r} is not one of {tuple(_STOP_STRINGS)} "
                "(resolve 'auto' with resolve_chat_template or PromptFormat.from_config)"
            )

    @classmethod
    def from_config(cls, config: Any, *, template: str | None = None) -> PromptFormat:
        """The prompt format of a run's config.

        Args:
          config: reads `model`, `chat_template`, `system_prompt`, `reasoning_tag`
            and `answer_tag` (a `ColabTrainingConfig`, or any object with them).
          template: an already resolved template; skips :func:`resolve_chat_template`
            (and `config.model`, `config.chat_template`).

        Raises:
          ValueError: an unknown template, or one that cannot be inferred.
        """
        if template is None:
            template = resolve_chat_template(config.model, config.chat_template)
        return cls(template=template, system_prompt=config.system_prompt,
                   reasoning_tag=config.reasoning_tag, answer_tag=config.answer_tag)

    @property
    def system(self) -> str:
        """The system text sent: :func:`system_text` of this format."""
        return system_text(self)


def _criterion_text(criterion: Any) -> str:
    text = criterion if isinstance(criterion, str) else getattr(criterion, "text", None)
    if not isinstance(text, str):
        raise TypeError(
            f"rubric criterion {criterion!r} is neither a str nor has a str `.text`"
        )
    if not text.strip():
        raise ValueError("rubric criterion is empty")
    return text.strip()


def _user_text(question: str, rubric: Iterable[Any] | None) -> str:
    criteria = [_criterion_text(c) for c in rubric or ()]
    if not criteria:
        return question
    lines = "\n".join(f"- {c}" for c in criteria)
    return f"{question}\n\nYour answer will be judged on:\n{lines}"


def format_prompt(
    question: str,
    config: Any,
    rubric: Iterable[Any] | None = None,
    *,
    template: str | None = None,
) -> str:
    """Builds the prompt text for one question (no BOS; the tokenizer adds it).

    Args:
      question: the task text; surrounding whitespace is stripped.
      config: a :class:`PromptFormat`, or a run's config (any object with the fields
        :meth:`PromptFormat.from_config` reads), converted here.
      rubric: optional criteria (str, or objects with a `.text` str), listed
        after the question under "Your answer will be judged on:"
        (:func:`jaxpost.rewards.rubrics.policy_rubric` gives them for a dataset's rubric).
      template: a resolved template name that overrides the format's; with a
        config, it skips `resolve_chat_template` (which may read config.json) when
        formatting many prompts.

    Returns:
      The prompt, ending where the model's turn starts. An empty system prompt
      leaves out the system block.

    Raises:
      ValueError: empty question or unknown template.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    if not isinstance(config, PromptFormat):
        config = PromptFormat.from_config(config, template=template)
    elif template is not None and template != config.template:
        config = dataclasses.replace(config, template=template)
    template = config.template
    system = config.system
    user = _user_text(question.strip(), rubric)

    if template == "gemma":
        # Gemma has no system role: the system text opens the user turn, as in
        # Tunix's GRPO demo.
        content = f"{system}\n\n{user}" if system else user
        return f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
    if template == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "llama3":
        head = (
            f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            if system
            else ""
        )
        return (
            f"{head}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    # "none": PromptFormat admits no other template.
    return f"{system}\n\n{user}\n" if system else f"{user}\n"


# Jinja chat templates (Hugging Face's `chat_template`, GGUF's `tokenizer.chat_template`)
# that render the same text as `format_prompt`. A conversation's first message may be a
# system message; without one, the run's system text stands in. The Gemma template is the
# Hugging Face Hub's Gemma 3 template (text parts only) with that default added.
_JINJA_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
)
_JINJA_BODIES = {
    "gemma": (
        "{%- set first_user_prefix = system | trim + '\\n\\n' if system | trim else '' -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
        "{%- elif message['content'] is iterable -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
        "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    "chatml": (
        "{%- if system | trim -%}"
        "{{ '<|im_start|>system\\n' + system | trim + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim"
        " + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{%- if system | trim -%}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim"
        " + '<|eot_id|>' }}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "none": (
        "{%- if system | trim -%}{{ system | trim + '\\n\\n' }}{%- endif -%}"
        "{%- for message in loop_messages -%}{{ message['content'] | trim + '\\n' }}"
        "{%- endfor -%}"
    ),
}


def _jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (escapes every Jinja engine reads)."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f"'{escaped}'"


def jinja_chat_template(template: str, system: str = "", *, bos: bool = True) -> str:
    """The Jinja chat template that renders :func:`format_prompt`'s text.

    Args:
      template: a resolved template name: "gemma", "chatml", "llama3" or "none".
      system: the system text used when a conversation has no system message (a run's
        :func:`system_text`); "" for none.
      bos: start with ``bos_token``, for a tokenizer that adds BOS to plain text (as
        jaxpost's Gemma tokenizers do), so that ``apply_chat_template`` (which adds no
        special tokens) gives the ids jaxpost's tokenizer gives for the prompt.

    Returns:
      A template for ``messages`` (``role`` and ``content``), ``add_generation_prompt``,
      ``bos_token`` and ``raise_exception``, as Hugging Face's tokenizers and llama.cpp
      call it. For ``[system?, user]`` with ``add_generation_prompt=True`` it renders
      ``bos_token + format_prompt(user content)`` under that system text.

    Raises:
      ValueError: an unknown or unresolved template.
    """
    if template not in _JINJA_BODIES:
        raise ValueError(f"template={template!r} is not one of {tuple(_JINJA_BODIES)}")
    head = "{{ bos_token }}" if bos else ""
    return (f"{head}{{%- set DEFAULT_SYSTEM = {_jinja_string(system)} -%}}"
            f"{_JINJA_SYSTEM}{_JINJA_BODIES[template]}")
