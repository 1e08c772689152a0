"""Exports a trained run: jaxpost's LoRA adapters, PEFT, a merged Hugging Face model, GGUF.

Every export is a directory that holds the run's ``config.yaml``, ``metrics.json`` and a
``README.md`` beside its own files. One module per concern:

* :mod:`~jaxpost.export.directory` -- the record files, and writing a directory or a
  file all-or-nothing, never over a directory jaxpost did not write;
* :mod:`~jaxpost.export.adapters` -- jaxpost's own LoRA format (``adapter.safetensors``),
  written from a checkpoint or a model and loaded back (:func:`load_lora_export`);
* :mod:`~jaxpost.export.weights` -- Tunix / qwix weights to Hugging Face's layout, LoRA
  merged or as PEFT adapters;
* :mod:`~jaxpost.export.tokenizer` -- the tokenizer files with the run's prompt format;
* :mod:`~jaxpost.export.huggingface` -- the PEFT and merged directories;
* :mod:`~jaxpost.export.gguf_file` -- a GGUF file and Ollama Modelfile;
* :mod:`~jaxpost.export.cards` -- each format's README (the Hub's model card);
* :mod:`~jaxpost.export.formats` -- :func:`export_run`, any format by name;
* :mod:`~jaxpost.export.upload` -- :func:`push_to_hub`.

This package also answers every name the former ``jaxpost.export`` module had.
"""

from jaxpost.export.adapters import (
    apply_lora_arrays,
    checkpoint_lora_arrays,
    export_checkpoint,
    export_lora,
    load_lora_export,
    lora_arrays,
    set_lora_arrays,
)
from jaxpost.export.directory import (
    ADAPTER_FILE,
    EXPORT_CONFIG,
    EXPORT_METRICS,
    check_export_target,
    export_directory,
    is_lora_export,
    read_lora_export,
)
from jaxpost.export.formats import FORMATS, export_from_lora_dir, export_run
from jaxpost.export.gguf_file import GGUF_TYPES, write_gguf_export
from jaxpost.export.huggingface import write_hf_model, write_peft_adapter
from jaxpost.export.upload import hub_write_token, push_to_hub

__all__ = [
    "ADAPTER_FILE",
    "EXPORT_CONFIG",
    "EXPORT_METRICS",
    "FORMATS",
    "GGUF_TYPES",
    "apply_lora_arrays",
    "check_export_target",
    "checkpoint_lora_arrays",
    "export_checkpoint",
    "export_directory",
    "export_from_lora_dir",
    "export_lora",
    "export_run",
    "hub_write_token",
    "is_lora_export",
    "load_lora_export",
    "lora_arrays",
    "push_to_hub",
    "read_lora_export",
    "set_lora_arrays",
    "write_gguf_export",
    "write_hf_model",
    "write_peft_adapter",
]
