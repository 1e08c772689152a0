"""LoRA adapters with qwix: only the low-rank matrices train, the base stays frozen.

``apply_lora`` wraps the base model's matching projections; the returned model shares
the base model's weight arrays (qwix copies the module graph, not the arrays), so the
untouched base model can serve as GRPO's frozen reference model at no extra memory.
"""

from __future__ import annotations

import re

import jax
from flax import nnx

from jaxpost.mesh import use_mesh

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
    """
    import qwix

    if rank <= 0 or alpha <= 0:
        raise ValueError(f"lora_rank={rank} and lora_alpha={alpha} must both be positive")
    try:
        re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"lora_target_modules={target_modules!r} is not a valid regex: {e}") from e
    provider = qwix.LoraProvider(module_path=target_modules, rank=rank, alpha=alpha)
    inputs = base_model.get_model_input()
    with use_mesh(mesh):
        lora_model = qwix.apply_lora_to_model(base_model, provider, rngs=nnx.Rngs(seed), **inputs)
        state = nnx.state(lora_model, nnx.LoRAParam)
        if not jax.tree.leaves(state):
            raise ValueError(
                f"lora_target_modules={target_modules!r} matched no module of this model; "
                f"module paths look like 'layers/0/attn/q_einsum' or 'layers/0/mlp/up_proj'")
        sharded = jax.lax.with_sharding_constraint(state, nnx.get_named_sharding(state, mesh))
        nnx.update(lora_model, sharded)
    return lora_model


def lora_state(model: nnx.Module) -> nnx.State:
    """The LoRA parameters of ``model`` (empty for a model without adapters)."""
    return nnx.state(model, nnx.LoRAParam)


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA parameters."""
    return bool(jax.tree.leaves(lora_state(model)))
