"""The notebook's API: one call per stage, ``run_full_pipeline`` for all of them.

    Config -> Session -> TrainerState -> exported checkpoint -> evaluation report

This module is a thin facade over ``config``, ``platform``, ``credentials``, ``session``,
``sft``, ``train``, ``export``, ``evaluate`` and ``plots``; the notebook
(``demo/train_colab.ipynb``) and ``jaxpost train`` call only these. ``format_prompt``,
``prepare_datasets`` and ``create_reward_functions`` show, without loading a model, the
prompts, data and rewards a config trains with (the functions training itself calls).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from jaxpost.config import ColabTrainingConfig, describe, from_dict, get_preset
from jaxpost.data import datasets as _data
from jaxpost.data import prompts as _prompts
from jaxpost.data.datasets import parse_dataset_spec
from jaxpost.dpo import train_dpo
from jaxpost.evaluate import Comparison, EvalReport, compare, evaluate
from jaxpost.export import export_checkpoint, export_from_lora_dir, export_run, push_to_hub
from jaxpost.plots import show_training_curves
from jaxpost.rewards import registry as _rewards
from jaxpost.rewards.rubrics import policy_rubric
from jaxpost.runtime.credentials import Credentials, resolve_credentials
from jaxpost.runtime.platform import PlatformInfo, auto_config, detect_platform, resolve_output_dir
from jaxpost.sampling import generate
from jaxpost.session import ColabSession, prepare_session
from jaxpost.sft import SFTState, train_sft
from jaxpost.train import TrainerState, train_grpo

__all__ = [
    "ColabTrainingConfig",
    "ColabSession",
    "Comparison",
    "Credentials",
    "EvalReport",
    "PlatformInfo",
    "TrainerState",
    "describe",
    "detect_platform",
    "get_preset",
    "make_config",
    "format_prompt",
    "prepare_datasets",
    "create_reward_functions",
    "resolve_credentials",
    "prepare_colab_session",
    "SFTState",
    "train_sft",
    "train_grpo",
    "train_dpo",
    "train_policy",
    "held_out_comparison",
    "export_checkpoint",
    "export_run",
    "export_from_lora_dir",
    "push_to_hub",
    "quick_test",
    "run_full_pipeline",
    "show_training_curves",
    "evaluate",
    "compare",
]

DEFAULT_TEST_QUESTION = "Calculate 7 + 5."


def make_config(preset: str = "auto", platform: PlatformInfo | None = None,
                **settings) -> ColabTrainingConfig:
    """The notebook's config: a preset, the settings given over it, and where it writes.

    Args:
      preset: a preset name (``jaxpost.config.PRESETS``), or ``"auto"`` for the one sized
        for the detected platform, with its mesh and memory defaults
        (``jaxpost.runtime.platform.auto_config``).
      platform: the detected platform (default: detected now).
      settings: config fields; a value may be typed or a string in ``--set`` syntax
        (``"20"``, ``"true"``, ``"none"``); an empty string keeps the preset's value.

    Returns:
      The config, with ``output_dir`` on Google Drive when ``save_to_drive`` is set on
      Colab (``jaxpost.runtime.platform.resolve_output_dir``).
    """
    platform = platform or detect_platform()
    base = auto_config(platform) if preset == "auto" else get_preset(preset)
    config = from_dict({k: v for k, v in settings.items() if v != ""}, base=base)
    return dataclasses.replace(config, output_dir=resolve_output_dir(config, platform=platform))


def format_prompt(question: str, config: ColabTrainingConfig, rubric: Any = None) -> str:
    """The prompt text training sends the policy for ``question`` under ``config``.

    The same text as the ``prompts`` column of :func:`prepare_datasets`: the config's
    system prompt (tags filled in) and question in its model's chat template
    (``chat_template``, "auto" inferred from ``model``), ending where the model's turn
    begins, without BOS (the tokenizer adds it).

    Args:
      question: the task text; surrounding whitespace is stripped.
      config: the run's configuration; reads ``model``, ``chat_template``,
        ``system_prompt``, ``reasoning_tag``, ``answer_tag`` and ``rubric_in_prompt``.
      rubric: the question's rubric, in any form of a rubric dataset's ``rubric``
        column (a list of criteria, or its JSON; ``jaxpost.rewards.rubrics.parse_rubric``).
        With ``rubric_in_prompt`` set its criteria are listed after the question
        (pitfalls as "Avoid: ..."), as training lists them; without it training shows
        the policy no rubric (only the judge reads it), and neither does this.

    Returns:
      The prompt text.

    Raises:
      ValueError: an empty question, or a chat template that cannot be inferred.
      jaxpost.rewards.rubrics.MalformedRubric: a rubric that does not parse (when it is shown).
    """
    criteria = None
    if rubric is not None and getattr(config, "rubric_in_prompt", False):
        criteria = policy_rubric(rubric)
    return _prompts.format_prompt(question, _prompts.PromptFormat.from_config(config), criteria)


def prepare_datasets(config: ColabTrainingConfig) -> tuple[Any, Any]:
    """The training and held-out datasets a run of ``config`` uses (no model needed).

    The datasets ``prepare_colab_session`` puts in the session
    (``jaxpost.data.datasets.prepare_datasets``): ``config.dataset`` read with ``config.seed``
    (``max_examples`` of them), the first ``eval_size`` examples held out, every example
    given its formatted prompt (:func:`format_prompt`).

    Returns:
      ``(train, eval)``: Grain datasets whose items are batches, dicts of 1-D numpy
      arrays of length ``batch_size`` (``prompts``, ``question``, ``answer`` and the
      task's other columns). Train holds the batches the run consumes, reshuffled each
      epoch; eval holds the held-out examples (a smaller last batch), or is None when
      ``eval_size`` is 0.

    Raises:
      ValueError: a bad dataset spec, ``eval_size`` not below the number of examples,
        fewer train examples than one batch, or ``rubric_in_prompt`` on a dataset
        without rubrics.
      FileNotFoundError: a dataset file that does not exist.
    """
    return _data.prepare_datasets(config)


def create_reward_functions(config: ColabTrainingConfig, *,
                            judge: Any = None) -> list[Callable[..., list[float]]]:
    """The reward functions a run of ``config`` trains with, from the reward registry.

    Those of ``prepare_colab_session`` (``jaxpost.rewards.registry.create_reward_functions``):
    one per name in ``config.reward_functions``, in that order, each with Tunix's
    signature ``f(prompts, completions, **columns) -> list[float]`` (the dataset's
    columns, such as ``answer``, as keyword arguments), bound to the config's
    ``reasoning_tag`` / ``answer_tag``, scaled by its ``reward_weights`` entry, and
    named after its registry name (Tunix logs it as ``rewards/<name>``).

    Args:
      config: the run's configuration.
      judge: the judge of a reward that needs one (``rubric``):
        ``build_judge(JudgeSettings.from_config(config), session.loaded)`` (both from
        ``jaxpost.rewards.judges``), as the session builds it.

    Returns:
      One callable per reward name.

    Raises:
      ValueError: no, repeated or unknown reward names, a ``reward_weights`` count that
        differs from the names', or a reward that needs a judge without one.
    """
    return _rewards.create_reward_functions(config, judge=judge)


def prepare_colab_session(config: ColabTrainingConfig, *,
                          credentials: Credentials | None = None) -> ColabSession:
    """Loads the model, tokenizer, LoRA model and data for ``config``.

    Args:
      config: the run's configuration.
      credentials: hub credentials kept in the session (never in the config); default:
        ``resolve_credentials()`` (Colab secrets, Kaggle secrets, environment).
    """
    return prepare_session(config, credentials=credentials)


def quick_test(config: ColabTrainingConfig, session: ColabSession,
               test_question: str | None = None, trainer_state: TrainerState | None = None,
               max_new_tokens: int | None = None) -> str:
    """Answers one question with the trained policy (greedy) and prints it.

    Args:
      test_question: the question (default: the first held-out question, else a sum).
      trainer_state: the state from ``train_grpo``; default: the session's LoRA model.
      max_new_tokens: default ``config.max_new_tokens``.

    Returns:
      The completion text.
    """
    if test_question is None:
        test_question = _first_eval_question(session) or DEFAULT_TEST_QUESTION
    model = trainer_state.lora_model if trainer_state is not None else session.lora_model
    prompt = format_prompt(test_question, config)
    [answer] = generate(session.loaded, prompt, model=model,
                        max_new_tokens=max_new_tokens or config.max_new_tokens)
    print(f"jaxpost quick test\n  question: {test_question}\n  answer:   {answer.strip()}",
          flush=True)
    return answer


def _first_eval_question(session: ColabSession) -> str | None:
    if session.eval_dataset is None or len(session.eval_dataset) == 0:
        return None
    return str(session.eval_dataset[0]["question"][0])


def held_out_spec(dataset: str) -> str:
    """The dataset the held-out comparison reads: GSM8K's test split for GSM8K's training
    data, else the run's own spec (drawn with another seed by the caller). A local file
    read with another seed is only reordered: point ``jaxpost eval`` at its test file."""
    spec = parse_dataset_spec(dataset)
    if spec.kind == "gsm8k" and spec.arg in (None, "train"):
        return "gsm8k:test"
    return dataset


# Added to the run's seed for the held-out examples: reasoning-gym draws new ones.
HELD_OUT_SEED_OFFSET = 1000


def held_out_comparison(config: ColabTrainingConfig, session: ColabSession,
                        num_examples: int | None = None) -> Comparison:
    """Base model against the trained run on held-out examples, greedy; prints the table.

    The examples are GSM8K's test split for a GSM8K run, else the run's task drawn with
    ``seed + 1000``; the trained side is the run's latest checkpoint (GRPO's or DPO's, or
    the SFT warm-up's when the run had no steps after it). Format rate and accuracy are read together:
    format up with accuracy down would be reward hacking.

    Args:
      num_examples: default ``config.final_eval_examples``.
    """
    n = num_examples or config.final_eval_examples
    data = held_out_spec(config.dataset)
    seed = config.seed + HELD_OUT_SEED_OFFSET
    result = compare(config.model, lora_a=None, lora_b=config.output_dir, data=data,
                     num_examples=n, max_new_tokens=config.max_new_tokens,
                     batch_size=min(8, n), seed=seed, loaded=session.loaded)
    print(f"jaxpost: held-out comparison on {n} examples of {data} (seed {seed}), greedy\n"
          f"{result.table()}", flush=True)
    return result


def train_policy(config: ColabTrainingConfig, session: ColabSession) -> TrainerState:
    """The training stage after the SFT warm-up, with the config's ``algorithm``: GRPO,
    its relatives and PPO (:func:`train_grpo`), or DPO (:func:`train_dpo`).

    Resumes from the stage's newest checkpoint in ``config.output_dir``.

    Returns:
      The :class:`TrainerState` of the trained LoRA model and its metrics history.
    """
    if config.algorithm == "dpo":
        return train_dpo(config, session)
    return train_grpo(config, session)


def run_full_pipeline(config: ColabTrainingConfig, *, credentials: Credentials | None = None
                      ) -> tuple[ColabSession, TrainerState, Path]:
    """Prepares, runs the SFT warm-up (when ``sft_steps`` > 0) and then GRPO, or DPO for
    ``algorithm="dpo"`` (when there are steps), each resuming from its checkpoints, then
    exports, quick-tests, and compares base and trained models on held-out examples
    (``final_eval_examples``).

    Prints the mean reward of the first and last steps (DPO: the share of pairs ranked
    right, and the margin).

    Returns:
      ``(session, trainer_state, export_path)``.
    """
    t0 = time.time()
    print(describe(config), flush=True)
    session = prepare_colab_session(config, credentials=credentials)
    train_sft(config, session)
    state = train_policy(config, session)
    path = export_checkpoint(config, state)
    quick_test(config, session, trainer_state=state)
    if config.final_eval_examples > 0:
        held_out_comparison(config, session)
    first, last = state.reward_at("first"), state.reward_at("last")
    if first is not None:
        print(f"jaxpost: mean reward of the first steps {first:.3f}, of the last steps "
              f"{last:.3f}", flush=True)
    dpo_rows = [h for h in state.history if "dpo/rewards/accuracy" in h]
    if dpo_rows:
        ends = [dpo_rows[0], dpo_rows[-1]]
        print("jaxpost: DPO pairs ranked right {:.2f} -> {:.2f}, margin {:.4f} -> {:.4f} "
              "(first and last step)".format(*(r["dpo/rewards/accuracy"] for r in ends),
                                             *(r["dpo/rewards/margin"] for r in ends)),
              flush=True)
    print(f"jaxpost: done in {time.time() - t0:.0f}s", flush=True)
    return session, state, path
