"""A config to and from text: ``--set`` overrides, dicts, YAML files, a run's config and
the summary printed at the start of a run."""

import dataclasses
import difflib
import os
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from jaxpost.config.fields import _FIELD_TYPES, ColabTrainingConfig
from jaxpost.config.validation import inner_type, is_optional, type_name
from jaxpost.rundir import RunDir
from jaxpost.runtime.atomic import write_atomic

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NONE = ("none", "null")


def _parse(name: str, text: str, tp: Any) -> Any:
    """Convert the string `text` to annotation `tp`; ValueError names key and type."""
    if is_optional(tp) and text.strip().lower() in _NONE:
        return None
    base = inner_type(tp)
    try:
        if typing.get_origin(base) is tuple:
            elem = typing.get_args(base)[0]
            return tuple(_parse(name, p.strip(), elem) for p in text.split(",") if p.strip())
        if base is bool:
            return _BOOLS[text.strip().lower()]
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot set {name}={text!r}: expected {type_name(tp)}") from e


def _check_key(key: str) -> Any:
    """Annotation of field `key`; unknown keys fail with the closest valid name."""
    if key in _FIELD_TYPES:
        return _FIELD_TYPES[key]
    close = difflib.get_close_matches(key, list(_FIELD_TYPES), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(_FIELD_TYPES)}"
    raise ValueError(f"unknown config key '{key}'; {hint}")


def _coerce(key: str, value: Any) -> Any:
    """Accept a value of the field's type or its string spelling (CLI, YAML 1.1 '3e-6')."""
    tp = _check_key(key)
    if isinstance(value, str) and inner_type(tp) is not str:
        return _parse(key, value, tp)
    return value


def apply_overrides(config: ColabTrainingConfig, overrides: list[str]) -> ColabTrainingConfig:
    """Return a new config with `key=value` strings applied (later items win).

    Values are parsed by the field's annotation: int, float, bool (true/false/1/0/yes/no),
    str, "none"/"null" for optional fields, comma-separated lists for tuples. The result
    is validated again via `dataclasses.replace`.
    """
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        key = key.strip()
        changes[key] = _parse(key, text, _check_key(key))
    return dataclasses.replace(config, **changes)


def to_dict(config: ColabTrainingConfig) -> dict[str, Any]:
    """Plain dict of every field (tuples become lists), safe for JSON and YAML."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_dict(d: Mapping[str, Any], base: ColabTrainingConfig | None = None) -> ColabTrainingConfig:
    """Build a config from `d`, starting from `base` (default: the dataclass defaults).

    Values may be of the field's type or strings in override syntax. Unknown keys raise
    ValueError with the closest valid name.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"config must be a mapping of keys to values, got {type(d).__name__}")
    changes = {str(k): _coerce(str(k), v) for k, v in d.items()}
    if base is None:
        return ColabTrainingConfig(**changes)
    return dataclasses.replace(base, **changes)


def save_yaml(config: ColabTrainingConfig, path: str) -> None:
    """Write `config` to `path` as YAML, whole or not at all
    (:func:`jaxpost.runtime.atomic.write_atomic`), so a crash never leaves a half-written
    config next to a checkpoint."""
    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


def load_yaml(path: str, base: ColabTrainingConfig | None = None) -> ColabTrainingConfig:
    """Read a YAML mapping of config keys from `path` (see `from_dict`).

    Errors are ValueError prefixed with the path.
    """
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a YAML mapping of config keys, "
                         f"got {type(data).__name__}")
    try:
        return from_dict(data, base)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_run_config(run_dir: str | os.PathLike) -> ColabTrainingConfig:
    """The ``ColabTrainingConfig`` a training run ran with (its ``config.yaml``).

    Raises:
      FileNotFoundError: the directory holds no ``config.yaml``.
      ValueError: the file is not a valid config (the message names the file).
    """
    run = RunDir(run_dir)
    if not run.is_run():
        raise FileNotFoundError(f"{run.config_file} is missing: RUN_DIR must be the "
                                "output_dir of a jaxpost train run")
    return load_yaml(str(run.config_file))


def describe(config: ColabTrainingConfig) -> str:
    """Short multi-line summary for printing at the start of a run."""
    c = config
    return "\n".join([
        f"model:    {c.model} ({c.dtype}, LoRA r={c.lora_rank} alpha={c.lora_alpha})",
        f"dataset:  {c.dataset} (max_examples={c.max_examples}, eval_size={c.eval_size})",
        *([f"SFT:      {c.sft_steps} steps of {c.sft_batch_size} demonstrations from "
           f"{c.sft_data!r}, lr={c.sft_learning_rate:g}"] if c.sft_steps else []),
        f"steps:    {c.total_steps} (warmup {c.warmup_steps}), batch_size={c.batch_size} prompts",
        (f"DPO:      beta={c.kl_beta:g}, pairs from {c.preference_data!r}"
         + (f" (G={c.num_generations})" if c.preference_data.startswith("self") else "")
         if c.algorithm == "dpo" else
         f"RL:       {c.algorithm} G={c.num_generations} mu={c.num_iterations} "
         f"beta={c.kl_beta:g} epsilon=[{c.clip_low:g}, {c.clip_high:g}]"),
        f"optim:    lr={c.learning_rate:g} max_new_tokens={c.max_new_tokens}",
        *([f"rubric:   judge={c.judge} "
           f"({c.judge_api_model if c.judge == 'api' else c.judge_model}), "
           f"aggregation={c.rubric_aggregation}"] if "rubric" in c.reward_functions else []),
        f"output:   {c.output_dir}",
    ])
