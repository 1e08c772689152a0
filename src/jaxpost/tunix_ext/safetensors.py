"""Hugging Face Gemma 3 tensors under the names and layouts of Tunix's Gemma 3.

:func:`gemma3_weights` maps each tensor as it is read, with Tunix's own name mapping and
q/k/v fusion, so that a loader can place one tensor at a time on the device
(:func:`jaxpost.models.loading.load_gemma3_safetensors`). Both are private to Tunix
0.1.7's ``tunix.models.gemma3.params_safetensors``: ``_get_key_and_transform_mapping``
and ``_make_preprocess_fn`` (docs/tunix_patches.md).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from tunix.models.gemma3 import params_safetensors
from tunix.utils import torch_utils

from jaxpost.tunix_ext.versions import check_versions


def gemma3_weights(cfg: Any, tensors: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Tunix Gemma 3 weights from Hugging Face tensors, one at a time.

    Args:
      cfg: the Tunix Gemma 3 ``ModelConfig`` the weights are for.
      tensors: ``(Hugging Face name, numpy array)`` pairs, every file of a checkpoint in
        one iterable: a layer's q, k and v may lie in different files.

    Yields:
      ``(key, array)``: the dotted path of the weight in the model's state
      (``layers.0.attn.q_einsum.w``) and the tensor in Tunix's layout. Tensors the model
      does not use (a multimodal checkpoint's vision weights) are skipped; a layer's
      q, k and v come out fused once all three are read.
    """
    check_versions()  # the two private functions below are Tunix 0.1.7's
    key_map = params_safetensors._get_key_and_transform_mapping(cfg)
    fuse_qkv = params_safetensors._make_preprocess_fn(cfg)
    for name, array in tensors:
        try:
            key, transform = torch_utils.torch_key_to_jax_key(key_map, name)
        except ValueError:
            continue  # e.g. vision weights of a multimodal checkpoint
        if key.startswith("unused."):
            continue
        if transform is not None:
            permute, reshape = transform
            array = array.transpose(permute) if permute else array
            array = array.reshape(reshape) if reshape else array
        if key.startswith("tmp."):  # q, k and v: fused once a layer's are all read
            yield from fuse_qkv({key: array}).items()
        else:
            yield key, array
        del array  # before the next tensor is read: one tensor in flight
