"""The export's tokenizer files' former module, kept for one release: its names now live
in :mod:`jaxpost.export.tokenizer`."""

from jaxpost.export.tokenizer import (
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    TOKENIZER_JSON,
    generation_config,
    prompt_format,
    tokenizer_files,
    tokenizer_json,
    tokenizer_model_bytes,
)

__all__ = ["TOKENIZER_CONFIG", "TOKENIZER_FILE", "TOKENIZER_JSON", "generation_config",
           "prompt_format", "tokenizer_files", "tokenizer_json", "tokenizer_model_bytes"]
