"""The SFT warm-up: supervised fine-tuning of the LoRA policy on demonstrations, before GRPO.

A pretrained model that is not instruction-tuned (the embedded Gemma 3 270M) continues
a chat turn instead of answering it: it repeats the system prompt, so GRPO's samples
hold no well-formed answer to reinforce. A few steps of supervised training on
well-formed answers (:mod:`jaxpost.data.demonstrations`) put the format within reach, as
published recipes for this task do before GRPO.

The stage trains the same LoRA model GRPO trains next, with Tunix's ``PeftTrainer``
(``tunix.sft``) and a loss on the completion tokens only: the mean negative
log-likelihood of each demonstration's completion (its end-of-turn token included) given
its prompt, formatted exactly as GRPO's prompts. On a Gemma 3 model the log-probs come
from :func:`jaxpost.tunix_ext.logps.completion_logps` (the vocabulary a chunk at a time);
other families use their full logits. Checkpoints go to ``<checkpoint_dir>/sft``: a run
stopped during the warm-up resumes it, one stopped later restores its final weights
without training again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpost.checkpoints import resume_step
from jaxpost.config import ColabTrainingConfig, save_yaml
from jaxpost.data.demonstrations import Demonstration
from jaxpost.data.prompts import PromptFormat, format_prompt, stop_strings
from jaxpost.rundir import RunDir
from jaxpost.runtime.mesh import use_mesh
from jaxpost.session import ColabSession
from jaxpost.train import CONFIG_FILE, METRICS_FILE, MetricsRecorder, make_optimizer, make_schedule
from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits, completion_logits_only
from jaxpost.tunix_ext.logps import completion_logps, positions_and_attention
from jaxpost.tunix_ext.trainers import build_sft_trainer

# Completion lengths are rounded up to a multiple of this, so that runs whose longest
# demonstration differs by a token or two share a compiled step.
_LENGTH_QUANTUM = 8


@dataclasses.dataclass
class SFTState:
    """The warm-up's outcome.

    Attributes:
      step: the last optimizer step completed (``config.sft_steps`` when finished).
      resumed_from: the checkpoint step it resumed from, or None for a fresh start.
      losses: the loss of each step run in this call, in order.
      num_demonstrations: demonstrations trained on (after the held-out ones and those
        too long for the budgets were left out).
      seconds: wall time of the stage.
    """

    step: int
    resumed_from: int | None
    losses: list[float]
    num_demonstrations: int
    seconds: float


def make_sft_schedule(*, peak: float, steps: int, warmup_ratio: float) -> optax.Schedule:
    """The warm-up's learning rate by step: linear warmup over ``warmup_ratio`` of
    ``steps`` from 0 to ``peak``, then cosine to 0 at ``steps``."""
    steps = max(steps, 1)
    return make_schedule(peak=peak, warmup_steps=int(warmup_ratio * steps), total_steps=steps)


def _completion_ids(tokenizer, text: str, end_id: int) -> list[int]:
    ids = list(tokenizer.encode(text))
    if ids and ids[0] == tokenizer.bos_id():
        ids = ids[1:]
    return ids + [end_id]


def end_of_turn_id(tokenizer, template: str, eos_ids: Sequence[int]) -> int:
    """The token a completion ends with under ``template``: its end-of-turn marker when
    the tokenizer reads it as one stop token (Gemma's ``<end_of_turn>``), else the
    first end-of-sequence id."""
    for marker in stop_strings(template):
        ids = list(tokenizer.encode(marker))
        if ids and ids[0] == tokenizer.bos_id():
            ids = ids[1:]
        if len(ids) == 1 and ids[0] in eos_ids:
            return ids[0]
    return int(eos_ids[0])


@dataclasses.dataclass(frozen=True)
class TokenizedDemonstrations:
    """Demonstrations as padded token arrays, ready to batch.

    Attributes:
      prompt_ids: ``[n, prompt_len]``, left-padded with ``pad_id`` (BOS included);
        ``prompt_len`` is the longest prompt rounded up to a multiple of 8.
      completion_ids: ``[n, completion_len]``, right-padded, ending with the end token
        (``completion_len`` likewise).
      completion_mask: ``[n, completion_len]``, 1 on completion tokens.
      skipped: demonstrations left out because a prompt or completion was too long.
    """

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    skipped: int


def tokenize_demonstrations(demos: Sequence[Demonstration], tokenizer, prompt_fn, *,
                            end_id: int, pad_id: int, max_prompt_length: int,
                            max_completion_length: int) -> TokenizedDemonstrations:
    """Tokenizes each demonstration as GRPO sees a rollout: the formatted prompt, then
    the completion and its end token.

    Args:
      prompt_fn: question -> the formatted prompt text (the run's system prompt and chat
        template).
      max_prompt_length, max_completion_length: token budgets (GRPO's
        ``max_prompt_length`` and ``max_new_tokens``); longer demonstrations are left out
        and counted.

    Raises:
      ValueError: no demonstration fits the budgets.
    """
    prompts, completions = [], []
    skipped = 0
    for demo in demos:
        p = list(tokenizer.encode(prompt_fn(demo.question)))
        c = _completion_ids(tokenizer, demo.completion, end_id)
        if len(p) > max_prompt_length or len(c) > max_completion_length:
            skipped += 1
            continue
        prompts.append(p)
        completions.append(c)
    if not prompts:
        raise ValueError(
            f"none of the {len(demos)} demonstrations fits max_prompt_length="
            f"{max_prompt_length} and max_new_tokens={max_completion_length} tokens: raise "
            "them, or give shorter demonstrations (sft_data)")
    def padded(lengths, budget):
        return min(budget, _LENGTH_QUANTUM * math.ceil(max(lengths) / _LENGTH_QUANTUM))

    # Padded to the longest demonstration, not the budgets: padding costs a step as much
    # as tokens do.
    prompt_len = padded(map(len, prompts), max_prompt_length)
    comp_len = padded(map(len, completions), max_completion_length)
    n = len(prompts)
    prompt_ids = np.full((n, prompt_len), pad_id, np.int32)
    completion_ids = np.full((n, comp_len), pad_id, np.int32)
    mask = np.zeros((n, comp_len), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, prompt_len - len(p):] = p
        completion_ids[i, :len(c)] = c
        mask[i, :len(c)] = 1
    return TokenizedDemonstrations(prompt_ids, completion_ids, mask, skipped)


def sft_batches(data: TokenizedDemonstrations, *, batch_size: int, steps: int,
                seed: int) -> list[dict[str, np.ndarray]]:
    """``steps`` batches of ``batch_size`` rows: the demonstrations in a seeded order,
    reshuffled each epoch. The same seed gives the same batches, so a resumed run
    (which skips the batches already trained) sees what an uninterrupted one sees."""
    n = len(data.prompt_ids)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n).tolist())
    batches = []
    for s in range(steps):
        rows = np.asarray(order[s * batch_size:(s + 1) * batch_size])
        batches.append({"prompt_ids": data.prompt_ids[rows],
                        "completion_ids": data.completion_ids[rows],
                        "completion_mask": data.completion_mask[rows]})
    return batches


def completion_nll(model: nnx.Module, prompt_ids, completion_ids, completion_mask, *,
                   pad_id: int):
    """Mean negative log-likelihood of the completion tokens (the SFT loss).

    Args:
      prompt_ids: ``[batch, prompt_len]``, left-padded. completion_ids, completion_mask:
        ``[batch, completion_len]``.

    Returns:
      A float32 scalar: ``-sum(mask * log p(token)) / sum(mask)``.
    """
    mask = completion_mask.astype(jnp.float32)
    if isinstance(model, Gemma3TrimmedLogits):
        logps, _ = completion_logps(model, prompt_ids, completion_ids, pad_id)
    else:
        ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
        valid = ids != pad_id
        positions, attn = positions_and_attention(valid)
        logits, _ = model(ids, positions, None, attn)
        comp = completion_ids.shape[1]
        logits = logits[:, -comp - 1:-1].astype(jnp.float32)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits), completion_ids[..., None],
                                    axis=-1)[..., 0]
    return -(logps * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _sft_loss(pad_id: int):
    # Tunix passes the batch as keyword arguments, and nnx.value_and_grad needs them to
    # bind to positional parameters (a partial's keyword-only pad_id does not).
    def loss(model, prompt_ids, completion_ids, completion_mask):
        return completion_nll(model, prompt_ids, completion_ids, completion_mask,
                              pad_id=pad_id)

    return loss


def _held_out_questions(session: ColabSession) -> set[str]:
    if session.eval_dataset is None:
        return set()
    return {str(q) for batch in session.eval_dataset for q in batch["question"]}


def train_sft(config: ColabTrainingConfig, session: ColabSession) -> SFTState | None:
    """Runs the SFT warm-up on ``session.lora_model`` in place; resumes from a checkpoint.

    Does nothing and returns None when ``config.sft_steps`` is 0 (no warm-up).

    Rerunning with the same ``output_dir`` continues from the newest finished warm-up
    checkpoint, and one that holds ``sft_steps`` restores those weights without
    training. Demonstrations whose question is among the session's held-out questions
    are left out. The loss, gradient norm and learning rate go to ``metrics.jsonl``
    (``sft/loss``, ...), TensorBoard and the printed progress lines.

    Returns:
      The warm-up's state (``step == config.sft_steps``), or None without a warm-up.

    Raises:
      ValueError: the session holds no demonstrations (it was prepared for a config
        without a warm-up).
      jaxpost.train.TrainingDiverged: the loss became NaN or infinite.
    """
    if config.sft_steps == 0:
        return None
    demos = getattr(session, "demonstrations", None)
    if not demos:
        raise ValueError("the session holds no demonstrations: call prepare_colab_session "
                         "with a config whose sft_steps > 0")
    t0 = time.time()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, str(out / CONFIG_FILE))
    ckpt_dir = str(RunDir(config.output_dir).sft_checkpoint_dir)
    # Tunix restores the newest step when it builds the trainer: step past unreadable ones.
    resumed_from = resume_step(ckpt_dir)

    held_out = _held_out_questions(session)
    kept = [d for d in demos if d.question not in held_out]
    loaded = session.loaded
    template = session.template
    prompt_format = PromptFormat.from_config(config, template=template)
    data = tokenize_demonstrations(
        kept, loaded.tokenizer, lambda q: format_prompt(q, prompt_format),
        end_id=end_of_turn_id(loaded.tokenizer, template, loaded.eos_ids),
        pad_id=loaded.tokenizer.pad_id(), max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_new_tokens)
    n = len(data.prompt_ids)
    notes = ([f"{len(demos) - len(kept)} with held-out questions"] if len(kept) < len(demos)
             else [])
    if data.skipped:
        notes.append(f"{data.skipped} over the token budgets")
    if resumed_from is not None and resumed_from >= config.sft_steps:
        print(f"jaxpost: SFT warm-up already finished (step {resumed_from} in {ckpt_dir}); "
              "loading its weights", flush=True)
    else:
        start = (f"resuming from step {resumed_from}" if resumed_from is not None
                 else "starting")
        print(f"jaxpost: SFT warm-up, {start}: {config.sft_steps} steps of "
              f"{config.sft_batch_size} on {n} demonstrations"
              f"{' (left out: ' + ', '.join(notes) + ')' if notes else ''}, "
              f"{data.completion_ids.shape[1]} completion tokens", flush=True)

    schedule = make_sft_schedule(peak=config.sft_learning_rate, steps=config.sft_steps,
                                 warmup_ratio=config.warmup_ratio)
    recorder = MetricsRecorder(out / METRICS_FILE, config.sft_steps, config.log_every_steps,
                               schedule=schedule, stage="sft")
    backends = [lambda: recorder]
    if config.tensorboard:
        # the TensorBoard writer loads only when a run logs to TensorBoard
        from metrax.logging.tensorboard_backend import TensorboardBackend

        tb_dir = str(config.tensorboard_dir)
        backends.append(lambda: TensorboardBackend(log_dir=tb_dir, flush_every_n_steps=1))
    pad_id = int(loaded.tokenizer.pad_id())
    batches = sft_batches(data, batch_size=config.sft_batch_size, steps=config.sft_steps,
                          seed=config.seed)
    model = session.lora_model
    with use_mesh(loaded.mesh), completion_logits_only([model], data.completion_ids.shape[1],
                                                       remat=config.remat):
        trainer = build_sft_trainer(
            model,
            # The run's AdamW settings, with the warm-up's own schedule and clip norm.
            make_optimizer(schedule, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay,
                           max_grad_norm=config.sft_max_grad_norm),
            checkpoint_dir=ckpt_dir,
            tensorboard_dir=os.path.abspath(config.tensorboard_dir), max_steps=config.sft_steps,
            save_interval_steps=config.save_interval_steps, max_to_keep=config.max_to_keep,
            metric_backends=backends,
            loss_fn=_sft_loss(pad_id))
        try:
            trainer.train(batches)
        finally:
            recorder.close()
        step = trainer.train_steps
    losses = [row["sft/loss"] for row in recorder.history() if "sft/loss" in row]
    seconds = time.time() - t0
    if losses:
        print(f"jaxpost: SFT warm-up finished at step {step} in {seconds:.0f}s (loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
    return SFTState(step=step, resumed_from=resumed_from, losses=losses,
                    num_demonstrations=n, seconds=seconds)
