"""The GGUF export's former module, kept for one release: its names now live in
:mod:`jaxpost.export.gguf_file`."""

from jaxpost.export.gguf_file import (
    GGUF_TYPES,
    gguf_tensor_name,
    modelfile,
    tokenizer_fields,
    write_gguf,
    write_gguf_export,
)

__all__ = ["GGUF_TYPES", "gguf_tensor_name", "modelfile", "tokenizer_fields", "write_gguf",
           "write_gguf_export"]
