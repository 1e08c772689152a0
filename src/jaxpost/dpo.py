"""The DPO stage: Direct Preference Optimization of the LoRA policy on preference pairs.

DPO (Rafailov et al. 2023) trains on pairs of completions to one prompt, one preferred
("chosen") to the other ("rejected"), with the loss ``-log sigmoid(beta * margin)``:
the margin is how much more the policy raised the chosen completion's log-probability,
relative to a frozen reference policy, than the rejected one's. No sampling happens
during training, and no reward is computed there: the preferences say it all.

The reference is the policy the stage starts from: the SFT-warmed weights when an SFT
warm-up ran, else the base model (the LoRA adapters start at zero). This is the
paper's choice (pi_ref = pi_SFT): the implicit reward ``beta * log(pi / pi_ref)``
measures what DPO itself changed, and at the first step the margin is 0 and the loss
log 2 for every pair. A reference at the base model would instead count the warm-up's
own changes as preference, and keep pulling the policy back towards a model that does
not answer in the format. The reference shares the base weights' arrays; only its
copy of the LoRA weights is extra.

Pairs come from ``preference_data`` (:mod:`jaxpost.data.preferences`). With ``self``, the
policy DPO starts from samples ``num_generations`` completions for each prompt of
``num_batches`` training batches (the same prompts, same seeds, every time the stage
runs, so a resumed run sees the pairs an uninterrupted one saw), the run's reward
functions score them, and the best of each group is paired with the worst. The pairs
are written to ``preference_pairs.jsonl`` in the output directory.

The stage uses Tunix's ``DPOTrainer`` (``jaxpost.tunix_ext.trainers.build_dpo_trainer``);
on Gemma 3 the sequence log-probs of policy and reference come from
:func:`jaxpost.tunix_ext.logps.completion_logps`. Checkpoints go to ``<checkpoint_dir>/dpo``
(export and evaluation read them), and a rerun with the same ``output_dir`` resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxpost.checkpoints import resume_step
from jaxpost.config import ColabTrainingConfig, save_yaml
from jaxpost.data.datasets import prepare_datasets
from jaxpost.data.preferences import (PreferencePair, pairs_from_groups, score_completions,
                                      uses_demonstrations)
from jaxpost.data.prompts import PromptFormat, format_prompt
from jaxpost.runtime.atomic import write_atomic
from jaxpost.runtime.mesh import use_mesh
from jaxpost.sampling import make_sampler
from jaxpost.session import ColabSession
from jaxpost.sft import end_of_turn_id
from jaxpost.train import (CONFIG_FILE, METRICS_FILE, MetricsRecorder, TrainerState, make_optimizer,
                           make_schedule, read_metrics, start_wandb)
from jaxpost.tunix_ext.checkpointing import (actor_checkpoint_dir, dpo_checkpoint_dir,
                                             latest_checkpoint_step, sft_checkpoint_dir)
from jaxpost.tunix_ext.gemma3 import completion_logits_only
from jaxpost.tunix_ext.trainers import build_dpo_trainer, frozen_copy

PAIRS_FILE = "preference_pairs.jsonl"
# Lengths are rounded up to a multiple of this (as in jaxpost.sft), so that runs whose
# longest pair differs by a token or two share a compiled step.
_LENGTH_QUANTUM = 8


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Preference pairs as padded token arrays, in Tunix's DPO input layout.

    Attributes:
      prompt_ids: ``[n, prompt_len]``, left-padded with ``pad_id`` (BOS included).
      chosen_ids, rejected_ids: ``[n, completion_len]``, right-padded; both completions
        of a pair share ``completion_len`` (Tunix stacks them into one batch).
      prompt_mask, chosen_mask, rejected_mask: 1 where the ids are not padding.
      skipped: pairs left out: a prompt over its budget, a completion holding the
        padding token (which the masks could not tell apart), or two completions equal
        within the budget (no preference left).
      truncated: pairs with a completion cut to the budget.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    skipped: int
    truncated: int

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _text_ids(tokenizer, text: str, end_id: int) -> list[int]:
    ids = list(tokenizer.encode(text))
    if ids and ids[0] == tokenizer.bos_id():
        ids = ids[1:]
    return ids + [end_id]


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, prompt_fn, *, end_id: int,
                   pad_id: int, max_prompt_length: int,
                   max_completion_length: int) -> TokenizedPairs:
    """Tokenizes each pair as the policy saw or would see it: the formatted prompt (the
    pair's own ``prompt``, else ``prompt_fn(question)``), then each completion, its
    sampled ids when known, else its text and the end token.

    A completion longer than ``max_completion_length`` is cut to it (losing its end
    token), as Tunix's and TRL's DPO data processing do: the preference then bears on
    the part the policy can generate within its budget.

    Args:
      prompt_fn: question -> the formatted prompt text.
      max_prompt_length, max_completion_length: token budgets (``max_prompt_length``
        and ``max_new_tokens``); a pair whose prompt is longer is left out (cutting it
        would lose the question or the instruction).

    Raises:
      ValueError: no pair is left.
    """
    rows = []
    skipped = truncated = 0
    for pair in pairs:
        prompt = list(tokenizer.encode(pair.prompt if pair.prompt is not None
                                       else prompt_fn(pair.question)))
        chosen = (list(pair.chosen_ids) if pair.chosen_ids is not None
                  else _text_ids(tokenizer, pair.chosen, end_id))
        rejected = (list(pair.rejected_ids) if pair.rejected_ids is not None
                    else _text_ids(tokenizer, pair.rejected, end_id))
        if max(len(chosen), len(rejected)) > max_completion_length:
            truncated += 1
            chosen = chosen[:max_completion_length]
            rejected = rejected[:max_completion_length]
        if (len(prompt) > max_prompt_length or pad_id in chosen or pad_id in rejected
                or chosen == rejected):
            skipped += 1
            continue
        rows.append((prompt, chosen, rejected))
    if not rows:
        raise ValueError(
            f"none of the {len(pairs)} preference pairs is usable: prompts over "
            f"max_prompt_length={max_prompt_length} tokens, completions holding the padding "
            f"token, or chosen and rejected equal within max_new_tokens="
            f"{max_completion_length} tokens; raise the budgets or check preference_data")

    def padded(lengths, budget):
        return min(budget, _LENGTH_QUANTUM * math.ceil(max(lengths) / _LENGTH_QUANTUM))

    prompt_len = padded([len(p) for p, _, _ in rows], max_prompt_length)
    comp_len = padded([len(x) for _, c, r in rows for x in (c, r)], max_completion_length)
    n = len(rows)
    out = {name: np.full((n, prompt_len if name == "prompt" else comp_len), pad_id, np.int32)
           for name in ("prompt", "chosen", "rejected")}
    for i, (p, c, r) in enumerate(rows):
        out["prompt"][i, prompt_len - len(p):] = p
        out["chosen"][i, :len(c)] = c
        out["rejected"][i, :len(r)] = r
    masks = {name: (ids != pad_id).astype(np.int32) for name, ids in out.items()}
    return TokenizedPairs(out["prompt"], masks["prompt"], out["chosen"], masks["chosen"],
                          out["rejected"], masks["rejected"], skipped, truncated)


def preference_batches(data: TokenizedPairs, *, batch_size: int, steps: int,
                       seed: int) -> list[dict[str, np.ndarray]]:
    """``steps`` batches of ``batch_size`` pairs: the pairs in a seeded order, reshuffled
    each epoch; the same seed gives the same batches (a resumed run skips those it
    trained). Keys are those of Tunix's DPO ``TrainingInput``."""
    n = len(data)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n).tolist())
    names = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids",
             "rejected_mask")
    return [{name: getattr(data, name)[np.asarray(order[s * batch_size:(s + 1) * batch_size])]
             for name in names} for s in range(steps)]


def sample_self_pairs(config: ColabTrainingConfig, session: ColabSession, *,
                      end_id: int) -> tuple[list[PreferencePair], str]:
    """Pairs from the session's policy's own scored samples (``preference_data`` "self"
    or "self+demonstrations").

    For each of ``num_batches`` batches of training prompts (``prepare_datasets``
    with no ``max_steps``: the same prompts whatever the run's length), the policy
    samples ``num_generations`` completions per prompt at the run's temperature,
    top-k and top-p, with seed ``seed + batch index``. With "self+demonstrations" a
    prompt's demonstration (``session.demonstrations`` with its question) is one more
    candidate, after the samples. The run's reward functions score every candidate as
    GRPO would (:func:`jaxpost.data.preferences.score_completions`) and
    :func:`jaxpost.data.preferences.pairs_from_groups` pairs the best with the worst.

    Returns:
      ``(pairs, summary)``: the pairs, and a sentence counting prompts, ties and the
      pairs whose chosen side is a demonstration.

    Raises:
      ValueError: every group tied (no preference to learn), naming what to change.
    """
    loaded = session.loaded
    pool, _ = prepare_datasets(dataclasses.replace(config, max_steps=None))
    demos = {}
    if uses_demonstrations(config.preference_data):
        for demo in session.demonstrations:
            demos.setdefault(demo.question, demo)
    g = config.num_generations
    sampler = make_sampler(session.lora_model, loaded,
                           cache_size=config.max_prompt_length + config.max_new_tokens)
    questions, prompts, groups, scores, ids = [], [], [], [], []
    t0 = time.time()
    for index in range(len(pool)):
        batch = pool[index]
        rows = [str(p) for p in batch["prompts"] for _ in range(g)]
        with use_mesh(loaded.mesh):
            out = sampler(rows, max_generation_steps=config.max_new_tokens,
                          max_prompt_length=config.max_prompt_length,
                          temperature=config.temperature, top_k=config.top_k,
                          top_p=1.0 if config.top_p is None else config.top_p,
                          seed=config.seed + index, eos_tokens=list(loaded.eos_ids),
                          echo=False)
        columns = {k: v for k, v in batch.items() if k != "prompts"}
        flat_prompts, flat_texts, flat_columns = [], [], {k: [] for k in columns}
        for j, prompt in enumerate(batch["prompts"]):
            question = str(batch["question"][j])
            texts = list(out.text[j * g:(j + 1) * g])
            # A sample that stopped before the budget ended with the end-of-turn token.
            token_ids = [tuple(int(t) for t in tokens)
                         + ((end_id,) if len(tokens) < config.max_new_tokens else ())
                         for tokens in out.tokens[j * g:(j + 1) * g]]
            if question in demos:
                texts.append(demos[question].completion)
                token_ids.append(None)
            questions.append(question)
            prompts.append(str(prompt))
            groups.append(texts)
            ids.append(token_ids)
            flat_prompts += [str(prompt)] * len(texts)
            flat_texts += texts
            for k in columns:
                flat_columns[k] += [columns[k][j]] * len(texts)
        totals = score_completions(session.reward_fns, flat_prompts, flat_texts, flat_columns)
        start = 0
        for texts in groups[len(scores):]:
            scores.append(totals[start:start + len(texts)])
            start += len(texts)
        print(f"jaxpost: DPO pairs: sampled and scored batch {index + 1}/{len(pool)} "
              f"({time.time() - t0:.0f}s)", flush=True)
    pairs, ties = pairs_from_groups(questions, groups, scores, ids, prompts)
    with_demo = sum(1 for p in pairs if p.chosen_ids is None)
    summary = (f"{len(pairs)} pairs from {len(groups)} prompts x {g} samples "
               f"({ties} groups tied"
               + (f"; {with_demo} chosen are demonstrations" if demos else "") + ")")
    if not pairs:
        hint = ("an SFT warm-up (sft_steps > 0) so that the policy produces answers the "
                "rewards can tell apart, preference_data='self+demonstrations', a higher "
                "num_generations or temperature, or preference_data='preference-jsonl:PATH'")
        raise ValueError(f"preference_data={config.preference_data!r}: all "
                         f"{len(groups)} groups of {g} samples scored the same, so there is "
                         f"no preference to learn; try {hint}")
    return pairs, summary


def _write_pairs(path: Path, pairs: Sequence[PreferencePair]) -> None:
    write_atomic(path, "".join(
        json.dumps({"question": p.question, "chosen": p.chosen, "rejected": p.rejected,
                    "chosen_score": p.chosen_score, "rejected_score": p.rejected_score}) + "\n"
        for p in pairs))


def train_dpo(config: ColabTrainingConfig, session: ColabSession):
    """Trains ``session.lora_model`` with DPO from where it stands; resumes from a checkpoint.

    The reference policy is a frozen copy of ``session.lora_model`` as the stage finds
    it (after :func:`jaxpost.sft.train_sft`, when the run has a warm-up). Rerunning with
    the same ``output_dir`` makes the same pairs and continues from the newest finished
    DPO checkpoint; one that holds ``max_steps`` is loaded without training. With no
    DPO steps (``max_steps=0``: the SFT warm-up alone) it trains nothing. Loss,
    implicit rewards (``dpo/rewards/margin``, ``dpo/rewards/accuracy``: the share of
    pairs whose chosen completion the policy now prefers more than the reference
    does, ...), log-probs, gradient norm and learning rate go to ``metrics.jsonl``,
    TensorBoard and the printed progress lines.

    Returns:
      A :class:`jaxpost.train.TrainerState`.

    Raises:
      ValueError: ``output_dir`` already holds GRPO checkpoints, or no usable pair.
      jaxpost.train.TrainingDiverged: the loss became NaN or infinite.
    """
    ckpt_dir = dpo_checkpoint_dir(config.checkpoint_dir)
    if config.total_steps == 0:
        sft_step = latest_checkpoint_step(sft_checkpoint_dir(config.checkpoint_dir))
        print("jaxpost: no DPO steps (max_steps=0)", flush=True)
        return TrainerState(config=config, lora_model=session.lora_model, step=sft_step or 0,
                            resumed_from=None, history=read_metrics(config.output_dir),
                            checkpoint_dir=Path(config.checkpoint_dir))
    actor = actor_checkpoint_dir(config.checkpoint_dir)
    if latest_checkpoint_step(actor) is not None:
        raise ValueError(f"{config.checkpoint_dir} holds GRPO checkpoints ({actor}), which "
                         "export and evaluation would read instead of DPO's: give the DPO "
                         "run its own output_dir")
    t0 = time.time()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, str(out / CONFIG_FILE))
    # Tunix restores the newest step when it builds the trainer: step past unreadable ones.
    resumed_from = resume_step(ckpt_dir)
    finished = resumed_from is not None and resumed_from >= config.total_steps
    loaded = session.loaded
    template = session.template
    prompt_format = PromptFormat.from_config(config, template=template)
    end_id = end_of_turn_id(loaded.tokenizer, template, loaded.eos_ids)
    pad_id = int(loaded.tokenizer.pad_id())
    model = session.lora_model
    # Before the trainer restores DPO's checkpoint into the model: the stage's start.
    reference = frozen_copy(model)

    batches: list = []
    if finished:
        print(f"jaxpost: DPO already finished (step {resumed_from} in {ckpt_dir}); loading "
              "its weights", flush=True)
    else:
        if config.preference_data.strip().startswith("self"):
            pairs, summary = sample_self_pairs(config, session, end_id=end_id)
        else:
            pairs = list(session.preferences)
            if not pairs:
                raise ValueError("the session holds no preference pairs: call "
                                 "prepare_colab_session with this config (algorithm='dpo', "
                                 f"preference_data={config.preference_data!r})")
            summary = f"{len(pairs)} pairs from {config.preference_data}"
        _write_pairs(out / PAIRS_FILE, pairs)
        data = tokenize_pairs(
            pairs, loaded.tokenizer, lambda q: format_prompt(q, prompt_format),
            end_id=end_id, pad_id=pad_id, max_prompt_length=config.max_prompt_length,
            max_completion_length=config.max_new_tokens)
        batches = preference_batches(data, batch_size=config.batch_size,
                                     steps=config.total_steps, seed=config.seed)
        start = (f"resuming DPO from checkpoint step {resumed_from}" if resumed_from is not None
                 else "DPO starting")
        notes = [f"{n} {what}" for n, what in ((data.skipped, "left out"),
                                                  (data.truncated, "cut to max_new_tokens"))
                 if n]
        print(f"jaxpost: {start}: {config.total_steps} steps of {config.batch_size} pairs, "
              f"beta={config.kl_beta:g}; {'; '.join([summary, *notes])}; written to "
              f"{out / PAIRS_FILE}", flush=True)

    wandb_run = start_wandb(config)
    schedule = make_schedule(peak=config.learning_rate, warmup_steps=config.warmup_steps,
                             total_steps=config.total_steps)
    recorder = MetricsRecorder(out / METRICS_FILE, config.total_steps, config.log_every_steps,
                               schedule=schedule, wandb_run=wandb_run, stage="dpo")
    backends = [lambda: recorder]
    if config.tensorboard:
        # the TensorBoard writer loads only when a run logs to TensorBoard
        from metrax.logging.tensorboard_backend import TensorboardBackend

        tb_dir = str(config.tensorboard_dir)
        backends.append(lambda: TensorboardBackend(log_dir=tb_dir, flush_every_n_steps=1))
    completion_len = batches[0]["chosen_ids"].shape[1] if batches else config.max_new_tokens
    with use_mesh(loaded.mesh), completion_logits_only([model], completion_len,
                                                       remat=config.remat):
        trainer = build_dpo_trainer(
            model, reference,
            make_optimizer(schedule, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm),
            beta=config.kl_beta, pad_id=pad_id,
            checkpoint_dir=ckpt_dir, tensorboard_dir=os.path.abspath(config.tensorboard_dir),
            max_steps=config.total_steps, save_interval_steps=config.save_interval_steps,
            max_to_keep=config.max_to_keep, metric_backends=backends)
        if not finished:
            how = ("jaxpost's chunked log-probs" if trainer.chunked else
                   f"Tunix's full-logits log-probs ({type(model).__name__} is not a Gemma 3 "
                   "model, for which jaxpost computes them in chunks)")
            print(f"jaxpost: DPO sequence log-probs: {how}", flush=True)
        try:
            trainer.train(batches)
        finally:
            recorder.close()
            if wandb_run is not None:
                wandb_run.finish()
        step = trainer.train_steps
    print(f"jaxpost: DPO finished at step {step} in {time.time() - t0:.0f}s", flush=True)
    return TrainerState(config=config, lora_model=model, step=step, resumed_from=resumed_from,
                        history=read_metrics(out), checkpoint_dir=Path(config.checkpoint_dir))
