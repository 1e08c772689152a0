"""The RoPE base of Tunix's Llama 3 and Qwen 3: their attention made to use the config's.

In Tunix 0.1.7, ``tunix.models.llama3`` and ``tunix.models.qwen3`` call ``apply_rope``
without ``rope_theta``, so every model gets the default base 1e6 whatever its config
says (Llama 3 uses 5e5, Qwen3-2507 5e6). :func:`honour_rope_theta` replaces the module
attributes ``apply_rope`` and ``Attention.block`` of such a module (docs/tunix_patches.md).
"""

from __future__ import annotations

import contextvars
import functools

from jaxpost.tunix_ext.versions import check_versions

# The rope_theta of the attention block running now (None outside one).
_ROPE_THETA = contextvars.ContextVar("jaxpost_rope_theta", default=None)


def honour_rope_theta(model_module) -> None:
    """Makes a Tunix model module's attention use its config's ``rope_theta``.

    Wraps the module's ``Attention.block`` to publish ``self.config.rope_theta`` while it
    runs, and its ``apply_rope`` to use it when no base is passed. Idempotent; a Tunix
    version that passes the base explicitly is left as it is.

    Args:
      model_module: a Tunix model module with ``apply_rope`` and ``Attention``
        (``tunix.models.llama3.model``, ``tunix.models.qwen3.model``).
    """
    if getattr(model_module, "_jaxpost_honours_rope_theta", False):
        return
    check_versions()
    rope, block = model_module.apply_rope, model_module.Attention.block

    @functools.wraps(rope)
    def apply_rope(*args, **kwargs):
        theta = _ROPE_THETA.get()
        if theta is not None and len(args) < 4 and "rope_theta" not in kwargs:
            kwargs["rope_theta"] = theta
        return rope(*args, **kwargs)

    @functools.wraps(block)
    def attention_block(self, *args, **kwargs):
        token = _ROPE_THETA.set(self.config.rope_theta)
        try:
            return block(self, *args, **kwargs)
        finally:
            _ROPE_THETA.reset(token)

    model_module.apply_rope = apply_rope
    model_module.Attention.block = attention_block
    model_module._jaxpost_honours_rope_theta = True
