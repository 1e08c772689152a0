"""Per-token log-probabilities of completions, a chunk of the vocabulary product at a time.

:func:`completion_logps` unembeds a Gemma 3 model's final hidden states
(:class:`jaxpost.tunix_ext.gemma3.Gemma3TrimmedLogits`) ``chunk_rows`` completion
positions at a time, with the gradient with respect to the hidden states formed in the
same pass (a custom VJP): at most one ``[vocab, chunk_rows]`` block of logits exists,
and training does two vocabulary-sized products per chunk instead of three. Rows that
repeat a prompt (GRPO's G completions, :func:`prompt_group_size`) compute it once.
jaxpost's GRPO, PPO, DPO and SFT losses and its reference pass use it in place of
Tunix's full ``[batch, completion, vocab]`` logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.sft import utils as sft_utils

from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits


def _chunk_forward(embedding, hidden, targets, temperature):
    """Log-probabilities of ``targets`` under one chunk of logits, vocabulary first.

    Logits are computed as ``embedding @ hidden.T`` (``[vocab, chunk]``) rather than
    ``hidden @ embedding.T``: both are the same numbers, but XLA's CPU backend copies the
    whole transposed embedding (671 MB for Gemma 3 270M) for the second form, and the
    first is a plain row-major matrix product.

    Returns:
      ``(logps [chunk], entropy [chunk], probs [vocab, chunk])``, float32.
    """
    if temperature not in (0.0, 1.0):
        # The [chunk, embed] states rather than the [vocab, chunk] logits: the same
        # logits up to rounding, for 640 divisions per position instead of 262,144.
        hidden = hidden / temperature
    logits = jnp.dot(embedding, hidden.T).astype(jnp.float32)  # [vocab, chunk]
    lse = jax.nn.logsumexp(logits, axis=0)  # [chunk]
    target = jnp.take_along_axis(logits, targets[None, :], axis=0)[0]
    probs = jnp.exp(logits - lse[None, :])
    entropy = lse - jnp.sum(probs * logits, axis=0)
    return target - lse, entropy, probs


def expected_embedding(probs, embedding):
    """``probs.T @ embedding``: each position's expected embedding under its probabilities.

    ``probs [vocab, chunk]``, ``embedding [vocab, embed]`` -> ``[chunk, embed]``, float32.
    The product contracts over the vocabulary into a small output, and XLA's CPU backend
    runs it as one Eigen contraction (about 80 GFLOP/s on the 2-core reference machine,
    against about 110 for the logits product). On CPU the vocabulary is cut into two
    halves that form a batch dimension of the product, and the two results are added:
    XLA folds the transposition into the product and runs a batched contraction over the
    halves, 266-312 -> 208-226 ms for 64 positions of Gemma 3's 262,144-entry
    vocabulary, the exponential that produces the probabilities included. Other
    backends get the plain product.
    """
    vocab, dim = embedding.shape
    if jax.default_backend() != "cpu" or vocab % 2:
        return jnp.einsum("vc,vd->cd", probs, embedding, preferred_element_type=jnp.float32)
    chunk = probs.shape[1]
    halves = probs.reshape(2, vocab // 2, chunk).transpose(0, 2, 1)  # [2, chunk, V/2]
    parts = jax.lax.dot_general(halves, embedding.reshape(2, vocab // 2, dim),
                                (((2,), (1,)), ((0,), (0,))),
                                preferred_element_type=jnp.float32)  # [2, chunk, embed]
    return parts[0] + parts[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_logps(embedding, hidden, targets, temperature):
    logps, entropy, _ = _chunk_forward(embedding, hidden, targets, temperature)
    return logps, entropy


def _chunk_logps_fwd(embedding, hidden, targets, temperature):
    # d logp_i / d h_i = (E[t_i] - sum_v p_iv E_v) / T: computed here, while the
    # probabilities are at hand, so the backward pass needs neither the logits again
    # (jax.checkpoint would recompute them: a third [vocab, chunk] matrix product) nor
    # memory for them.
    logps, entropy, probs = _chunk_forward(embedding, hidden, targets, temperature)
    expected = expected_embedding(probs.astype(embedding.dtype), embedding)  # [chunk, embed]
    grad_hidden = (embedding[targets].astype(jnp.float32) - expected)
    if temperature not in (0.0, 1.0):
        grad_hidden = grad_hidden / temperature
    # Kept in the hidden states' dtype: their cotangent must have it (bfloat16 models).
    return (logps, entropy), grad_hidden.astype(hidden.dtype)


def _chunk_logps_bwd(temperature, grad_hidden, cotangents):
    g_logps, _ = cotangents  # entropy is reported without a gradient
    # The embedding is frozen under LoRA (``completion_logps`` checks it), so it gets no
    # cotangent; targets are integers. The cotangent of the hidden states has their dtype.
    return None, (g_logps[:, None] * grad_hidden).astype(grad_hidden.dtype), None


_chunk_logps.defvjp(_chunk_logps_fwd, _chunk_logps_bwd)


# Completion positions per chunk of completion_logps, by JAX backend. A chunk's logits
# product reads the whole embedding table (2 bytes per element in bfloat16) and does
# 2 x chunk FLOPs per element: chunk FLOPs per byte read. A TPU v5e does about 240
# bfloat16 FLOPs per byte of memory bandwidth (197 TFLOP/s over 819 GB/s), an A100 about
# 150 and an H100 about 300, so chunks of 64 leave them waiting on memory, and 256 rows
# (a multiple of the TPU's 128-wide tiles) do not. (A T4 has no bfloat16 tensor cores;
# there the size changes nothing but memory.) 256 rows cost 2 x 256 MiB of float32
# logits and probabilities for a 262,144-entry vocabulary, which jaxpost.plan counts.
# Chosen from these ratios, not timed on a TPU or GPU. On a CPU, chunks of 128 or 256
# were no faster than 64 (docs/performance.md).
def positions_and_attention(mask):
    """The positions and causal attention mask a Tunix model takes for a batch.

    Args:
      mask: ``[batch, seq]``, True at tokens and False at padding.

    Returns:
      ``(positions [batch, seq], attention mask [batch, seq, seq])``, as Tunix's
      ``tunix.sft.utils`` builds them.
    """
    return sft_utils.build_positions_from_mask(mask), sft_utils.make_causal_attn_mask(mask)


LOGPS_CHUNK_ROWS = {"cpu": 64, "gpu": 256, "tpu": 256}


def logps_chunk_rows(backend: str | None = None) -> int:
    """Rows per chunk of :func:`completion_logps` on ``backend`` (default JAX's):
    :data:`LOGPS_CHUNK_ROWS`, 64 for a backend it does not name."""
    return LOGPS_CHUNK_ROWS.get(backend or jax.default_backend(), 64)


def completion_logps(model: Gemma3TrimmedLogits, prompt_ids, completion_ids, pad_id: int,
                     temperature: float = 1.0, chunk_rows: int | None = None,
                     prompt_group: int = 1, layer_inputs=None):
    """Per-token log-probabilities of the completion, never holding all logits at once.

    The unembedding and log-softmax run over ``chunk_rows`` completion positions at a
    time (default :func:`logps_chunk_rows` for the backend), so at most one
    ``[vocab, chunk_rows]`` block of logits exists. The gradient
    with respect to the hidden states is formed in the same pass (a custom VJP), so
    training does two vocabulary-sized matrix products per chunk instead of three, and
    the backward pass stores only ``[chunk_rows, embed]`` per chunk. The tied
    embedding receives no gradient: it must be frozen, as it is under LoRA.

    Args:
      prompt_ids: ``[batch, prompt_len]`` (left-padded with ``pad_id``).
      completion_ids: ``[batch, completion_len]`` (right-padded with ``pad_id``).
      temperature: the sampling temperature the logits are divided by (as Tunix does).
      prompt_group: rows come in runs of this many with the same prompt (a static
        value; :func:`prompt_group_size` finds it from the prompt ids). Each prompt's
        positions are then computed once (see :func:`_packed_hidden`): the same numbers,
        up to float rounding, for fewer positions.
      layer_inputs: every layer's input for these rows as the rollout computed it
        (:func:`jaxpost.tunix_ext.sampler.rollout_layer_inputs`), or None. Given, the
        layers are not run forward, only recomputed in the backward pass: the same
        values and gradients, up to float rounding, for one pass through the layers
        fewer.

    Returns:
      ``(logps, entropy)``, both ``[batch, completion_len]`` float32; entropy is the
      policy's per-position entropy, with no gradient.

    Raises:
      ValueError: when the embedding carries LoRA adapters (its gradient is not formed).
    """
    embedder_lora = nnx.state(model.embedder, nnx.LoRAParam)
    if jax.tree_util.tree_leaves(embedder_lora):
        raise ValueError("completion_logps assumes a frozen embedding, but the embedder "
                         "has LoRA adapters; leave 'embedder' out of lora_target_modules")
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)  # [batch, seq]
    mask = ids != pad_id
    positions = sft_utils.build_positions_from_mask(mask)
    batch, comp = completion_ids.shape
    group = _packing_group(model, prompt_ids.shape[1], comp, prompt_group)
    if group > 1:
        hidden = _packed_hidden(model, ids, mask, positions, comp, group, layer_inputs)
    else:
        attn = sft_utils.make_causal_attn_mask(mask)
        outputs = None if layer_inputs is None else layer_inputs[1:]
        hidden, _ = model(ids, positions, None, attn, hidden_keep=comp + 1,
                          layer_outputs=outputs)
        hidden = hidden[:, :-1]  # [batch, comp, embed]: the states that predict each token
    rows = batch * comp
    chunk_rows = chunk_rows or logps_chunk_rows()
    n_chunks = -(-rows // chunk_rows)
    pad_rows = n_chunks * chunk_rows - rows
    flat_h = jnp.pad(hidden.reshape(rows, -1), ((0, pad_rows), (0, 0)))
    flat_t = jnp.pad(completion_ids.reshape(rows), (0, pad_rows))
    embedding = model.embedder.input_embedding.value  # [vocab, embed]

    logps, entropy = jax.lax.map(
        lambda args: _chunk_logps(embedding, args[0], args[1], float(temperature)),
        (flat_h.reshape(n_chunks, chunk_rows, -1), flat_t.reshape(n_chunks, -1)))
    logps = logps.reshape(-1)[:rows].reshape(batch, comp)
    entropy = jax.lax.stop_gradient(entropy.reshape(-1)[:rows].reshape(batch, comp))
    return logps, entropy


def prompt_group_size(prompt_ids) -> int:
    """How many consecutive rows of ``prompt_ids`` hold each prompt; 1 if they do not repeat.

    GRPO batches repeat every prompt G times in a row. The answer is the largest ``g``
    dividing the batch such that each block of ``g`` consecutive rows is one prompt, so
    a prompt drawn twice in a batch does not hide the grouping of the others.

    Args:
      prompt_ids: ``[batch, prompt_len]`` token ids (a NumPy or JAX array, not a tracer).
    """
    ids = np.asarray(prompt_ids)
    batch = ids.shape[0]
    for group in range(batch, 1, -1):
        if batch % group == 0:
            blocks = ids.reshape(batch // group, group, -1)
            if np.all(blocks == blocks[:, :1]):
                return group
    return 1


def _packing_group(model, prompt_len: int, completion_len: int, group: int) -> int:
    """How many completions :func:`_packed_hidden` puts in a row with their prompt.

    Tunix's attention bands its sliding window by the distance between indices in the
    row, which equals the distance between positions only in an ordinary row. A packed
    row is used only while it fits in the window, where the band excludes nothing; a
    large group is split into the largest divisor of it that fits.
    """
    window = model.config.sliding_window_size
    for size in range(group, 1, -1):
        if group % size == 0 and (window is None or prompt_len + size * completion_len <= window):
            return size
    return 1


def _packed_hidden(model, ids, mask, positions, completion_len: int, group: int,
                   layer_inputs=None):
    """Final hidden states that predict each completion token, computing each prompt once.

    Rows ``[prompt | completion]`` that repeat each prompt ``group`` times in a row are
    packed as ``[prompt | completion 1 | ... | completion group]``; each completion
    attends to the prompt's positions and to its own earlier positions, and keeps its
    RoPE positions. Under that mask a prompt's activations are the same for all of its
    completions, and for 2 prompts x 4 completions x (64 + 64) tokens the layers process
    640 positions instead of 1024.

    Returns:
      ``[batch, completion_len, embed]``: the last prompt position's state, then the
      completion's own, for all but its last token.
    """
    batch, seq_len = ids.shape
    prompt = seq_len - completion_len
    rows = batch // group

    def pack(a):  # [batch, seq, ...] -> [rows, prompt + group * completion, ...]
        completions = a[:, prompt:].reshape(rows, group * completion_len, *a.shape[2:])
        return jnp.concatenate([a[::group, :prompt], completions], axis=1)

    # Segment 0 is the prompt, segment j the j-th completion.
    segment = jnp.concatenate([jnp.zeros(prompt, jnp.int32),
                               jnp.repeat(jnp.arange(1, group + 1), completion_len)])
    index = jnp.arange(segment.shape[0])
    visible = (index[None, :] <= index[:, None]) & (
        (segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    attn = pack(mask)[:, None, :] & visible[None]
    outputs = None if layer_inputs is None else jax.vmap(pack)(layer_inputs[1:])
    hidden, _ = model(pack(ids), pack(positions), None, attn, hidden_keep=index.shape[0],
                      layer_outputs=outputs)
    last_prompt = jnp.repeat(hidden[:, prompt - 1:prompt], group, axis=0)
    completions = hidden[:, prompt:].reshape(batch, completion_len, -1)
    return jnp.concatenate([last_prompt, completions[:, :-1]], axis=1)


def chunked_logps_fn(graphdef):
    """A ``(state, prompt, completion, pad_id, temperature) -> logps`` for the model
    ``graphdef``, jitted, computing each distinct prompt once (see
    :func:`prompt_group_size`)."""
    @functools.partial(jax.jit, static_argnames=("pad_id", "temperature", "prompt_group"))
    def jitted(state, prompt_tokens, completion_tokens, pad_id, temperature, prompt_group):
        model = nnx.merge(graphdef, state)
        logps, _ = completion_logps(model, prompt_tokens, completion_tokens, pad_id,
                                    temperature=temperature, prompt_group=prompt_group)
        return jax.lax.stop_gradient(logps)

    def logps_fn(state, prompt_tokens, completion_tokens, pad_id, temperature):
        return jitted(state, prompt_tokens, completion_tokens, pad_id=pad_id,
                      temperature=temperature, prompt_group=prompt_group_size(prompt_tokens))

    return logps_fn
