"""The config's vocabularies and defaults: the values a field may take, and what None
stands for. Importing them imports no JAX (:mod:`jaxpost.rewards.judges`, which uses the judge
vocabulary, does)."""

from jaxpost.data.prompts import CHAT_TEMPLATES  # noqa: F401  (re-exported)

JUDGE_KINDS = ("model", "api", "lexical")
REFERENCE_JUDGE = "reference"

DEFAULT_LORA_TARGETS = (
    ".*(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj"
    "|q_proj|k_proj|v_proj|o_proj)"
)

DEFAULT_SYSTEM_PROMPT = (
    "You are given a problem. Think about it step by step and write your reasoning "
    "between <reasoning> and </reasoning>. Then give only the final answer between "
    "<answer> and </answer>."
)

# Model source prefixes (jaxpost.models.loading.load_model reads this one list).
MODEL_PREFIXES = ("embedded", "random", "hf", "kaggle", "gguf")
_MODEL_FORMS = ("embedded:gemma3-270m, random:gemma3-tiny, a local directory, hf:ORG/NAME, "
                "kaggle:HANDLE, gguf:PATH")
DTYPES = ("float32", "bfloat16")
# The RL objective (see jaxpost.tunix_ext.learners.build_grpo_learner): GRPO and its relatives,
# run by Tunix's GRPO-family learners, and PPO (Tunix's PPO learner, with a critic).
RL_ALGORITHMS = ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo")
# The training objective after the SFT warm-up: an RL algorithm, or DPO on preference
# pairs (jaxpost.dpo).
ALGORITHMS = (*RL_ALGORITHMS, "dpo")
# Per algorithm: beta, epsilon and epsilon_high when the config leaves them None (DPO has
# no ratio to clip: beta alone).
ALGORITHM_DEFAULTS: dict[str, dict[str, float]] = {
    "grpo": {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2},
    "dapo": {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28},
    "dr_grpo": {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2},
    "gspo": {"beta": 0.0, "epsilon": 3e-4, "epsilon_high": 4e-4},
    "rloo": {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2},
    "ppo": {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2},
    "dpo": {"beta": 0.1},
}
# PPO's own settings when the config leaves them None (critic_learning_rate None is the
# policy's learning_rate); set with another algorithm, they are refused.
PPO_DEFAULTS: dict[str, float | None] = {
    "critic_learning_rate": None, "gamma": 1.0, "gae_lambda": 0.95, "value_clip": 0.2}
# One-digit sums and differences: a task the 270M base model can get better at in minutes.
DEFAULT_DATASET = ("reasoning-gym:basic_arithmetic#min_terms=2&max_terms=2&min_digits=1"
                   "&max_digits=1&operators=+,-&allow_parentheses=false&allow_negation=false")
# `jaxpost eval`'s completion budget in tokens, unless --max-new-tokens says otherwise.
EVAL_MAX_NEW_TOKENS = 256
