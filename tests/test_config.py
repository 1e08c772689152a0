"""Unit tests for jaxpost.config: validation, presets, overrides and YAML round trips."""

import dataclasses
import os
import re

import pytest

from jaxpost.config import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_SYSTEM_PROMPT,
    PRESETS,
    ColabTrainingConfig,
    apply_overrides,
    describe,
    from_dict,
    get_preset,
    load_yaml,
    save_yaml,
    to_dict,
)


def test_defaults_build_with_documented_values():
    c = ColabTrainingConfig()
    assert c.model == "embedded:gemma3-270m"
    assert c.lora_target_modules == DEFAULT_LORA_TARGETS
    assert "<reasoning>" in DEFAULT_SYSTEM_PROMPT and "<answer>" in DEFAULT_SYSTEM_PROMPT
    assert c.reward_functions == ("format_exact", "format_approximate", "answer_match")
    assert (c.num_generations, c.batch_size, c.num_batches) == (4, 2, 8)
    assert hash(c) == hash(ColabTrainingConfig())


def test_all_presets_build():
    assert set(PRESETS) == {"default", "smoke", "colab_tpu", "colab_tpu_v5e1", "kaggle_tpu", "gpu",
                            "cpu", "rubric_demo", "rubric_smoke"}
    for name, fn in PRESETS.items():
        assert isinstance(get_preset(name), ColabTrainingConfig)
        assert f"jaxpost train --preset {name}" in fn.__doc__
    # The default preset is the dataclass defaults plus its two stages' settings.
    stages = {"sft_steps": 40, "sft_learning_rate": 1e-3, "sft_batch_size": 8, "beta": 0.0,
              "learning_rate": 3e-5, "batch_size": 4, "num_generations": 4, "num_batches": 8}
    assert get_preset("default") == dataclasses.replace(ColabTrainingConfig(), **stages)


def test_smoke_preset_values():
    c = get_preset("smoke")
    assert c.model == "random:gemma3-tiny"
    assert (c.max_steps, c.batch_size, c.num_generations) == (2, 2, 2)
    assert (c.max_new_tokens, c.max_prompt_length, c.max_examples, c.eval_size) == (8, 96, 16, 4)
    assert (c.save_interval_steps, c.output_dir) == (1, "runs/smoke")
    assert c.total_steps == 2


def test_colab_and_kaggle_presets_values():
    c = get_preset("colab_tpu")
    assert c.model == "kaggle:google/gemma-3/flax/gemma3-1b-it"
    assert (c.dtype, c.dataset, c.max_examples, c.eval_size) == ("bfloat16", "gsm8k", None, 100)
    assert (c.lora_rank, c.lora_alpha, c.beta, c.learning_rate) == (64, 64.0, 0.08, 3e-6)
    assert (c.max_prompt_length, c.max_new_tokens, c.num_batches) == (256, 768, 3738)
    assert (c.batch_size, c.save_interval_steps, c.max_to_keep) == (1, 500, 4)
    assert c.save_to_drive and c.output_dir == "runs/colab_tpu"
    k = get_preset("kaggle_tpu")
    assert not k.save_to_drive and k.output_dir == "/kaggle/working/jaxpost"
    assert (k.batch_size, k.mini_batch_size) == (4, 4)
    assert dataclasses.replace(k, save_to_drive=True, output_dir="runs/colab_tpu",
                               batch_size=1, mini_batch_size=None) == c


def test_unknown_preset_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'smoke'"):
        get_preset("smoek")


@pytest.mark.parametrize("kwargs, field", [
    ({"num_generations": 1}, "num_generations"),
    ({"dtype": "float16"}, "dtype"),
    ({"lora_target_modules": ".*(q_proj"}, "lora_target_modules"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"reward_weights": (1.0, 2.0)}, "reward_weights"),
    ({"batch_size": 4, "mini_batch_size": 3}, "mini_batch_size"),
    ({"batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 3}, "micro_batch_size"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"max_steps": 0}, "max_steps"),
    ({"chat_template": "alpaca"}, "chat_template"),
    ({"model": "s3:bucket/model"}, "model"),
    ({"model": ""}, "model"),
    ({"answer_tag": "reasoning", "system_prompt": "custom"}, "answer_tag"),
    ({"answer_tag": "ans wer", "system_prompt": "custom"}, "answer_tag"),
    ({"reasoning_tag": "think"}, "system_prompt"),
    ({"reward_functions": ()}, "reward_functions"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"save_to_drive": "yes"}, "save_to_drive"),
    ({"beta": -0.1}, "beta"),
])
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ColabTrainingConfig(**kwargs)


def test_error_message_states_value_and_rule():
    with pytest.raises(ValueError) as err:
        ColabTrainingConfig(num_generations=1)
    assert "num_generations=1" in str(err.value) and "G >= 2" in str(err.value)
    with pytest.raises(ValueError) as err:
        ColabTrainingConfig(batch_size=4, mini_batch_size=3)
    assert "mini_batch_size=3" in str(err.value) and "batch_size=4" in str(err.value)


def test_valid_model_forms_and_batch_splits_accepted():
    for model in ("hf:google/gemma-3-1b-it", "kaggle:x/y", "/abs/dir", "./rel/dir", "dir"):
        assert ColabTrainingConfig(model=model).model == model
    c = ColabTrainingConfig(batch_size=8, mini_batch_size=4, micro_batch_size=2, top_k=None,
                            top_p=None, max_grad_norm=None, reward_weights=[1, 0.5, 2])
    assert c.reward_weights == (1.0, 0.5, 2.0)
    assert ColabTrainingConfig(batch_size=6, micro_batch_size=3).micro_batch_size == 3


def test_positional_args_refused():
    with pytest.raises(TypeError):
        ColabTrainingConfig("embedded:gemma3-270m")


def test_config_is_frozen():
    c = ColabTrainingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.learning_rate = 1.0


def test_lists_become_tuples():
    c = ColabTrainingConfig(reward_functions=["answer_match"], reward_weights=[2.0])
    assert c.reward_functions == ("answer_match",) and c.reward_weights == (2.0,)
    hash(c)


def test_derived_properties():
    c = ColabTrainingConfig(num_batches=10, num_iterations=2, warmup_ratio=0.25,
                            output_dir="out/run")
    assert c.total_steps == 20
    assert c.warmup_steps == 5
    assert dataclasses.replace(c, max_steps=7).total_steps == 7
    assert dataclasses.replace(c, max_steps=7).warmup_steps == 1
    assert c.checkpoint_dir == os.path.join("out/run", "checkpoints")
    assert c.tensorboard_dir == os.path.join("out/run", "tensorboard")
    assert c.export_dir == os.path.join("out/run", "export")
    assert c.effective_reward_weights == (1.0, 1.0, 1.0)
    assert dataclasses.replace(c, reward_weights=(1, 2, 3)).effective_reward_weights == (1.0, 2.0, 3.0)


def test_apply_overrides_converts_types():
    c = apply_overrides(ColabTrainingConfig(), [
        "num_batches=12", "learning_rate=1e-4", "tensorboard=False", "save_to_drive=YES",
        "top_k=none", "max_steps=3", "reward_functions=answer_match, format_exact",
        "reward_weights=2,0.5", "output_dir=runs/x=y",
    ])
    assert c.num_batches == 12 and isinstance(c.num_batches, int)
    assert c.learning_rate == 1e-4
    assert c.tensorboard is False and c.save_to_drive is True
    assert c.top_k is None and c.max_steps == 3
    assert c.reward_functions == ("answer_match", "format_exact")
    assert c.reward_weights == (2.0, 0.5)
    assert c.output_dir == "runs/x=y"
    assert apply_overrides(c, ["reward_weights=null"]).reward_weights is None


@pytest.mark.parametrize("item, text", [
    ("learnig_rate=1e-4", "did you mean 'learning_rate'"),
    ("num_batches=3.5", "num_batches"),
    ("tensorboard=maybe", "expected bool"),
    ("top_k=many", "int or None"),
    ("learning_rate", "key=value"),
    ("num_generations=1", "G >= 2"),
])
def test_apply_overrides_rejects_bad_input(item, text):
    with pytest.raises(ValueError, match=text):
        apply_overrides(ColabTrainingConfig(), [item])


def test_apply_overrides_returns_new_config():
    base = ColabTrainingConfig()
    assert apply_overrides(base, ["seed=1"]).seed == 1
    assert base.seed == 42


def test_to_dict_is_plain_and_from_dict_round_trips():
    c = get_preset("kaggle_tpu")
    d = to_dict(c)
    assert isinstance(d["reward_functions"], list)
    assert from_dict(d) == c


def test_from_dict_coerces_strings_and_uses_base():
    # PyYAML reads "3e-6" (no dot) as a string; it must still become a float.
    c = from_dict({"learning_rate": "3e-6", "top_k": "null", "batch_size": "4"},
                  base=get_preset("smoke"))
    assert c.learning_rate == 3e-6 and c.top_k is None and c.batch_size == 4
    assert c.model == "random:gemma3-tiny"


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown config key 'learnig_rate'; did you mean 'learning_rate'"):
        from_dict({"learnig_rate": 1e-4})
    with pytest.raises(ValueError, match="valid keys"):
        from_dict({"zzzzzz": 1})


def test_yaml_round_trip(tmp_path):
    c = dataclasses.replace(get_preset("colab_tpu"), reward_weights=(1.0, 0.5, 2.0))
    path = tmp_path / "sub" / "config.yaml"
    save_yaml(c, str(path))
    assert load_yaml(str(path)) == c
    assert os.listdir(path.parent) == ["config.yaml"]


def test_load_yaml_handwritten_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-6\nreward_functions: [answer_match]\nmax_steps: 5\n")
    c = load_yaml(str(path), base=get_preset("smoke"))
    assert (c.learning_rate, c.reward_functions, c.max_steps) == (3e-6, ("answer_match",), 5)


@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", ""])
def test_load_yaml_non_mapping_names_path(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.yaml"):
        load_yaml(str(path))


def test_load_yaml_unknown_key_names_path_and_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("num_generation: 4\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*did you mean 'num_generations'"):
        load_yaml(str(path))


def test_describe_mentions_key_settings():
    text = describe(get_preset("smoke"))
    for piece in ("random:gemma3-tiny", "reasoning-gym:basic_arithmetic", "G=2", "runs/smoke"):
        assert piece in text


def test_every_model_source_form_load_model_takes_is_accepted():
    """One list of prefixes: the config accepts what jaxpost.models.loading.load_model loads."""
    assert ColabTrainingConfig(model="gguf:/models/tiny.gguf").model == "gguf:/models/tiny.gguf"
    with pytest.raises(ValueError, match="gguf:PATH"):
        ColabTrainingConfig(model="s3:bucket/model")


def test_the_config_and_the_cli_help_import_no_jax():
    """Building a config (and ``jaxpost --help``) starts neither JAX nor Grain."""
    import subprocess
    import sys

    code = ("import sys\nfrom jaxpost.config import ColabTrainingConfig, get_preset\n"
            "ColabTrainingConfig(); get_preset('colab_tpu')\n"
            "heavy = sorted(m for m in ('jax', 'grain', 'tunix', 'flax') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "jaxpost.cli", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()}
    assert "jax" not in imported and "grain" not in imported


def test_dpo_builds_from_presets_with_its_own_beta():
    """The RL presets leave epsilon and epsilon_high None, so `--set algorithm=dpo` works."""
    smoke = apply_overrides(get_preset("smoke"), ["algorithm=dpo"])
    assert smoke.kl_beta == 0.1 and smoke.preference_data == "self+demonstrations"
    assert "DPO:      beta=0.1, pairs from 'self+demonstrations' (G=2)" in describe(smoke)
    assert "RL:" not in describe(smoke)
    with pytest.raises(ValueError, match="no ratio clip"):
        smoke.clip_low  # noqa: B018  (a property that refuses)
    c = ColabTrainingConfig(algorithm="dpo", beta=0.25,
                            preference_data="preference-jsonl:prefs.jsonl#max=10")
    assert c.kl_beta == 0.25 and "pairs from 'preference-jsonl:prefs.jsonl#max=10'" in describe(c)
    assert ColabTrainingConfig(algorithm="dpo", sft_steps=4, sft_data="gsm8k",
                               dataset="rubric-demo",
                               preference_data="self+demonstrations").algorithm == "dpo"


@pytest.mark.parametrize("changes,message", [
    (dict(epsilon=0.2), "epsilon=0.2 does not apply to algorithm='dpo': DPO has no "
                        "importance ratio"),
    (dict(epsilon_high=0.28), "epsilon_high=0.28 does not apply"),
    (dict(num_iterations=2), "num_iterations=2 does not apply"),
    (dict(mini_batch_size=1), "mini_batch_size=1 does not apply"),
    (dict(micro_batch_size=1), "micro_batch_size=1 does not apply"),
    (dict(beta=0.0), "beta=0.0 is invalid for algorithm='dpo'"),
    (dict(beta=-1.0), "beta=-1.0 is invalid"),
    (dict(preference_data="gsm8k"), "no chosen and rejected completions"),
    (dict(preference_data="preference-jsonl"), "needs a file path"),
    (dict(preference_data="self+demonstrations", dataset="rubric-demo"),
     "takes demonstrations from sft_data='auto', i.e. dataset='rubric-demo'"),
])
def test_dpo_refuses_what_does_not_apply_and_bad_pairs(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ColabTrainingConfig(algorithm="dpo", **changes)


def test_preference_data_is_checked_for_every_algorithm_and_read_by_dpo_alone():
    with pytest.raises(ValueError, match="preference_data"):
        ColabTrainingConfig(preference_data="nonsense")
    # Unused by GRPO, so no demonstrations are asked of a rubric dataset.
    assert ColabTrainingConfig(dataset="rubric-demo",
                               preference_data="self+demonstrations").algorithm == "grpo"
