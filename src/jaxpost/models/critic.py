"""PPO's critic: the base model with its own LoRA adapters and a linear value head.

The critic estimates, at every position of a prompt + completion, the return still to
come (the reward, less the KL penalty, that the completion will earn from there on);
PPO's advantages are the generalised advantage estimates (GAE, Schulman et al. 2016)
built from those values. It shares the frozen base weights with the policy and the
reference model (the same arrays, no copy): only its adapters and its head train.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpost.models.lora import apply_lora
from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits


class ValueModel(nnx.Module):
    """Per-position values of a token sequence: ``[batch, seq] -> [batch, seq, 1]``.

    The backbone's final-norm hidden states (no vocabulary projection: a value needs
    none) times a head ``w [embed, 1]`` plus a bias. The head is a ``nnx.LoRAParam``
    so that a LoRA trainer, which trains exactly those, trains it with the adapters.
    It starts at zero: every value is 0 until the critic has learned, so the first
    advantages are the rewards themselves.

    The call takes Tunix's model arguments (``positions``, ``attention_mask``; the
    cache is not used) and returns the values alone, as Tunix's ``compute_score``
    expects of a critic.
    """

    def __init__(self, backbone: Gemma3TrimmedLogits, mesh: jax.sharding.Mesh | None = None):
        if not isinstance(backbone, Gemma3TrimmedLogits):
            raise ValueError(f"PPO's critic needs a Gemma 3 backbone (jaxpost.tunix_ext.gemma3."
                             f"Gemma3TrimmedLogits), got {type(backbone).__name__}")
        self.backbone = backbone
        embed = backbone.config.embed_dim
        head, bias = jnp.zeros((embed, 1), jnp.float32), jnp.zeros((1,), jnp.float32)
        if mesh is not None:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            head, bias = jax.device_put((head, bias), replicated)
        self.value_head = nnx.LoRAParam(head)
        self.value_bias = nnx.LoRAParam(bias)

    def __call__(self, tokens, positions=None, cache=None, attention_mask=None, **_):
        hidden, _ = self.backbone(tokens, positions, None, attention_mask,
                                  hidden_keep=tokens.shape[1])  # [batch, seq, embed]
        values = hidden.astype(jnp.float32) @ self.value_head[...]
        return values + self.value_bias[...]  # [batch, seq, 1]

    def get_model_input(self):
        return self.backbone.get_model_input()


def build_value_model(base_model: nnx.Module, mesh: jax.sharding.Mesh, *, rank: int,
                      alpha: float, target_modules: str, seed: int) -> ValueModel:
    """A critic over ``base_model``'s frozen weights, with fresh LoRA adapters.

    The backbone is a second graph over the very arrays of ``base_model`` (merging its
    state copies no buffer), adapted like the policy (``rank``, ``alpha``,
    ``target_modules``) but from another ``seed``, so the two never share adapters.
    """
    graphdef, state = nnx.split(base_model)
    backbone = apply_lora(nnx.merge(graphdef, state), mesh, rank=rank, alpha=alpha,
                          target_modules=target_modules, seed=seed)
    return ValueModel(backbone, mesh)
