"""A config's checks: each field's type, the allowed values and the rules between fields.

``ColabTrainingConfig.__post_init__`` runs :func:`check_type` on every field, then
:func:`validate`: a bad value raises ``ValueError`` naming the field, the value and what
is allowed, so an invalid config cannot exist. The config's fields and their meaning
live in :mod:`jaxpost.config.fields`; this module knows only the rules.

Checks that read a spec (``sft_data``, ``preference_data``) import their module when
they run, so importing this module imports no data code and no JAX.
"""

import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from jaxpost.config.choices import (
    _MODEL_FORMS,
    ALGORITHMS,
    CHAT_TEMPLATES,
    DEFAULT_SYSTEM_PROMPT,
    DTYPES,
    JUDGE_KINDS,
    MODEL_PREFIXES,
    PPO_DEFAULTS,
    REFERENCE_JUDGE,
)
from jaxpost.rewards.rubrics import AGGREGATIONS, CATEGORIES

__all__ = ["check_type", "inner_type", "is_optional", "type_name", "validate"]

_TAG_RE = re.compile(r"[A-Za-z0-9_-]+")

_POSITIVE = ("lora_rank", "lora_alpha", "epsilon", "epsilon_high", "temperature", "top_k", "max_examples",
             "max_prompt_length", "max_new_tokens", "learning_rate", "max_grad_norm",
             "batch_size", "num_batches", "mini_batch_size", "micro_batch_size",
             "save_interval_steps", "max_to_keep", "log_every_steps", "mesh_fsdp", "mesh_tp",
             "judge_batch_size", "judge_api_timeout", "judge_api_concurrency",
             "sft_learning_rate", "sft_batch_size", "sft_max_grad_norm", "critic_learning_rate",
             "value_clip")
# Field -> (check applied when the value is not None, what is allowed).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (lambda x: x > 0, "must be > 0") for name in _POSITIVE},
    "num_generations": (lambda x: x >= 2, "GRPO needs at least 2 generations per prompt (G >= 2)"),
    "num_iterations": (lambda x: x >= 1, "needs at least 1 update per batch (mu >= 1)"),
    "beta": (lambda x: x >= 0, "the KL coefficient must be >= 0 (beta >= 0)"),
    "top_p": (lambda x: 0 < x <= 1, "must be None or in (0, 1]"),
    "warmup_ratio": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "b1": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "b2": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "weight_decay": (lambda x: x >= 0, "must be >= 0"),
    "eval_size": (lambda x: x >= 0, "must be >= 0"),
    "sft_steps": (lambda x: x >= 0, "must be >= 0 (0 skips the SFT warm-up)"),
    "final_eval_examples": (lambda x: x >= 0, "must be >= 0 (0 skips the held-out table)"),
    "judge_api_retries": (lambda x: x >= 0, "must be >= 0"),
    "gamma": (lambda x: 0 < x <= 1, "the discount must be in (0, 1]"),
    "gae_lambda": (lambda x: 0 <= x <= 1, "GAE's lambda must be in [0, 1]"),
}
_SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def validate(config: Any) -> None:
    """Checks a config's values and the rules between them; returns None or raises.

    Args:
      config: the :class:`~jaxpost.config.fields.ColabTrainingConfig` being built, its
        fields already of their annotated types (:func:`check_type`).

    Raises:
      ValueError: the first bad value, naming the field, the value and what is allowed.
    """
    v = config
    if v.model == "" or ":" in v.model.split("/", 1)[0]:
        prefix, _, rest = v.model.partition(":")
        _require(prefix in MODEL_PREFIXES and rest != "", "model", v.model,
                 f"expected one of {_MODEL_FORMS}")
    for name, choices in (("dtype", DTYPES), ("chat_template", CHAT_TEMPLATES),
                          ("algorithm", ALGORITHMS)):
        _require(getattr(v, name) in choices, name, getattr(v, name), f"one of {choices}")
    try:
        re.compile(v.lora_target_modules)
    except re.error as e:
        raise ValueError(f"lora_target_modules={v.lora_target_modules!r} is invalid: "
                         f"must be a valid regular expression ({e})") from e
    if v.wandb_project is not None:
        _require(v.wandb_project.strip() != "", "wandb_project", v.wandb_project,
                 "a project name, or None to log without Weights & Biases")
    for name in ("dataset", "output_dir", "drive_dir"):
        _require(getattr(v, name) != "", name, getattr(v, name), "must be non-empty")
    for name in ("reasoning_tag", "answer_tag"):
        _require(_TAG_RE.fullmatch(getattr(v, name)) is not None, name, getattr(v, name),
                 "a non-empty tag name of letters, digits, '_' or '-'")
    _require(v.reasoning_tag != v.answer_tag, "answer_tag", v.answer_tag,
             f"must differ from reasoning_tag={v.reasoning_tag!r}")
    # The default prompt names <reasoning>/<answer>; other tags would make the
    # rewards score a format the model was never asked for.
    if v.system_prompt == DEFAULT_SYSTEM_PROMPT:
        _require((v.reasoning_tag, v.answer_tag) == ("reasoning", "answer"),
                 "system_prompt", "<default>", "set a system_prompt naming the new tags "
                 "when reasoning_tag or answer_tag is changed")
    _require(len(v.reward_functions) > 0 and all(v.reward_functions),
             "reward_functions", v.reward_functions, "a non-empty list of reward names")
    if v.reward_weights is not None and len(v.reward_weights) != len(v.reward_functions):
        raise ValueError(
            f"reward_weights={v.reward_weights!r} is invalid: needs one weight per entry "
            f"of reward_functions={v.reward_functions!r} ({len(v.reward_functions)} values)")
    _check_judge(v)
    _check_stages(v)
    for name, (ok, allowed) in _RANGES.items():
        value = getattr(v, name)
        # The type check already let None through only for optional fields.
        _require(value is None or ok(value), name, value, allowed)
    _check_algorithm(v)
    if v.mini_batch_size is not None and v.batch_size % v.mini_batch_size:
        raise ValueError(f"mini_batch_size={v.mini_batch_size} is invalid: must divide "
                         f"batch_size={v.batch_size}")
    if v.micro_batch_size is not None:
        outer = "mini_batch_size" if v.mini_batch_size is not None else "batch_size"
        if getattr(v, outer) % v.micro_batch_size:
            raise ValueError(f"micro_batch_size={v.micro_batch_size} is invalid: must "
                             f"divide {outer}={getattr(v, outer)}")


def _check_stages(config: Any) -> None:
    v = config
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.demonstrations import check_sft_data_spec

    check_sft_data_spec(v.sft_data)
    if v.sft_steps > 0 and v.sft_data.strip() == "auto":
        try:
            check_sft_data_spec(v.dataset)
        except ValueError as e:
            raise ValueError(f"sft_data='auto' takes its demonstrations from dataset="
                             f"{v.dataset!r}, which cannot give them: {e}. Set sft_data "
                             "to another source, or sft_steps=0") from e
    if v.max_steps == 0 and v.sft_steps == 0:
        raise ValueError("max_steps=0 is invalid with sft_steps=0: the run would train "
                         "nothing; set max_steps > 0 (GRPO) or sft_steps > 0 (SFT alone)")
    if v.max_steps is not None and v.max_steps < 0:
        raise ValueError(f"max_steps={v.max_steps} is invalid: must be >= 0 (0 = the SFT "
                         "warm-up alone) or None")


def _check_algorithm(config: Any) -> None:
    v = config
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.preferences import check_preference_data_spec

    check_preference_data_spec(v.preference_data)
    if v.algorithm != "ppo":
        for name in PPO_DEFAULTS:
            if getattr(v, name) is not None:
                raise ValueError(f"{name}={getattr(v, name)} does not apply to algorithm="
                                 f"{v.algorithm!r}: it is a setting of PPO's critic and "
                                 "advantages; set algorithm='ppo' or leave it None")
    if v.algorithm == "dpo":
        _check_dpo(v)
        return
    if v.algorithm == "dapo" and v.beta:
        raise ValueError(f"beta={v.beta} does not apply to algorithm='dapo': DAPO trains "
                         "without a KL penalty; set beta=0 or leave it None")
    if v.clip_high < v.clip_low:
        raise ValueError(f"epsilon_high={v.clip_high} is invalid: the upper clip must "
                         f"be >= epsilon={v.clip_low} (algorithm={v.algorithm!r})")


def _check_dpo(config: Any) -> None:
    v = config
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.data.demonstrations import check_sft_data_spec
    from jaxpost.data.preferences import uses_demonstrations

    for name in ("epsilon", "epsilon_high"):
        if getattr(v, name) is not None:
            raise ValueError(f"{name}={getattr(v, name)} does not apply to algorithm='dpo': "
                             "DPO has no importance ratio to clip (its loss is -log "
                             "sigmoid(beta * margin)); leave it None")
    if v.num_iterations != 1:
        raise ValueError(f"num_iterations={v.num_iterations} does not apply to "
                         "algorithm='dpo': DPO takes one step per batch of pairs (mu is "
                         "GRPO's number of updates per rollout); leave it 1")
    for name in ("mini_batch_size", "micro_batch_size"):
        if getattr(v, name) is not None:
            raise ValueError(f"{name}={getattr(v, name)} does not apply to algorithm='dpo': "
                             f"each DPO step trains on its whole batch of batch_size="
                             f"{v.batch_size} pairs; leave it None")
    if v.beta == 0:
        raise ValueError("beta=0.0 is invalid for algorithm='dpo': DPO's loss -log "
                         "sigmoid(beta * margin) is then log 2 whatever the policy, with "
                         "no gradient; set beta > 0 or leave it None (0.1)")
    if uses_demonstrations(v.preference_data) and v.sft_data.strip() == "auto":
        try:
            check_sft_data_spec(v.dataset)
        except ValueError as e:
            raise ValueError(f"preference_data={v.preference_data!r} takes demonstrations "
                             f"from sft_data='auto', i.e. dataset={v.dataset!r}, which "
                             f"cannot give them: {e}. Set sft_data to another source, or "
                             "preference_data='self'") from e


def _check_judge(config: Any) -> None:
    v = config
    for name, choices in (("judge", JUDGE_KINDS), ("rubric_aggregation", AGGREGATIONS)):
        _require(getattr(v, name) in choices, name, getattr(v, name), f"one of {choices}")
    w = v.rubric_category_weights
    _require(len(w) == len(CATEGORIES) and all(x > 0 for x in w[:3]) and w[3] >= 0,
             "rubric_category_weights", w,
             f"{len(CATEGORIES)} weights for {', '.join(CATEGORIES)}: the first three > 0, "
             "the pitfall penalty >= 0")
    if v.judge_model != REFERENCE_JUDGE and (v.judge_model == ""
                                             or ":" in v.judge_model.split("/", 1)[0]):
        prefix, _, rest = v.judge_model.partition(":")
        _require(prefix in MODEL_PREFIXES and rest != "", "judge_model", v.judge_model,
                 f"'{REFERENCE_JUDGE}' (the run's base model) or one of {_MODEL_FORMS}")
    _require(_SECRET_NAME_RE.fullmatch(v.judge_api_key_name) is not None,
             "judge_api_key_name", "<hidden>", "the NAME of the secret holding the key "
             "(letters, digits, '_'), never the key itself")
    if v.judge_api_base_url:
        _require(v.judge_api_base_url.startswith(("http://", "https://")),
                 "judge_api_base_url", v.judge_api_base_url,
                 "must start with http:// or https://")
    if "rubric" in v.reward_functions and v.judge == "api":
        _require(v.judge_api_base_url != "", "judge_api_base_url", v.judge_api_base_url,
                 "judge='api' needs the server's URL, e.g. https://api.example.com/v1")
        _require(v.judge_api_model != "", "judge_api_model", v.judge_api_model,
                 "judge='api' needs the model name the server serves")


def is_optional(tp: Any) -> bool:
    """Whether annotation `tp` is `X | None`."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def inner_type(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def type_name(tp: Any) -> str:
    """Annotation `tp` as an error message names it: "int or None"."""
    if is_optional(tp):
        return f"{type_name(inner_type(tp))} or None"
    if typing.get_origin(tp) is tuple:
        return f"comma-separated list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def check_type(name: str, value: Any, tp: Any) -> Any:
    """Return `value` if it fits annotation `tp` (lists become tuples), else raise.

    Raises:
      ValueError: the value does not fit; the message names the field, the value and
        the expected type.
    """
    if value is None and is_optional(tp):
        return None
    base = inner_type(tp)
    bad = ValueError(f"{name}={value!r} is invalid: expected {type_name(tp)}, "
                     f"got {type(value).__name__}")
    if typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        elem = typing.get_args(base)[0]
        return tuple(check_type(name, x, elem) for x in value)
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        # bool is an int subclass; `batch_size=True` is always a mistake.
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is invalid: expected a finite number")
    else:
        ok = isinstance(value, base)
    if not ok:
        raise bad
    return float(value) if base is float else value
