"""Text generation with Tunix's sampler, for any loaded model (with or without LoRA)."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from jaxpost.runtime.mesh import use_mesh
from jaxpost.models.loading import LoadedModel
from jaxpost.data.prompts import PromptFormat, format_prompt, model_chat_template
from jaxpost.tunix_ext.sampler import build_sampler


def make_sampler(model: nnx.Module, loaded: LoadedModel, cache_size: int):
    """A Tunix ``Sampler`` for ``model`` (the base or a LoRA-wrapped copy of ``loaded.model``).

    Args:
      cache_size: KV-cache length in tokens; must hold the prompt plus new tokens.
    """
    cfg = loaded.model_config
    return build_sampler(model, loaded.tokenizer, cache_size=cache_size,
                         num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim)


def chat_prompt(text: str, loaded: LoadedModel, chat_template: str = "auto", *,
                prompt_config=None) -> str:
    """Wraps ``text`` as one user turn.

    Args:
      chat_template: a template name; "auto": ``prompt_config``'s, else the model
        family's (:func:`jaxpost.data.prompts.model_chat_template`).
      prompt_config: the settings of a run whose prompt format to use (its
        ``chat_template``, ``system_prompt`` and tags, e.g. the ``config.yaml`` of the
        adapters being sampled), or a :class:`jaxpost.data.prompts.PromptFormat`; None: no
        system text.
    """
    if isinstance(prompt_config, PromptFormat):
        if chat_template == "auto":
            return format_prompt(text, prompt_config)
        return format_prompt(text, prompt_config, template=chat_template)
    if chat_template == "auto" and prompt_config is not None:
        chat_template = prompt_config.chat_template
    template = model_chat_template(loaded, chat_template)
    if prompt_config is None:
        return format_prompt(text, PromptFormat(template))
    return format_prompt(text, PromptFormat.from_config(prompt_config, template=template))


def generate(
    loaded: LoadedModel,
    prompts: str | Sequence[str],
    *,
    model: nnx.Module | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
    chat_template: str = "auto",
    max_prompt_length: int | None = None,
    sampler=None,
) -> list[str]:
    """Generates a continuation for each prompt.

    Args:
      loaded: the loaded model (tokenizer, config, mesh).
      prompts: one prompt or a list; BOS is added by the tokenizer.
      model: the module to sample from (default ``loaded.model``; pass a LoRA model to
        sample from the adapted weights).
      max_new_tokens: tokens to generate per prompt.
      temperature: 0 means greedy decoding.
      top_k, top_p: sampling filters (ignored when greedy).
      seed: sampling seed.
      chat: wrap each prompt as a user turn in the family's chat template.
      max_prompt_length: pad prompts to this many tokens (fixing it avoids recompiling
        for every prompt length); default: the longest prompt.
      sampler: a sampler from :func:`make_sampler` to reuse across calls.

    Returns:
      The generated text of each prompt, without the prompt, cut at the end-of-turn token.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise ValueError("prompts is empty")
    if chat:
        batch = [chat_prompt(p, loaded, chat_template) for p in batch]
    longest = max(len(loaded.tokenizer.encode(p)) + 1 for p in batch)
    max_prompt_length = max(max_prompt_length or 0, longest)
    if sampler is None:
        sampler = make_sampler(model if model is not None else loaded.model, loaded,
                               cache_size=max_prompt_length + max_new_tokens)
    greedy = temperature == 0.0
    with use_mesh(loaded.mesh):
        out = sampler(
            batch,
            max_generation_steps=max_new_tokens,
            max_prompt_length=max_prompt_length,
            temperature=1.0 if greedy else temperature,
            top_k=None if greedy else top_k,
            # Tunix samples only in top-p mode; top_p=None would silently mean greedy.
            top_p=None if greedy else (1.0 if top_p is None else top_p),
            seed=seed,
            eos_tokens=list(loaded.eos_ids),
            echo=False,
        )
    return list(out.text)
