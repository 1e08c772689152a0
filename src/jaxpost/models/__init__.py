"""Models: loading one from any source, its LoRA adapters, and PPO's critic.

* :mod:`~jaxpost.models.loading`: :func:`load_model` and its table of sources (the
  embedded Gemma 3 270M, a GGUF file, a local or Hugging Face directory, Kaggle).
* :mod:`~jaxpost.models.types`: :class:`LoadedModel` (model, tokenizer, mesh, end ids).
* :mod:`~jaxpost.models.families`: the families beyond Gemma 3 (Gemma, Qwen 2/3, Llama 3).
* :mod:`~jaxpost.models.hub`: downloads from the Hugging Face hub and Kaggle.
* :mod:`~jaxpost.models.gguf`: a GGUF file dequantized into a Hugging Face directory.
* :mod:`~jaxpost.models.lora`: LoRA adapters (qwix) on a loaded model.
* :mod:`~jaxpost.models.critic`: PPO's value model.

The names below are importable from ``jaxpost.models`` itself.
"""

from jaxpost._exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EMBEDDED_MODELS": "jaxpost.models.loading",
    "LOCAL_LOADERS": "jaxpost.models.loading",
    "LoadedModel": "jaxpost.models.types",
    "RANDOM_MODELS": "jaxpost.models.loading",
    "SOURCE_FORMS": "jaxpost.models.loading",
    "attention_heads": "jaxpost.models.loading",
    "check_tensor_parallel": "jaxpost.models.loading",
    "count_params": "jaxpost.models.loading",
    "embedded_model_dir": "jaxpost.models.loading",
    "eos_ids": "jaxpost.models.types",
    "gemma3_config_from_hf": "jaxpost.models.loading",
    "gguf_model_dir": "jaxpost.models.loading",
    "load_gemma3_safetensors": "jaxpost.models.loading",
    "load_kaggle": "jaxpost.models.loading",
    "load_local_dir": "jaxpost.models.loading",
    "load_model": "jaxpost.models.loading",
    "load_sentencepiece": "jaxpost.models.types",
    "read_safetensors": "jaxpost.models.loading",
    "tiny_gemma3_config": "jaxpost.models.loading",
})
