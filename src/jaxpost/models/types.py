"""What every model loader returns, and the pieces all of them share.

:class:`LoadedModel` is the value of :func:`jaxpost.models.loading.load_model` and of each
family's loader (:mod:`jaxpost.models.families`, :mod:`jaxpost.models.hub`);
:func:`load_sentencepiece` and :func:`eos_ids` build its tokenizer and end-of-turn ids
the same way for every source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxpost.tunix_ext.sampler import tokenizer_adapter


@dataclasses.dataclass
class LoadedModel:
    """A model ready for sampling and training.

    Attributes:
      model: the Flax NNX module (Tunix architecture), sharded on ``mesh``.
      tokenizer: a Tunix ``TokenizerAdapter`` (``encode``/``decode``/``bos_id``/...).
      model_config: the Tunix ``ModelConfig`` the module was built from.
      mesh: the device mesh the parameters live on.
      family: architecture family, e.g. ``"gemma3"``, ``"qwen2"``, ``"llama3"``.
      source: the source string it was loaded from.
      path: the local directory holding its files (None for random models).
      eos_ids: token ids that end a turn (end of sequence and end-of-turn markers).
    """

    model: Any  # flax.nnx.Module
    tokenizer: Any
    model_config: Any
    mesh: Any  # jax.sharding.Mesh
    family: str
    source: str
    path: Path | None
    eos_ids: tuple[int, ...]


def load_sentencepiece(path: Path):
    """A Tunix ``TokenizerAdapter`` around a SentencePiece model that adds BOS.

    Built from ``SentencePieceProcessor`` directly: Tunix's own ``Tokenizer`` class calls
    ``SetEncodeExtraOptions``, which sentencepiece 0.2.3 rejects.
    """
    # only for a SentencePiece tokenizer
    import sentencepiece as spm

    return tokenizer_adapter(spm.SentencePieceProcessor(model_file=str(path), add_bos=True))


def eos_ids(tokenizer, *configs: dict) -> tuple[int, ...]:
    """Token ids that end a turn: the tokenizer's EOS, then each config's ``eos_token_id``.

    ``configs`` are ``config.json`` and ``generation_config.json`` dicts; an id may be an
    int or a list (Llama 3 Instruct lists end-of-text, end-of-message and end-of-turn).
    """
    ids: list[int] = []
    for value in [tokenizer.eos_id(), *(c.get("eos_token_id") for c in configs)]:
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("no end-of-sequence token: the tokenizer has no EOS and config.json "
                         "has no eos_token_id")
    return tuple(ids)
