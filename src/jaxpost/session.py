"""A training session: the loaded model, its LoRA copy, data and rewards, ready to train."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from flax import nnx

from jaxpost.config import ColabTrainingConfig
from jaxpost.data.datasets import prepare_datasets
from jaxpost.data.demonstrations import load_demonstrations
from jaxpost.data.preferences import load_preference_jsonl, uses_demonstrations
from jaxpost.data.prompts import resolve_chat_template
from jaxpost.models.loading import LoadedModel, count_params, load_model
from jaxpost.models.lora import apply_lora
from jaxpost.rewards.judges import JudgeSettings, build_judge
from jaxpost.rewards.registry import check_reward_config, create_reward_functions, uses_judge
from jaxpost.runtime.cache import enable_compilation_cache
from jaxpost.runtime.credentials import check_model_access, resolve_credentials
from jaxpost.runtime.platform import detect_platform


@dataclasses.dataclass
class ColabSession:
    """Everything a run needs besides its config.

    Attributes:
      loaded: the base model, tokenizer, model config and mesh (the base model is also
        GRPO's frozen reference).
      lora_model: the trainable policy: the base model with LoRA adapters.
      train_dataset, eval_dataset: Grain datasets of batches (eval may be None).
      reward_fns: Tunix-compatible reward callables, weights applied.
      template: the resolved chat template name.
      credentials: secrets for hubs, owned by the session and never saved with a run.
      judge: the judge bound into the rubric reward (``jaxpost.rewards.judges``), or None when
        no reward needs one; training logs its ``stats``.
      demonstrations: the SFT warm-up's demonstrations (``jaxpost.data.demonstrations``),
        empty when ``sft_steps`` is 0 (and DPO's pairs do not use them).
      preferences: DPO's pairs from a preference file (``jaxpost.data.preferences``), read
        before the model loads; empty unless ``algorithm="dpo"`` with
        ``preference_data="preference-jsonl:..."`` (``self`` pairs are sampled by
        ``jaxpost.dpo`` from the policy the stage starts from).
    """

    loaded: LoadedModel
    lora_model: nnx.Module
    train_dataset: Any
    eval_dataset: Any
    reward_fns: list[Callable]
    template: str
    credentials: Any = None
    judge: Any = None
    demonstrations: list = dataclasses.field(default_factory=list)
    preferences: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: platform, devices, mesh, model, parameter and LoRA parameter counts."""
        mesh = self.loaded.mesh
        platform = detect_platform(mesh.devices.flatten())
        sizes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
        base = count_params(self.loaded.model)
        lora = count_params(self.lora_model, nnx.LoRAParam)
        return (f"{platform.describe()} | mesh {sizes} | model {self.loaded.source} "
                f"({self.loaded.family}, {base / 1e6:.1f}M params) | LoRA {lora / 1e6:.2f}M "
                f"trainable params")


def check_prompt_lengths(dataset, tokenizer, max_prompt_length: int) -> None:
    """Refuses prompts longer than ``max_prompt_length`` tokens (BOS included).

    Tunix would otherwise silently pad every batch to the next power of two and fail
    later on the KV-cache size; this names the setting to change instead.
    """
    prompts = {str(p) for batch in dataset for p in batch["prompts"]}
    if not prompts:
        return
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    if longest > max_prompt_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} is too small: the longest formatted prompt "
            f"has {longest} tokens. Raise max_prompt_length to at least {longest}, or shorten "
            f"system_prompt / max_examples.")


def _preference_pairs(source: str, eval_dataset, *, seed: int,
                      max_examples: int | None) -> list:
    """The pairs of the preference file ``source`` (a config's ``preference_data``, loaded
    with :func:`jaxpost.data.preferences.load_preference_jsonl`), less those asking a
    held-out question of ``eval_dataset``."""
    pairs = load_preference_jsonl(source, seed=seed, max_examples=max_examples)
    held_out = ({str(q) for batch in eval_dataset for q in batch["question"]}
                if eval_dataset is not None else set())
    kept = [p for p in pairs if p.question not in held_out]
    if not kept:
        raise ValueError(f"preference_data={source!r}: all {len(pairs)} pairs "
                         "ask held-out questions of the dataset (eval_size); nothing is left "
                         "to train on")
    if len(kept) < len(pairs):
        print(f"jaxpost: {len(pairs) - len(kept)} preference pairs ask held-out questions "
              "and are left out", flush=True)
    return kept


def prepare_session(config: ColabTrainingConfig, *, credentials: Any = None,
                    loaded: LoadedModel | None = None) -> ColabSession:
    """Loads model, tokenizer and data, checks rewards, and wraps the model with LoRA.

    Data and rewards are checked first: they are cheap, and a mistake there should not
    cost a model load.

    Args:
      config: the run's configuration.
      credentials: hub credentials (kept in the session only, and exported to the
        environment for huggingface_hub and kagglehub); default: looked up with
        ``jaxpost.runtime.credentials.resolve_credentials()``.
      loaded: an already loaded base model to reuse (must match ``config.model``).

    Raises:
      PermissionError: a gated model without the credentials it needs, naming them.
    """
    t0 = time.time()
    enable_compilation_cache()
    credentials = resolve_credentials() if credentials is None else credentials
    credentials.apply_to_environment()
    for note in credentials.notes:
        print(f"jaxpost: {note}", flush=True)
    if loaded is None:
        check_model_access(config.model, credentials)
    template = resolve_chat_template(config.model, config.chat_template)
    check_reward_config(config)
    train_ds, eval_ds = prepare_datasets(config)
    dpo = config.algorithm == "dpo"
    demonstrations, preferences = [], []
    if config.sft_steps > 0 or (dpo and uses_demonstrations(config.preference_data)):
        demonstrations = load_demonstrations(
            config.sft_data, dataset=config.dataset, seed=config.seed,
            max_examples=config.max_examples, reasoning_tag=config.reasoning_tag,
            answer_tag=config.answer_tag)
    if dpo and not config.preference_data.strip().startswith("self"):
        preferences = _preference_pairs(config.preference_data, eval_ds, seed=config.seed,
                                        max_examples=config.max_examples)
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, mesh_fsdp=config.mesh_fsdp,
                            mesh_tp=config.mesh_tp, seed=config.seed)
    for dataset in (train_ds, eval_ds):
        if dataset is not None:
            check_prompt_lengths(dataset, loaded.tokenizer, config.max_prompt_length)
    # Built after the model: the default model judge is the frozen base model itself.
    judge = (build_judge(JudgeSettings.from_config(config), loaded, template=template)
             if uses_judge(config) else None)
    reward_fns = create_reward_functions(config, judge=judge)
    lora_model = apply_lora(loaded.model, loaded.mesh, rank=config.lora_rank,
                            alpha=config.lora_alpha, target_modules=config.lora_target_modules,
                            seed=config.seed)
    session = ColabSession(loaded, lora_model, train_ds, eval_ds, reward_fns, template,
                           credentials, judge, demonstrations, preferences)
    print(f"jaxpost: {session.summary()} (ready in {time.time() - t0:.0f}s)", flush=True)
    return session
