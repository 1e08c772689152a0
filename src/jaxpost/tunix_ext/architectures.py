"""Tunix's model families, as jaxpost loads them: each family's ``model`` and ``params``
modules, named in one place.

Gemma, Gemma 3 and Llama 3 are imported here; Qwen 2 and Qwen 3 through
:func:`qwen2_modules` and :func:`qwen3_modules`, when a checkpoint of theirs is loaded:
importing them imports Pallas' TPU splash-attention kernels (0.3 s) and JAX warns
that they use the deprecated ``jax.experimental.shard_map``.
"""

from __future__ import annotations

from types import ModuleType

from tunix.models.gemma import model as gemma
from tunix.models.gemma import params as gemma_params
from tunix.models.gemma import params_safetensors as gemma_safetensors
from tunix.models.gemma3 import model as gemma3
from tunix.models.gemma3 import params as gemma3_params
from tunix.models.llama3 import model as llama3
from tunix.models.llama3 import params as llama3_params

__all__ = ["gemma", "gemma3", "gemma3_params", "gemma_params", "gemma_safetensors", "llama3",
           "llama3_params", "qwen2_modules", "qwen3_modules"]


def qwen2_modules() -> tuple[ModuleType, ModuleType]:
    """``(model, params)``: Tunix's Qwen 2 modules (``tunix.models.qwen2``)."""
    # Qwen's modules import Pallas' TPU kernels (0.3 s and a warning): only for a Qwen model
    from tunix.models.qwen2 import model, params

    return model, params


def qwen3_modules() -> tuple[ModuleType, ModuleType]:
    """``(model, params)``: Tunix's Qwen 3 modules (``tunix.models.qwen3``)."""
    # Qwen's modules import Pallas' TPU kernels (0.3 s and a warning): only for a Qwen model
    from tunix.models.qwen3 import model, params

    return model, params
