"""The names of :mod:`jaxpost.tunix_ext` that this module used to hold, kept for one release.

jaxpost's extensions of Tunix's Gemma 3 and sampler now live in a module per concern:

* :mod:`jaxpost.tunix_ext.gemma3`: :class:`Gemma3TrimmedLogits` (logits only where
  they are used), :func:`enable`, :func:`completion_logits_only`,
  :func:`recomputed_layer`, :func:`unembed_last_position`;
* :mod:`jaxpost.tunix_ext.logps`: :func:`completion_logps` (chunked log-probs with their
  gradient), :func:`prompt_group_size`, :data:`LOGPS_CHUNK_ROWS`;
* :mod:`jaxpost.tunix_ext.decoding` and :mod:`jaxpost.tunix_ext.decoding_layers`: the
  CPU decoding loop with weights laid out in advance, and the layers it runs;
* :mod:`jaxpost.tunix_ext.sampler`: the sampler hooks (:func:`speed_up_sampler`,
  :func:`keep_layer_inputs`, :func:`rollout_layer_inputs`).

Import them from there; this module re-exports them unchanged.
"""

from jaxpost.tunix_ext.decoding import (DECODE_WEIGHT_LAYOUTS, blocked_top_k,
                                        lay_out_decode_weights, sample_top_p)
from jaxpost.tunix_ext.decoding_layers import DecodingAttention, DecodingFeedForward
from jaxpost.tunix_ext.gemma3 import (Gemma3TrimmedLogits, completion_logits_only, enable,
                                      recomputed_layer, unembed_last_position)
from jaxpost.tunix_ext.logps import (LOGPS_CHUNK_ROWS, completion_logps, expected_embedding,
                                     logps_chunk_rows, prompt_group_size)
from jaxpost.tunix_ext.sampler import (keep_layer_inputs, merge_transformer_once,
                                       rollout_layer_inputs, share_prompt_prefill,
                                       speed_up_sampler)

__all__ = [
    "DECODE_WEIGHT_LAYOUTS", "DecodingAttention", "DecodingFeedForward",
    "Gemma3TrimmedLogits", "LOGPS_CHUNK_ROWS", "blocked_top_k", "completion_logits_only",
    "completion_logps", "enable", "expected_embedding", "keep_layer_inputs",
    "lay_out_decode_weights", "logps_chunk_rows", "merge_transformer_once",
    "prompt_group_size", "recomputed_layer", "rollout_layer_inputs", "sample_top_p",
    "share_prompt_prefill", "speed_up_sampler", "unembed_last_position",
]
