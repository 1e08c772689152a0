"""GRPO training: optimizer, metrics, checkpoints and resume around Tunix's GRPO learner."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxpost.checkpoints import finished_steps, latest_step, move_aside, resume_step
from jaxpost.config import ColabTrainingConfig, save_yaml, to_dict
from jaxpost.data.datasets import num_train_batches
from jaxpost.models.critic import build_value_model
from jaxpost.rewards.judges import judge_metrics_fn
from jaxpost.rundir import CONFIG_FILE, METRICS_FILE, RunDir
from jaxpost.session import ColabSession
from jaxpost.tunix_ext.checkpointing import dpo_checkpoint_dir, latest_checkpoint_step
from jaxpost.tunix_ext.cluster import build_cluster
from jaxpost.tunix_ext.gemma3 import completion_logits_only
from jaxpost.tunix_ext.learners import build_grpo_learner


class TrainingDiverged(FloatingPointError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainerState:
    """What a finished (or resumed-and-finished) run hands on to export and evaluation.

    Attributes:
      config: the config that ran.
      lora_model: the trained policy (base model plus trained LoRA adapters).
      step: the last optimizer step completed (the SFT warm-up's in a run without GRPO steps).
      resumed_from: the checkpoint step the run resumed from (None for a fresh run).
      history: one dict per step: ``{"step": n, "rewards/...": x, "loss": y, ...}``.
      checkpoint_dir: where the Orbax checkpoints are.
    """

    config: ColabTrainingConfig
    lora_model: nnx.Module
    step: int
    resumed_from: int | None
    history: list[dict[str, float]]
    checkpoint_dir: Path

    def reward_at(self, which: str = "first", window: int = 3) -> float | None:
        """Mean total reward of the first or last ``window`` logged steps (None if unlogged)."""
        values = [h["reward"] for h in self.history if "reward" in h]
        if not values:
            return None
        part = values[:window] if which == "first" else values[-window:]
        return sum(part) / len(part)


def make_schedule(*, peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Learning rate by step: linear warmup from 0 to ``peak`` over ``warmup_steps``, then
    cosine to 0 at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, 1), end_value=0.0)


def make_optimizer(learning_rate: float | optax.Schedule, *, b1: float, b2: float,
                   weight_decay: float,
                   max_grad_norm: float | None) -> optax.GradientTransformation:
    """AdamW at ``learning_rate`` (a number, or a schedule by step such as
    :func:`make_schedule`'s), after clipping the gradients' global norm to
    ``max_grad_norm`` (None: no clipping)."""
    adamw = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


# Tunix logs "<group>/<mode>/<name>"; jaxpost records these under short names.
_METRIC_NAMES = {
    "rewards/score/mean": "reward",
    "rewards/score/max": "reward_max",
    "actor/loss": "loss",
    "actor/kl": "kl",
    "actor/grad_norm": "grad_norm",
    # PPO's critic: its clipped value loss, mean predicted value, and gradient norm.
    "critic/loss": "critic_loss",
    "critic/vpred_mean": "value_mean",
    "critic/grad_norm": "critic_grad_norm",
    "completions/mean_length": "completion_length",
    # The SFT warm-up's trainer (jaxpost.sft) logs under the "sft" prefix.
    "sft/loss": "sft/loss",
    "sft/grad_norm": "sft/grad_norm",
    # The DPO stage's trainer (jaxpost.dpo) logs under the "dpo" prefix: its loss, and
    # the implicit rewards beta * log(policy / reference) of the chosen and rejected
    # completions, their margin, the share of pairs ranked right, and the log-probs.
    **{f"dpo/{name}": f"dpo/{name}" for name in (
        "loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin",
        "rewards/accuracy", "log_probs/chosen", "log_probs/rejected")},
}
# Stage -> the prefix of its metric names (GRPO's have none).
_STAGE_PREFIXES = {"grpo": "", "sft": "sft/", "dpo": "dpo/"}
# Stage -> the metrics a step's progress line waits for. Tunix logs DPO's implicit
# rewards after the loss.
_REPORTED_WITH = {"grpo": ("loss",), "sft": ("sft/loss",),
                  "dpo": ("dpo/loss", "dpo/rewards/margin", "dpo/rewards/accuracy")}
# Rewards, completions and the judge's work are logged while rolling out for step n + 1,
# under step n.
_ROLLOUT_GROUPS = ("rewards", "completions", "judge")
_SKIPPED_REWARD_STATS = ("sum", "mean", "min", "max", "score/min")


def _short_name(event: str) -> tuple[str, int] | None:
    """``(name, step offset)`` for a Tunix training event, None for events not recorded."""
    parts = event.split("/")
    if len(parts) < 3 or parts[1] != "train":
        return None
    group, rest = parts[0], "/".join(parts[2:])
    key = f"{group}/{rest}"
    offset = 1 if group in _ROLLOUT_GROUPS else 0
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key], offset
    if group == "rewards" and rest not in _SKIPPED_REWARD_STATS:
        return f"rewards/{rest}", offset  # one reward function's batch mean
    if group == "judge":
        return f"judge/{rest}", offset  # calls, seconds, failures, cache hits of the step
    return None


class MetricsRecorder:
    """A Tunix logging backend that keeps per-step metrics, writes them, and guards the loss.

    Every scalar goes to ``metrics.jsonl`` (appended, so a resumed run continues the
    file) and to an in-memory history; a one-line progress report is printed per step.
    A non-finite loss raises :class:`TrainingDiverged` before that step is checkpointed.
    With ``wandb_run`` (a Weights & Biases run), every recorded value is also logged
    there, against the ``step`` metric (rollout metrics arrive one step ahead of the loss,
    so W&B's own monotonic step cannot be used).

    ``stage="sft"`` records the SFT warm-up instead (``sft/loss``, ``sft/grad_norm``,
    ``sft/learning_rate``, ``sft/step_seconds``), by its own steps; ``stage="dpo"`` the
    DPO stage (``dpo/loss``, ``dpo/rewards/margin``, ``dpo/rewards/accuracy``, ...).
    """

    def __init__(self, path: Path, total_steps: int, log_every: int, schedule=None,
                 wandb_run=None, stage: str = "grpo"):
        if stage not in _STAGE_PREFIXES:
            raise ValueError(f"stage={stage!r} is invalid: one of {tuple(_STAGE_PREFIXES)}")
        self.path = path
        self.wandb_run = wandb_run
        self.stage = stage
        self._prefix = _STAGE_PREFIXES[stage]
        # Each step's learning rate, evaluated once for the whole run: called at each
        # step from Tunix's logging, an optax schedule compiled its operations again
        # every time (about 0.4 s per step on a CPU).
        self.learning_rates = (None if schedule is None
                               else np.asarray(jax.vmap(schedule)(np.arange(total_steps))))
        self.total_steps = total_steps
        self.log_every = log_every
        self.rows: dict[int, dict[str, float]] = {}
        self._t_start = time.time()
        self._t_last = self._t_start
        self._t_step = self._t_start
        self._printed: set[int] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def log_scalar(self, event: str, value, **kwargs) -> None:
        parsed = _short_name(event)
        if parsed is None or self._file.closed:
            return
        name, offset = parsed
        stage = next((k for k, p in _STAGE_PREFIXES.items() if p and name.startswith(p)), "grpo")
        if stage != self.stage:
            return  # another stage's event
        step = int(kwargs.get("step", 0)) + offset
        value = float(value)
        loss = self._prefix + "loss"
        if name == loss and not math.isfinite(value):
            rate = "sft_learning_rate" if self.stage == "sft" else "learning_rate"
            raise TrainingDiverged(
                f"{name} became {value} at step {step}; training stopped and the last good "
                f"checkpoint was kept. Lower {rate} or max_grad_norm and rerun.")
        self._put(step, name, value)
        if name == loss:
            # Wall time between consecutive loss reports. Tunix reports a step's loss
            # after it has run the next step's rollout, so the first interval also holds
            # the second rollout and the last holds only an update; the intervals add up
            # to the run's time (benchmarks/grpo_step.py times steps by their rollouts).
            now = time.time()
            self._put(step, self._prefix + "step_seconds", now - self._t_step)
            self._t_step = now
            if self.learning_rates is not None and 0 < step <= self.total_steps:
                self._put(step, self._prefix + "learning_rate",
                          float(self.learning_rates[step - 1]))
        if all(key in self.rows.get(step, {}) for key in _REPORTED_WITH[self.stage]):
            self._report(step)
        self._file.flush()

    def _put(self, step: int, name: str, value: float) -> None:
        row = self.rows.setdefault(step, {"step": step})
        if row.get(name) == value:
            return  # Tunix's cluster and trainer loggers both forward each event
        row[name] = value
        self._file.write(json.dumps({"step": step, "name": name, "value": value}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, name: value})

    def _report(self, step: int) -> None:
        if step in self._printed or (step % self.log_every and step != self.total_steps):
            return
        self._printed.add(step)
        row = self.rows.get(step, {})
        now = time.time()
        label = {"grpo": "", "sft": "SFT ", "dpo": "DPO "}[self.stage]
        parts = [f"{label}step {step}/{self.total_steps}"]
        keys = {
            "sft": (("sft/loss", "loss {:.4f}"), ("sft/learning_rate", "lr {:.2e}")),
            "dpo": (("dpo/loss", "loss {:.4f}"), ("dpo/rewards/margin", "margin {:.4f}"),
                    ("dpo/rewards/accuracy", "accuracy {:.2f}"),
                    ("dpo/learning_rate", "lr {:.2e}")),
            "grpo": (("reward", "reward {:.3f}"), ("kl", "kl {:.4f}"), ("loss", "loss {:.4f}"),
                     ("critic_loss", "critic loss {:.4f}")),
        }[self.stage]
        for key, fmt in keys:
            if key in row:
                parts.append(fmt.format(row[key]))
        parts.append(f"{now - self._t_last:.1f}s")
        self._t_last = now
        print("jaxpost: " + " | ".join(parts), flush=True)

    def history(self) -> list[dict[str, float]]:
        """Per-step rows in step order."""
        return [self.rows[s] for s in sorted(self.rows)]

    def close(self) -> None:
        self._file.close()


def start_wandb(config: ColabTrainingConfig):
    """A Weights & Biases run for ``config.wandb_project`` (None when it is not set).

    The run's config is the training config (which never holds secrets); W&B reads its
    API key from its own login or ``WANDB_API_KEY``.

    Raises:
      ValueError: ``wandb_project`` is set but the ``wandb`` package is not installed.
    """
    if config.wandb_project is None:
        return None
    try:
        # wandb is optional: only when the run reports to it
        import wandb
    except ImportError:
        raise ValueError(f"wandb_project={config.wandb_project!r} needs the wandb package: "
                         "pip install wandb (and wandb login), or set wandb_project=none"
                         ) from None
    run = wandb.init(project=config.wandb_project, config=to_dict(config),
                     dir=str(config.output_dir), name=Path(config.output_dir).name)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Per-step metric rows from a run directory's ``metrics.jsonl`` (later values win)."""
    rows: dict[int, dict[str, float]] = {}
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        rows.setdefault(rec["step"], {"step": rec["step"]})[rec["name"]] = rec["value"]
    return [rows[s] for s in sorted(rows)]


def _align_critic_checkpoints(run: RunDir, policy_step: int | None) -> None:
    """Makes PPO's critic resume from a step no newer than the policy's.

    Tunix restores the newest checkpoint of each; a critic step newer than the policy's
    (the policy's was unreadable and moved aside) is moved aside too, so the values
    never come from a later point of training than the policy.

    Raises:
      ValueError: the policy has checkpoints but the critic none: the run directory was
        trained by another algorithm.
    """
    critic_dir = run.critic_checkpoint_dir
    critic_step = resume_step(critic_dir)
    if policy_step is None:
        newer = finished_steps(critic_dir)
    elif critic_step is None:
        raise ValueError(f"{run.grpo_checkpoint_dir} holds policy checkpoints but "
                         f"{critic_dir} no critic: this output_dir was trained with another "
                         "algorithm than PPO; give the PPO run its own output_dir")
    else:
        newer = [s for s in finished_steps(critic_dir) if s > policy_step]
    for step in newer:
        target = move_aside(critic_dir / str(step))
        print(f"jaxpost: critic checkpoint step {step} is newer than the policy's "
              f"({policy_step}); moved it to {target}", flush=True)


def train_grpo(config: ColabTrainingConfig, session: ColabSession) -> TrainerState:
    """Trains ``session.lora_model`` with GRPO; resumes from the latest checkpoint.

    Rerunning with the same ``output_dir`` continues from the newest finished checkpoint
    (LoRA weights, optimizer state, step; the data iterator is fast-forwarded to the
    same position) instead of starting over, and says so. With no GRPO steps
    (``max_steps=0``: the SFT warm-up alone) it trains nothing and returns the session's
    model as it is.

    Returns:
      The trainer state after the last step.

    Raises:
      ValueError: the config's algorithm is DPO, or ``output_dir`` holds DPO checkpoints.
      TrainingDiverged: when the loss becomes NaN or infinite.
    """
    if config.algorithm == "dpo":
        raise ValueError("algorithm='dpo' is trained by jaxpost.dpo.train_dpo (which "
                         "run_full_pipeline calls), not by train_grpo")
    run = RunDir(config.output_dir)
    if config.total_steps == 0:
        sft_step = latest_step(run.sft_checkpoint_dir)
        print("jaxpost: no GRPO steps (max_steps=0)", flush=True)
        return TrainerState(config=config, lora_model=session.lora_model, step=sft_step or 0,
                            resumed_from=None, history=read_metrics(config.output_dir),
                            checkpoint_dir=Path(config.checkpoint_dir))
    needed = num_train_batches(config)
    if len(session.train_dataset) < needed:
        raise ValueError(
            f"the session's training data has {len(session.train_dataset)} batches but this "
            f"config needs {needed} (max_steps={config.max_steps}, num_batches="
            f"{config.num_batches}); call prepare_colab_session(config) with this config")
    dpo_dir = dpo_checkpoint_dir(config.checkpoint_dir)
    if latest_checkpoint_step(dpo_dir) is not None:
        raise ValueError(f"{config.checkpoint_dir} holds DPO checkpoints ({dpo_dir}); give "
                         "the GRPO run its own output_dir")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wandb_run = start_wandb(config)
    save_yaml(config, str(out / CONFIG_FILE))
    ckpt_dir = run.grpo_checkpoint_dir
    # Tunix restores the newest step when it builds the cluster: step past unreadable ones.
    resumed_from = resume_step(ckpt_dir)
    if resumed_from is not None:
        if resumed_from >= config.total_steps:
            print(f"jaxpost: {config.checkpoint_dir} already holds step {resumed_from} "
                  f"(max_steps {config.total_steps}); loading it without training", flush=True)
        else:
            print(f"jaxpost: resuming from checkpoint step {resumed_from} in "
                  f"{config.checkpoint_dir}", flush=True)

    critic = None
    if config.algorithm == "ppo":
        _align_critic_checkpoints(run, resumed_from)
    schedule = make_schedule(peak=config.learning_rate, warmup_steps=config.warmup_steps,
                             total_steps=config.total_steps)
    recorder = MetricsRecorder(out / METRICS_FILE, config.total_steps, config.log_every_steps,
                               schedule=schedule, wandb_run=wandb_run)
    backends = [lambda: recorder]
    if config.tensorboard:
        # the TensorBoard writer loads only when a run logs to TensorBoard
        from metrax.logging.tensorboard_backend import TensorboardBackend

        tb_dir = str(config.tensorboard_dir)
        backends.append(lambda: TensorboardBackend(log_dir=tb_dir, flush_every_n_steps=1))

    loaded = session.loaded
    t0 = time.time()
    # Tunix scores only completion tokens; computing the other logits would cost more
    # than the transformer layers themselves (see jaxpost.tunix_ext.gemma3).
    if config.algorithm == "ppo":
        critic = build_value_model(loaded.model, loaded.mesh, rank=config.lora_rank,
                                   alpha=config.lora_alpha,
                                   target_modules=config.lora_target_modules,
                                   seed=config.seed + 1)
    adamw = dict(b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                 max_grad_norm=config.max_grad_norm)
    critic_optimizer = None
    if critic is not None:
        # PPO's critic: the actor's optimizer and schedule shape, at its own peak rate.
        critic_optimizer = make_optimizer(
            make_schedule(peak=config.ppo_settings()["critic_learning_rate"],
                          warmup_steps=config.warmup_steps, total_steps=config.total_steps),
            **adamw)
    models = [session.lora_model, loaded.model] + ([critic.backbone] if critic else [])
    with completion_logits_only(models, config.max_new_tokens, remat=config.remat):
        cluster = build_cluster(
            actor=session.lora_model, reference=loaded.model, tokenizer=loaded.tokenizer,
            mesh=loaded.mesh, optimizer=make_optimizer(schedule, **adamw), config=config,
            eos_ids=loaded.eos_ids, metric_backends=backends, critic=critic,
            critic_optimizer=critic_optimizer)
        metric_fns = []
        if getattr(session, "judge", None) is not None:
            metric_fns.append(judge_metrics_fn(session.judge))
        learner = build_grpo_learner(cluster, config, session.reward_fns,
                                     metric_fns=metric_fns)
        try:
            learner.train(session.train_dataset)
        finally:
            cluster.close()  # flushes buffered metrics and unregisters the loggers
            recorder.close()
            if wandb_run is not None:
                wandb_run.finish()
    step = latest_step(ckpt_dir) or 0
    print(f"jaxpost: training finished at step {step} in {time.time() - t0:.0f}s", flush=True)
    return TrainerState(config=config, lora_model=cluster.actor_trainer.model, step=step,
                        resumed_from=resumed_from, history=read_metrics(out),
                        checkpoint_dir=Path(config.checkpoint_dir))
