"""The config's fields and their defaults (:class:`ColabTrainingConfig`), and the values
derived from them; the checks the fields go through live in :mod:`jaxpost.config.validation`."""

import dataclasses
import typing
from typing import Any

from jaxpost.config.choices import (
    ALGORITHM_DEFAULTS,
    DEFAULT_DATASET,
    DEFAULT_LORA_TARGETS,
    DEFAULT_SYSTEM_PROMPT,
    PPO_DEFAULTS,
    REFERENCE_JUDGE,
    RL_ALGORITHMS,
)
from jaxpost.config.validation import check_type, validate
from jaxpost.rewards.rubrics import DEFAULT_CATEGORY_WEIGHTS
from jaxpost.rundir import RunDir


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColabTrainingConfig:
    """Everything one GRPO run needs; immutable and validated at construction.

    Model:
      model: source, one of `embedded:gemma3-270m`, `random:gemma3-tiny` (tiny random
        weights, for tests), a local directory, `hf:ORG/NAME`, `kaggle:HANDLE`.
      dtype: parameter/activation dtype, "float32" or "bfloat16".
      chat_template: prompt wrapping; "auto" picks from the model family, "none" sends
        raw text.
    LoRA:
      lora_rank: adapter rank r. lora_alpha: scaling alpha (update scaled by alpha / r).
      lora_target_modules: regex over module paths that receive adapters.
    Data:
      dataset: task name, e.g. "reasoning-gym:basic_arithmetic" or "gsm8k".
      max_examples: cap on training examples (None = whole dataset).
      eval_size: examples held out for evaluation.
    Prompt:
      system_prompt: instruction prepended to every question.
      reasoning_tag / answer_tag: XML-like tag names the rewards parse.
    Rewards:
      reward_functions: names in the rewards registry; their weighted sum is the reward.
      reward_weights: one weight per reward function (None = all 1.0).
    Rubric reward (Gunjal et al. 2025, "Rubrics as Rewards"; used when reward_functions
    includes "rubric", with a rubric dataset; see jaxpost.rewards.rubrics and jaxpost.rewards.judges):
      judge: "model" (a language model's P(yes) per criterion), "api" (an
        OpenAI-compatible chat server) or "lexical" (keyword coverage; offline smoke
        runs only, a weak stand-in).
      judge_model: for judge="model": "reference" (the run's own frozen base model, no
        extra load) or any model source.
      rubric_aggregation: "explicit" (weighted share of criteria met, pitfalls
        subtract) or "implicit" (one 1-10 rating of the whole rubric).
      rubric_category_weights: weights of essential, important, optional and pitfall
        criteria without their own weight (the pitfall entry is the penalty's size).
      rubric_in_prompt: list the rubric's criteria in the policy's prompt.
      judge_batch_size: rows per forward pass of a model judge.
      judge_api_base_url, judge_api_model: the server (".../v1") and the model it serves.
      judge_api_key_name: name of the secret holding the API key (looked up in Colab
        secrets, Kaggle secrets, then the environment; the key is never in the config).
      judge_api_timeout (seconds per request), judge_api_retries (after the first try),
      judge_api_concurrency (requests in flight).
    SFT warm-up (supervised fine-tuning on demonstrations, before GRPO; see jaxpost.sft):
      sft_steps: optimizer steps of the warm-up (0 = none). A pretrained model that is
        not instruction-tuned (the embedded Gemma 3 270M) echoes the prompt instead of
        answering; a short warm-up on well-formed answers gives GRPO something to
        reinforce.
      sft_data: where the demonstrations come from (jaxpost.data.demonstrations.SFT_DATA_FORMS):
        "auto" (the run's own dataset: worked solutions, or a rationale built from a
        reasoning-gym task's metadata), a dataset spec with worked solutions (e.g.
        "gsm8k:train"), or "sft-jsonl:PATH" (question/completion pairs).
      sft_learning_rate: peak LR of the warm-up's own warmup-cosine schedule (its warmup
        is warmup_ratio of sft_steps). sft_batch_size: demonstrations per step.
      sft_max_grad_norm: global-norm clip of the warm-up's gradients (None = no clip).
      The loss is the mean negative log-likelihood of the completion tokens only.
    GRPO (Shao et al. 2024, "DeepSeekMath") and its relatives:
      algorithm: the objective, one of ALGORITHMS: "grpo"; "dapo" (Yu et al. 2025:
        clip-higher, token-level loss, no KL); "dr_grpo" (Liu et al. 2025: advantages
        not divided by the group's std, loss not divided by each completion's length);
        "gspo" (Zheng et al. 2025: one importance ratio per sequence, clipped tightly);
        "rloo" (Ahmadian et al. 2024: leave-one-out baseline); "ppo" (below); or "dpo"
        (below). None in beta, epsilon and epsilon_high takes the algorithm's own value
        (ALGORITHM_DEFAULTS).
      num_generations: G, completions sampled per prompt (group size for the baseline).
      num_iterations: mu, policy updates per batch of generations.
      beta: beta, KL-penalty coefficient against the reference model (None: 0.04, or 0
        for DAPO and GSPO, which train without it).
      epsilon, epsilon_high: epsilon_low and epsilon_high, the ratio's clipping range
        [1 - epsilon, 1 + epsilon_high] (None: 0.2 and 0.2; DAPO 0.2 and 0.28; GSPO,
        whose ratio is a per-token average, 3e-4 and 4e-4).
      temperature, top_k, top_p: sampling settings for rollouts (None disables a filter).
      max_prompt_length: prompt tokens kept. max_new_tokens: completion token budget.
    PPO (Schulman et al. 2017, "Proximal Policy Optimization"; algorithm="ppo"): a critic
    (jaxpost.models.critic: the base model with its own LoRA adapters and a value head) learns
    each position's expected return; advantages are GAE over its values (Schulman et
    al. 2016), the KL penalty beta * KL is subtracted from each token's reward, and each
    of the G = num_generations completions per prompt is its own episode. None takes
    PPO_DEFAULTS; set with another algorithm, these are refused:
      critic_learning_rate: the critic's peak LR (None: learning_rate), same schedule.
      gamma: the discount (None: 1.0). gae_lambda: GAE's lambda (None: 0.95).
      value_clip: how far a value prediction may move from the rollout's (None: 0.2).
    DPO (Rafailov et al. 2023, "Direct Preference Optimization"; algorithm="dpo", see
    jaxpost.dpo): trains on preference pairs with the loss -log sigmoid(beta * margin),
    margin the chosen completion's log-ratio to the reference policy minus the
    rejected one's; the reference is the policy the stage starts from (after the SFT
    warm-up, if any). Each step trains on batch_size pairs.
      beta: DPO's beta (None: 0.1); must be > 0.
      preference_data: where the pairs come from (jaxpost.data.preferences.PREFERENCE_DATA_FORMS):
        "self" (num_batches * batch_size training prompts, G = num_generations samples
        each at temperature/top_k/top_p, scored by reward_functions: the best paired
        with the worst, ties skipped), "self+demonstrations" (as self, with the
        prompt's demonstration from sft_data among the candidates), or
        "preference-jsonl:PATH" (question, chosen, rejected columns). Read only when
        algorithm="dpo". The RL settings epsilon, epsilon_high, num_iterations,
        mini_batch_size and micro_batch_size do not apply and are refused when set.
    Optimisation (AdamW):
      learning_rate: peak LR. warmup_ratio: fraction of total_steps spent warming up.
      weight_decay, b1, b2: AdamW settings. max_grad_norm: clip norm (None = no clip).
      remat: recompute each layer's activations in the backward pass instead of keeping
        them (about 2 GB less for the default run's [8, 128] batch, about 15% more update
        time); turn off where memory is plentiful. An update that takes the layer
        inputs its rollout computed (the first update after each rollout, on a CPU)
        recomputes them either way.
      batch_size: prompts per step (each expands to G completions).
      num_batches: batches drawn from the dataset. max_steps: hard cap (None = derived;
        0 = no GRPO, the SFT warm-up alone).
      mini_batch_size / micro_batch_size: optional splits of a batch for updates and
        gradient accumulation; must divide batch_size (resp. the mini batch).
    Checkpoints:
      output_dir: root for checkpoints, TensorBoard logs and exports.
      save_interval_steps, max_to_keep: checkpoint cadence and retention.
      save_to_drive / drive_dir: also copy artifacts to Google Drive on Colab.
    Logging: log_every_steps (metric cadence), tensorboard (write event files),
      wandb_project (also log to this Weights & Biases project; needs `pip install wandb`
      and a login; None = off).
    Mesh: mesh_fsdp (FSDP axis size, None = all local devices), mesh_tp (tensor-parallel).
    final_eval_examples: held-out examples (the dataset's test split, or the same task
      drawn with another seed) on which the base and trained models are compared at the
      end of run_full_pipeline (0 = skip).
    seed: PRNG seed for sampling, data order and LoRA initialisation.
    """

    model: str = "embedded:gemma3-270m"
    dtype: str = "float32"
    chat_template: str = "auto"

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: str = DEFAULT_LORA_TARGETS

    dataset: str = DEFAULT_DATASET
    max_examples: int | None = 256
    eval_size: int = 16

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    reasoning_tag: str = "reasoning"
    answer_tag: str = "answer"

    reward_functions: tuple[str, ...] = ("format_exact", "format_approximate", "answer_match")
    reward_weights: tuple[float, ...] | None = None

    judge: str = "model"
    judge_model: str = REFERENCE_JUDGE
    rubric_aggregation: str = "explicit"
    rubric_category_weights: tuple[float, ...] = DEFAULT_CATEGORY_WEIGHTS
    rubric_in_prompt: bool = False
    judge_batch_size: int = 16
    judge_api_base_url: str = ""
    judge_api_model: str = ""
    judge_api_key_name: str = "JUDGE_API_KEY"
    judge_api_timeout: float = 30.0
    judge_api_retries: int = 3
    judge_api_concurrency: int = 4

    sft_steps: int = 0
    sft_data: str = "auto"
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 8
    sft_max_grad_norm: float | None = 1.0

    algorithm: str = "grpo"
    num_generations: int = 4
    num_iterations: int = 1
    beta: float | None = None
    epsilon: float | None = None
    epsilon_high: float | None = None
    temperature: float = 0.9
    top_k: int | None = 50
    top_p: float | None = 1.0
    max_prompt_length: int = 64
    max_new_tokens: int = 64
    preference_data: str = "self"
    critic_learning_rate: float | None = None
    gamma: float | None = None
    gae_lambda: float | None = None
    value_clip: float | None = None

    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.99
    max_grad_norm: float | None = 0.1
    remat: bool = True
    batch_size: int = 2
    num_batches: int = 8
    max_steps: int | None = None
    mini_batch_size: int | None = None
    micro_batch_size: int | None = None

    output_dir: str = "runs/default"
    save_interval_steps: int = 2
    max_to_keep: int = 2
    save_to_drive: bool = False
    drive_dir: str = "/content/drive/MyDrive/jaxpost"

    log_every_steps: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None

    mesh_fsdp: int | None = None
    mesh_tp: int = 1

    final_eval_examples: int = 16
    seed: int = 42

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name])
            # YAML gives lists; frozen fields must be rewritten this way to store tuples.
            object.__setattr__(self, f.name, value)
        validate(self)

    def ppo_settings(self) -> dict[str, float]:
        """PPO's critic_learning_rate, gamma, gae_lambda and value_clip, None filled from
        PPO_DEFAULTS (critic_learning_rate from learning_rate)."""
        values = {name: default if getattr(self, name) is None else getattr(self, name)
                  for name, default in PPO_DEFAULTS.items()}
        if values["critic_learning_rate"] is None:
            values["critic_learning_rate"] = self.learning_rate
        return values

    @property
    def kl_beta(self) -> float:
        """beta, or the algorithm's own when the config leaves it None."""
        return ALGORITHM_DEFAULTS[self.algorithm]["beta"] if self.beta is None else self.beta

    def _require_ratio_clip(self) -> None:
        if self.algorithm not in RL_ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} has no ratio clip: epsilon and "
                             f"epsilon_high belong to {RL_ALGORITHMS}")

    @property
    def clip_low(self) -> float:
        """epsilon (the ratio's lower clip), or the algorithm's own when None (RL
        algorithms only: ValueError for DPO)."""
        self._require_ratio_clip()
        if self.epsilon is None:
            return ALGORITHM_DEFAULTS[self.algorithm]["epsilon"]
        return self.epsilon

    @property
    def clip_high(self) -> float:
        """epsilon_high; when None, the algorithm's own, shifted with epsilon where that
        was set (so DAPO's clip stays 0.08 higher than its lower one). RL algorithms only."""
        self._require_ratio_clip()
        if self.epsilon_high is not None:
            return self.epsilon_high
        defaults = ALGORITHM_DEFAULTS[self.algorithm]
        if self.epsilon is None:
            return defaults["epsilon_high"]
        return self.epsilon + defaults["epsilon_high"] - defaults["epsilon"]

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run: max_steps if set, else num_batches * mu."""
        if self.max_steps is not None:
            return self.max_steps
        return self.num_batches * self.num_iterations

    @property
    def warmup_steps(self) -> int:
        """Linear-warmup steps: int(warmup_ratio * total_steps)."""
        return int(self.warmup_ratio * self.total_steps)

    # Where a run writes: the layout of jaxpost.rundir, under output_dir.
    @property
    def checkpoint_dir(self) -> str:
        return str(RunDir(self.output_dir).checkpoint_dir)

    @property
    def tensorboard_dir(self) -> str:
        return str(RunDir(self.output_dir).tensorboard_dir)

    @property
    def export_dir(self) -> str:
        return str(RunDir(self.output_dir).export_dir())

    @property
    def effective_reward_weights(self) -> tuple[float, ...]:
        """One float weight per reward function; 1.0 each when reward_weights is None."""
        if self.reward_weights is None:
            return tuple(1.0 for _ in self.reward_functions)
        return tuple(float(w) for w in self.reward_weights)


# Field name -> annotation; __post_init__ only runs after this module has loaded.
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(ColabTrainingConfig)
