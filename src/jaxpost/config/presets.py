"""Named presets: each a function returning a :class:`ColabTrainingConfig`, with the
command that reproduces it in its docstring."""

import dataclasses
import difflib
from collections.abc import Callable

from jaxpost.config.choices import REFERENCE_JUDGE
from jaxpost.config.fields import ColabTrainingConfig


def default_config() -> ColabTrainingConfig:
    """Embedded Gemma 3 270M on CPU, reasoning-gym arithmetic: an SFT warm-up, then GRPO.

    The 270M model is pretrained, not instruction-tuned: asked a question it repeats the
    prompt. 40 warm-up steps on demonstrations whose rationale is built from each task
    entry's own expression (verified by the task) teach the answer format; then 8 GRPO
    steps of 4 prompts x 4 completions on the task's reward, with no KL penalty (beta=0:
    the reference would be the prompt-echoing base model) and a small learning rate
    (larger ones lowered held-out accuracy; see docs/log.md). About 10 minutes on a
    2-core CPU.

    Reproduce: `jaxpost train --preset default`
    """
    return ColabTrainingConfig(sft_steps=40, sft_learning_rate=1e-3, sft_batch_size=8,
                               beta=0.0, learning_rate=3e-5, batch_size=4,
                               num_generations=4, num_batches=8)


def smoke_config() -> ColabTrainingConfig:
    """Tiny random model, 2 steps: exercises the whole pipeline in seconds (tests).

    With `algorithm=dpo`, the pairs come from `self+demonstrations`: every sample of the
    random model scores 0, so only the task's demonstrations give a preferred side.

    Reproduce: `jaxpost train --preset smoke` (DPO: `--set algorithm=dpo`)
    """
    return ColabTrainingConfig(
        model="random:gemma3-tiny", max_steps=2, batch_size=2, num_generations=2,
        max_new_tokens=8, max_prompt_length=96, max_examples=16, eval_size=4,
        save_interval_steps=1, output_dir="runs/smoke",
        preference_data="self+demonstrations")


def rubric_demo_config() -> ColabTrainingConfig:
    """Embedded Gemma 3 270M on the shipped example rubrics, judged by itself (frozen).

    Short science explanations; the reward is format plus the rubric reward (explicit
    aggregation), with the run's frozen base model as the yes/no judge of each criterion.

    Reproduce: `jaxpost train --preset rubric_demo`
    """
    return ColabTrainingConfig(
        dataset="rubric-demo", max_examples=None, eval_size=2,
        reward_functions=("format_exact", "format_approximate", "rubric"),
        reward_weights=(0.5, 0.5, 2.0), judge="model", judge_model=REFERENCE_JUDGE,
        max_prompt_length=128, max_new_tokens=96, judge_batch_size=16,
        output_dir="runs/rubric_demo")


def rubric_smoke_config() -> ColabTrainingConfig:
    """rubric_demo on the tiny random model, 2 steps: the rubric pipeline in seconds (tests).

    Reproduce: `jaxpost train --preset rubric_smoke`
    """
    return dataclasses.replace(
        smoke_config(), dataset="rubric-demo", eval_size=2, max_examples=None,
        reward_functions=("format_exact", "rubric"), judge="model",
        judge_model=REFERENCE_JUDGE, judge_batch_size=8, max_prompt_length=128,
        output_dir="runs/rubric_smoke")


def colab_tpu_config() -> ColabTrainingConfig:
    """Gemma 3 1B-IT from Kaggle on GSM8K, settings of Tunix's GRPO demo, Colab TPU v2-8.

    The v2-8's eight cores (8 GiB each) form a mesh of fsdp=2 x tp=4.

    Reproduce: `jaxpost train --preset colab_tpu`
    """
    return ColabTrainingConfig(
        model="kaggle:google/gemma-3/flax/gemma3-1b-it", dtype="bfloat16", dataset="gsm8k",
        max_examples=None, eval_size=100, lora_rank=64, lora_alpha=64.0,
        num_generations=4, num_iterations=1, beta=0.08, epsilon=0.2, temperature=0.9,
        top_k=50, top_p=1.0, max_prompt_length=256, max_new_tokens=768,
        learning_rate=3e-6, warmup_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.99,
        max_grad_norm=0.1, batch_size=1, num_batches=3738, save_interval_steps=500,
        max_to_keep=4, save_to_drive=True, output_dir="runs/colab_tpu", mesh_fsdp=2, mesh_tp=4)


def colab_tpu_v5e1_config() -> ColabTrainingConfig:
    """colab_tpu on Colab's single-chip TPU v5e-1 (16 GiB): one device, no sharding.

    Reproduce: `jaxpost train --preset colab_tpu_v5e1`
    """
    return dataclasses.replace(colab_tpu_config(), mesh_fsdp=1, mesh_tp=1,
                               output_dir="runs/colab_tpu_v5e1")


def kaggle_tpu_config() -> ColabTrainingConfig:
    """colab_tpu on a Kaggle v5e-8: more memory allows 4 prompts per step; no Drive.

    Reproduce: `jaxpost train --preset kaggle_tpu`
    """
    return dataclasses.replace(
        colab_tpu_config(), save_to_drive=False, output_dir="/kaggle/working/jaxpost",
        batch_size=4, mini_batch_size=4)


def gpu_config() -> ColabTrainingConfig:
    """colab_tpu's recipe on one GPU of about 16 GB (Colab or Kaggle T4): 512 new tokens.

    Reproduce: `jaxpost train --preset gpu`
    """
    return dataclasses.replace(colab_tpu_config(), max_new_tokens=512, mesh_fsdp=1, mesh_tp=1,
                               output_dir="runs/gpu")


def cpu_config() -> ColabTrainingConfig:
    """The default preset under its platform's name: embedded Gemma 3 270M, minutes on a CPU.

    Reproduce: `jaxpost train --preset cpu`
    """
    return default_config()


PRESETS: dict[str, Callable[[], ColabTrainingConfig]] = {
    "default": default_config,
    "smoke": smoke_config,
    "rubric_demo": rubric_demo_config,
    "rubric_smoke": rubric_smoke_config,
    "colab_tpu": colab_tpu_config,
    "colab_tpu_v5e1": colab_tpu_v5e1_config,
    "kaggle_tpu": kaggle_tpu_config,
    "gpu": gpu_config,
    "cpu": cpu_config,
}


def get_preset(name: str) -> ColabTrainingConfig:
    """Build the preset called `name`; unknown names fail with the closest match."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown preset '{name}';{hint} available: {', '.join(PRESETS)}")
    return PRESETS[name]()
