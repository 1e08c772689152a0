"""Training configuration: one frozen, validated dataclass and the ways to build it.

`ColabTrainingConfig` is the single source of truth for every setting. CLI overrides
(`key=value`), YAML files and notebook keyword arguments all map onto its fields, and
every path goes through `__post_init__`, so an invalid config cannot exist. Derived
values (total steps, warmup steps, output sub-directories) are properties.

    choices.py     the values fields may take and what None stands for
    fields.py      ColabTrainingConfig: the fields, their defaults and derived values
    validation.py  the checks every field goes through when a config is built
    files.py       --set overrides, dicts, YAML files, a run's config.yaml, describe()
    presets.py     the named presets and get_preset()

Importing it imports no JAX, so ``jaxpost --help`` and a config's checks start fast.
"""

from jaxpost.config.choices import (
    ALGORITHM_DEFAULTS,
    ALGORITHMS,
    CHAT_TEMPLATES,
    DEFAULT_DATASET,
    DEFAULT_LORA_TARGETS,
    DEFAULT_SYSTEM_PROMPT,
    DTYPES,
    JUDGE_KINDS,
    MODEL_PREFIXES,
    PPO_DEFAULTS,
    REFERENCE_JUDGE,
    RL_ALGORITHMS,
)
from jaxpost.config.fields import ColabTrainingConfig
from jaxpost.config.files import (
    apply_overrides,
    describe,
    from_dict,
    load_run_config,
    load_yaml,
    save_yaml,
    to_dict,
)
from jaxpost.config.presets import (
    PRESETS,
    colab_tpu_config,
    colab_tpu_v5e1_config,
    cpu_config,
    default_config,
    get_preset,
    gpu_config,
    kaggle_tpu_config,
    rubric_demo_config,
    rubric_smoke_config,
    smoke_config,
)
from jaxpost.rewards.rubrics import AGGREGATIONS, CATEGORIES, DEFAULT_CATEGORY_WEIGHTS

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "ALGORITHM_DEFAULTS", "CATEGORIES", "CHAT_TEMPLATES",
    "DEFAULT_CATEGORY_WEIGHTS", "DEFAULT_DATASET", "DEFAULT_LORA_TARGETS",
    "DEFAULT_SYSTEM_PROMPT", "DTYPES", "JUDGE_KINDS", "MODEL_PREFIXES", "PPO_DEFAULTS",
    "PRESETS", "REFERENCE_JUDGE", "RL_ALGORITHMS", "ColabTrainingConfig", "apply_overrides",
    "colab_tpu_config", "colab_tpu_v5e1_config", "cpu_config", "default_config", "describe",
    "from_dict", "get_preset", "gpu_config", "kaggle_tpu_config", "load_run_config",
    "load_yaml", "rubric_demo_config", "rubric_smoke_config", "save_yaml", "smoke_config",
    "to_dict",
]
