"""The Hugging Face export's former module, kept for one release: its names now live in
:mod:`jaxpost.export` (:mod:`~jaxpost.export.weights`, :mod:`~jaxpost.export.huggingface`,
:mod:`~jaxpost.export.formats`, :mod:`~jaxpost.export.upload`)."""

from jaxpost.export.directory import is_lora_export, read_lora_export, write_record
from jaxpost.export.formats import FORMATS, export_from_lora_dir, export_run
from jaxpost.export.huggingface import (
    EMBEDDED_BASE_REPOS,
    HF_MODEL_FILE,
    PEFT_ADAPTER_FILE,
    PEFT_CONFIG_FILE,
    base_model_name,
    hf_config,
    peft_config,
    write_hf_model,
    write_peft_adapter,
)
from jaxpost.export.tokenizer import (
    TOKENIZER_FILE,
    generation_config,
    tokenizer_files,
    tokenizer_model_bytes,
)
from jaxpost.export.upload import hub_write_token, push_to_hub
from jaxpost.export.weights import (
    base_params,
    hf_tensors,
    lora_delta,
    lora_rank_of,
    merge_lora,
    merged_hf_tensors,
    peft_target_modules,
    peft_tensors,
)

__all__ = [
    "EMBEDDED_BASE_REPOS", "FORMATS", "HF_MODEL_FILE", "PEFT_ADAPTER_FILE", "PEFT_CONFIG_FILE",
    "TOKENIZER_FILE", "base_model_name", "base_params", "export_from_lora_dir", "export_run",
    "generation_config", "hf_config", "hf_tensors", "hub_write_token", "is_lora_export",
    "lora_delta", "lora_rank_of", "merge_lora", "merged_hf_tensors", "peft_config",
    "peft_target_modules", "peft_tensors", "push_to_hub", "read_lora_export", "tokenizer_files",
    "tokenizer_model_bytes", "write_hf_model", "write_peft_adapter", "write_record",
]
