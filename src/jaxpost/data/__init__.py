"""Data: the training and evaluation examples, and the prompts built from them.

* :mod:`~jaxpost.data.datasets`: dataset specs (``gsm8k``, ``reasoning-gym:TASK``,
  ``jsonl:PATH``, rubric sets) into Grain datasets.
* :mod:`~jaxpost.data.prompts`: the system prompt, chat templates, :class:`PromptFormat`.
* :mod:`~jaxpost.data.jsonl`: reading JSONL files, with the line of a bad row.
* :mod:`~jaxpost.data.demonstrations`: worked answers for the SFT warm-up;
  :mod:`~jaxpost.data.rationales` builds those of reasoning-gym arithmetic tasks.
* :mod:`~jaxpost.data.preferences`: chosen and rejected completions for DPO.

The names below are importable from ``jaxpost.data`` itself.
"""

from jaxpost._exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "DATASET_FORMS": "jaxpost.data.datasets",
    "DEFAULT_REASONING_GYM_SIZE": "jaxpost.data.datasets",
    "DatasetSpec": "jaxpost.data.datasets",
    "GSM8K_HF_SPLITS": "jaxpost.data.datasets",
    "PromptFormat": "jaxpost.data.prompts",
    "RUBRIC_KINDS": "jaxpost.data.datasets",
    "format_prompt": "jaxpost.data.prompts",
    "load_examples": "jaxpost.data.datasets",
    "num_train_batches": "jaxpost.data.datasets",
    "parse_dataset_spec": "jaxpost.data.datasets",
    "prepare_datasets": "jaxpost.data.datasets",
    "read_jsonl": "jaxpost.data.jsonl",
    "resolve_chat_template": "jaxpost.data.prompts",
})
