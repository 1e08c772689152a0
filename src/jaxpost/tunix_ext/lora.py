"""qwix's LoRA as jaxpost uses it: adapters added to a model, their products through
:func:`lora_matmul`.

:func:`add_adapters` wraps a model's matching projections with qwix's LoRA, after
:func:`install_lora_matmul` has routed qwix's ``dot_general`` LoRA delta, the private
``qwix._src.providers.lora._compute_lora_delta`` (qwix 0.1.8; docs/tunix_patches.md),
through :func:`lora_matmul`: the adapters of ``nnx.Linear`` projections (the MLP's
``gate_proj``, ``up_proj`` and ``down_proj``) then compute ``(x @ A) @ B`` with a
backward pass written so that XLA's CPU backend multiplies the large activations as
they are laid out.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import qwix
from flax import nnx
from qwix._src.providers import lora as qwix_lora

from jaxpost.tunix_ext.versions import check_versions


def add_adapters(base_model: nnx.Module, *, rank: int, alpha: float, target_modules: str,
                 seed: int) -> nnx.Module:
    """``base_model`` with qwix's LoRA adapters on the modules matching ``target_modules``.

    Installs :func:`install_lora_matmul` first. qwix runs the model forward once, eagerly,
    on its ``get_model_input()``; the returned model shares the base model's weight
    arrays (qwix copies the module graph, not the arrays).

    Args:
      base_model: a Tunix NNX model (anything with ``get_model_input()``).
      rank, alpha: the adapters' rank r and scaling numerator (update ``(alpha / r) * B @ A``).
      target_modules: regular expression over module paths (``layers/0/mlp/up_proj``).
      seed: initialisation seed for the A matrices (B starts at zero).

    Raises:
      RuntimeError: the installed Tunix or qwix is not the version the products were
        written for (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    install_lora_matmul()
    provider = qwix.LoraProvider(module_path=target_modules, rank=rank, alpha=alpha)
    inputs = base_model.get_model_input()
    return qwix.apply_lora_to_model(base_model, provider, rngs=nnx.Rngs(seed), **inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_matmul(x, a, b, precision=None):
    """The low-rank product ``(x @ a) @ b``: ``x [M, K]``, ``a [K, r]``, ``b [r, N]`` -> ``[M, N]``.

    The same numbers as differentiating the two products directly. The backward pass is
    written so that every large operand (``x`` and the incoming gradient, ``[M, K]`` and
    ``[M, N]`` with M = batch x sequence) enters its product unchanged, and only the
    rank-r factors are transposed. Left to autodiff, XLA's CPU backend transposes those
    large arrays for the gradients of A and B, inside the elementwise fusions that
    produce them: in the 270M model's GRPO update that was 1.8 s of a 10.5 s step.
    """
    return _lora_forward(x, a, b, precision)[0]


def _lora_forward(x, a, b, precision):
    xa = jax.lax.dot_general(x, a, (((1,), (0,)), ((), ())), precision=precision)  # [M, r]
    out = jax.lax.dot_general(xa, b, (((1,), (0,)), ((), ())), precision=precision)
    return out, (x, a, b, xa)


def _lora_backward(precision, saved, g):
    x, a, b, xa = saved
    dot = functools.partial(jax.numpy.matmul, precision=precision)
    g_b = dot(g, b.T)                   # [M, r]
    grad_b = dot(xa.T, g)               # [r, N]: g enters as [K, N], as it is laid out
    grad_a = dot(g_b.T, x).T            # [K, r]: the same for x
    grad_x = dot(g_b, a.T)              # [M, K]
    return grad_x.astype(x.dtype), grad_a.astype(a.dtype), grad_b.astype(b.dtype)


lora_matmul.defvjp(_lora_forward, _lora_backward)


def _lora_delta(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape,
                remain_shape, rank, precision=None, *, original):
    """qwix's LoRA delta for a ``dot_general`` projection, through :func:`lora_matmul`.

    Handles the projections of ``nnx.Linear`` (no batch dimensions, contracting the
    trailing dimensions of ``lhs``); anything else goes to qwix's own ``original``.
    """
    n_contract = len(contract_shape)
    trailing = tuple(range(lhs.ndim - n_contract, lhs.ndim))
    if batch_shape or tuple(lhs_ba) or tuple(lhs_ca) != trailing:
        return original(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape,
                        remain_shape, rank, precision=precision)
    k, n = math.prod(contract_shape), math.prod(remain_shape)
    out = lora_matmul(lhs.reshape(-1, k), lora_a.reshape(k, rank), lora_b.reshape(rank, n),
                      precision)
    return out.reshape(*lhs.shape[:lhs.ndim - n_contract], *remain_shape)


def install_lora_matmul() -> bool:
    """Routes qwix's ``dot_general`` LoRA delta through :func:`lora_matmul` (once).

    Returns:
      Whether it is installed; False (and a log line) when this qwix version has no
      ``_compute_lora_delta`` to route, in which case qwix's own delta runs unchanged.

    Raises:
      RuntimeError: the installed Tunix or qwix is not the version the routing was
        written for (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    check_versions()  # replaces qwix 0.1.8's private _compute_lora_delta
    current = getattr(qwix_lora, "_compute_lora_delta", None)
    if current is None:
        logging.getLogger(__name__).info(
            "qwix has no _compute_lora_delta; LoRA gradients use its own products")
        return False
    if getattr(current, "_jaxpost_original", None) is None:
        routed = functools.partial(_lora_delta, original=current)
        routed._jaxpost_original = current
        qwix_lora._compute_lora_delta = routed
    return True
