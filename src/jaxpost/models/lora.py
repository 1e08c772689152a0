"""LoRA adapters with qwix: only the low-rank matrices train, the base stays frozen.

``apply_lora`` wraps the base model's matching projections; the returned model shares
the base model's weight arrays (qwix copies the module graph, not the arrays), so the
untouched base model can serve as GRPO's frozen reference model at no extra memory.

The adapters of ``nnx.Linear`` projections (the MLP's ``gate_proj``, ``up_proj`` and
``down_proj``) compute ``(x @ A) @ B`` through
:func:`jaxpost.tunix_ext.lora.lora_matmul`, whose backward pass is written out so that
XLA's CPU backend multiplies the large activations as they are laid out.
"""

from __future__ import annotations

import math
import re

import jax
from flax import nnx

from jaxpost.tunix_ext.lora import add_adapters

DEFAULT_TARGETS = (".*(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj"
                   "|q_proj|k_proj|v_proj|o_proj)")


def apply_lora(base_model: nnx.Module, mesh: jax.sharding.Mesh, *, rank: int = 8,
               alpha: float = 16.0, target_modules: str = DEFAULT_TARGETS,
               seed: int = 0) -> nnx.Module:
    """Returns ``base_model`` with LoRA adapters on the modules matching ``target_modules``.

    Args:
      base_model: a Tunix NNX model (anything with ``get_model_input()``).
      mesh: the mesh the base model lives on; LoRA parameters are sharded onto it.
      rank: adapter rank r (> 0).
      alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
      target_modules: regular expression over module paths (e.g. ``layers/0/mlp/up_proj``).
      seed: initialisation seed for the A matrices (B starts at zero, so the adapted
        model initially computes exactly what the base model does).

    Raises:
      ValueError: when the pattern is invalid or matches no module of the model.
      RuntimeError: the installed Tunix or qwix is not the version jaxpost's LoRA
        products were written for (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"lora_rank={rank} and lora_alpha={alpha} must both be positive")
    try:
        re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"lora_target_modules={target_modules!r} is not a valid regex: {e}") from e
    # Outside the mesh context: qwix runs one eager forward pass, and under a TPU mesh
    # Tunix's activation sharding would split the key projection's heads over 'tp' eagerly,
    # which fails when tp does not divide them (Gemma 3 1B has one KV head, the TPU presets
    # tp=4). Inside jit the same constraint pads instead. Tunix's own demos apply LoRA so.
    lora_model = add_adapters(base_model, rank=rank, alpha=alpha, target_modules=target_modules,
                              seed=seed)
    state = nnx.state(lora_model, nnx.LoRAParam)
    if not jax.tree.leaves(state):
        raise ValueError(
            f"lora_target_modules={target_modules!r} matched no module of this model; "
            f"module paths look like 'layers/0/attn/q_einsum' or 'layers/0/mlp/up_proj'")
    nnx.update(lora_model, jax.device_put(state, lora_shardings(state, mesh)))
    for _, module in nnx.iter_modules(lora_model):
        if (getattr(module, "kernel_lora_a", None) is not None
                or getattr(module, "w_lora_a", None) is not None):
            # The adapter's scale, for products jaxpost writes itself (decoding, see
            # jaxpost.tunix_ext.decoding_layers.DecodingFeedForward and DecodingAttention);
            # qwix keeps it in its rule.
            module.lora_scale = alpha / rank
    return lora_model


def lora_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """Named shardings for LoRA parameters: their annotated partitioning, where it divides.

    qwix annotates each adapter with its base weight's axes, so an adapter dimension of
    size 1 (the single KV head of Gemma 3 1B) or of rank r can be named for a mesh axis
    that does not divide it; such a dimension is replicated instead.
    """
    def fit(array, sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
        spec = []
        for size, axes in zip(array.shape, tuple(sharding.spec) + (None,) * array.ndim):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            parts = math.prod(mesh.shape[name] for name in names)
            spec.append(axes if size % parts == 0 else None)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(fit, state, nnx.get_named_sharding(state, mesh))


def lora_state(model: nnx.Module) -> nnx.State:
    """The LoRA parameters of ``model`` (empty for a model without adapters)."""
    return nnx.state(model, nnx.LoRAParam)


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA parameters."""
    return bool(jax.tree.leaves(lora_state(model)))
