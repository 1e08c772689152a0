"""A model's shapes, read without loading its weights, and the bytes its tensors take per
device: the arithmetic under :mod:`jaxpost.plan`.

Weights and LoRA adapters are laid out as Tunix's Gemma 3 sharding rules say (rows over
``fsdp``, features and heads over ``tp``); the activation and log-prob terms are those
fitted to XLA's compiled steps (see :mod:`jaxpost.plan`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from jaxpost.models.hub import hf_cache_dir, parse_kaggle_handle
from jaxpost.models.loading import tiny_gemma3_config
from jaxpost.tunix_ext.architectures import gemma3


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The numbers a memory plan needs from a model's architecture.

    ``family`` is jaxpost's name (``"gemma3"``, ``"gemma2"``, ``"qwen2"``, ...); only
    ``"gemma3"`` has jaxpost's chunked log-probs and layer remat.
    """

    family: str
    num_layers: int
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    tied_embedding: bool = True

    @classmethod
    def from_tunix(cls, cfg, family: str = "gemma3") -> "ModelShapes":
        """From a Tunix ``ModelConfig`` (Gemma, Gemma 2 or Gemma 3)."""
        return cls(family=family, num_layers=cfg.num_layers, vocab_size=cfg.num_embed,
                   embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   sliding_window=getattr(cfg, "sliding_window_size", None))

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelShapes":
        """From a Hugging Face ``config.json`` dict (a multimodal one's ``text_config``)."""
        model_type = str(hf.get("model_type", ""))
        text = hf.get("text_config", hf)
        heads = int(text["num_attention_heads"])
        family = {"gemma3_text": "gemma3", "llama": "llama3"}.get(model_type, model_type)
        return cls(family=family, num_layers=int(text["num_hidden_layers"]),
                   vocab_size=int(text["vocab_size"]), embed_dim=int(text["hidden_size"]),
                   hidden_dim=int(text["intermediate_size"]), num_heads=heads,
                   num_kv_heads=int(text.get("num_key_value_heads", heads)),
                   head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
                   sliding_window=text.get("sliding_window"),
                   tied_embedding=bool(hf.get("tie_word_embeddings", True)))


def model_shapes(source: str) -> ModelShapes:
    """The architecture of the model ``source`` names, without loading its weights.

    Raises:
      ValueError: a source whose architecture cannot be read without downloading the
        model (a Kaggle ``transformers`` handle, a GGUF file, a Hugging Face repository
        that is not cached and cannot be reached).
      FileNotFoundError: a local directory without ``config.json``.
    """
    prefix, sep, rest = source.partition(":")
    if sep and prefix == "embedded":
        return ModelShapes.from_tunix(gemma3.ModelConfig.gemma3_270m())
    if sep and prefix == "random":
        # Its vocabulary is the embedded tokenizer's, Gemma 3's.
        vocab = gemma3.ModelConfig.gemma3_270m().num_embed
        return ModelShapes.from_tunix(tiny_gemma3_config(vocab, None))
    if sep and prefix == "kaggle":
        km = parse_kaggle_handle(rest)
        if km.family is None:
            raise ValueError(f"{source}: a Kaggle transformers handle's architecture is in the "
                             "download; plan its local directory instead")
        return ModelShapes.from_tunix(km.model_config(), km.family)
    if sep and prefix == "hf":
        return ModelShapes.from_hf_config(json.loads(_hf_config_file(rest).read_text()))
    if sep and prefix == "gguf":
        raise ValueError(f"{source}: plan the directory jaxpost converts a GGUF file into "
                         "(its config.json) instead")
    config_file = Path(source).expanduser() / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: a local model directory needs "
                                "config.json")
    return ModelShapes.from_hf_config(json.loads(config_file.read_text()))


def _hf_config_file(repo_id: str) -> Path:
    """A Hugging Face repository's ``config.json`` alone (the cached copy when offline)."""
    # the hub clients load only when something is downloaded
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename="config.json",
                                    cache_dir=str(hf_cache_dir())))
    except (EntryNotFoundError, OSError) as e:  # the Hub's errors, a missing cache entry
        raise ValueError(f"hf:{repo_id}: cannot read its config.json "
                         f"({type(e).__name__}: {e})") from None


def weight_specs(s: ModelShapes) -> list[tuple[str, tuple[int, ...], tuple]]:
    """``(path, shape, sharding)`` of every base weight, as Tunix's Gemma 3 lays them out.

    The sharding names a mesh axis (``"fsdp"``, ``"tp"``) or None for each dimension
    (Tunix's ``ShardingConfig.get_default_sharding()``; a single key-value head is not
    split over ``tp``, as in Tunix's ``Attention``).
    """
    d, f, n, k, h = s.embed_dim, s.hidden_dim, s.num_heads, s.num_kv_heads, s.head_dim
    specs = [("embedder/input_embedding", (s.vocab_size, d), ("tp", "fsdp")),
             ("final_norm/scale", (d,), ("tp",))]
    if not s.tied_embedding:
        specs.append(("lm_head", (s.vocab_size, d), ("tp", "fsdp")))
    for i in range(s.num_layers):
        attn = f"layers/{i}/attn"
        if n == k:
            specs.append((f"{attn}/qkv_einsum/w", (3, n, d, h), (None, "tp", "fsdp", None)))
        else:
            specs.append((f"{attn}/q_einsum/w", (n, d, h), ("tp", "fsdp", None)))
            specs.append((f"{attn}/kv_einsum/w", (2, k, d, h),
                          (None, None if k == 1 else "tp", "fsdp", None)))
        specs += [(f"{attn}/attn_vec_einsum/w", (n, h, d), ("tp", None, "fsdp")),
                  (f"{attn}/_query_norm/scale", (h,), (None,)),
                  (f"{attn}/_key_norm/scale", (h,), (None,)),
                  (f"layers/{i}/mlp/gate_proj/kernel", (d, f), ("fsdp", "tp")),
                  (f"layers/{i}/mlp/up_proj/kernel", (d, f), ("fsdp", "tp")),
                  (f"layers/{i}/mlp/down_proj/kernel", (f, d), ("tp", "fsdp"))]
        specs += [(f"layers/{i}/{norm}/scale", (d,), ("tp",)) for norm in (
            "pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")]
    return specs


# Einsum of each projection (Tunix's Gemma 3), for qwix's LoRA shapes: A takes the
# weight's dimensions the input shares, B the others.
_EINSUMS = {"q_einsum": "BTD,NDH->BTNH", "kv_einsum": "BSD,CKDH->CBSKH",
            "qkv_einsum": "BTD,SNDH->SBTNH", "attn_vec_einsum": "BTNH,NHD->BTD"}


def lora_specs(s: ModelShapes, rank: int, target_modules: str):
    """``(path, shape, sharding)`` of each LoRA matrix qwix adds for ``target_modules``.

    qwix matches the regex against module paths (``layers/0/attn/q_einsum``) with
    ``re.fullmatch``. An einsum weight ``w`` gets ``A`` over the dimensions its input
    shares (then r) and ``B`` over r then the others; a linear kernel ``[in, out]`` gets
    ``A [in, r]`` and ``B [r, out]``; each dimension keeps the weight's sharding.
    """
    out = []
    for path, shape, spec in weight_specs(s):
        module, _, leaf = path.rpartition("/")
        name = module.rsplit("/", 1)[-1]
        if leaf not in ("w", "kernel") or not re.fullmatch(target_modules, module):
            continue
        if leaf == "kernel":
            shared = [True] + [False] * (len(shape) - 1)
        else:
            lhs, rhs = _EINSUMS[name].split("->")[0].split(",")
            shared = [c in lhs for c in rhs]
        a = [(dim, ax) for dim, ax, sh in zip(shape, spec, shared) if sh]
        b = [(dim, ax) for dim, ax, sh in zip(shape, spec, shared) if not sh]
        out.append((f"{module}/{leaf}_lora_a", tuple(x for x, _ in a) + (rank,),
                    tuple(x for _, x in a) + (None,)))
        out.append((f"{module}/{leaf}_lora_b", (rank,) + tuple(x for x, _ in b),
                    (None,) + tuple(x for _, x in b)))
    return out


def shard_bytes(shape, spec, mesh: dict[str, int], itemsize: int) -> int:
    """Bytes one device holds of an array: each dimension split over its mesh axis,
    rounded up (a dimension smaller than the axis is held whole)."""
    return itemsize * math.prod(-(-dim // mesh.get(ax, 1)) if ax else dim
                                for dim, ax in zip(shape, spec))


def layer_activation_bytes(rows: int, seq: int, s: ModelShapes, itemsize: int) -> int:
    """Bytes of one layer's activations that its backward pass reads, for ``rows`` x ``seq``.

    Fitted to XLA's compiled memory on CPU (see the module docstring): about nine
    ``[rows, seq, embed]`` and nine ``[rows, seq, hidden]`` tensors, two of the queries'
    size and three ``[rows, heads, seq, seq]`` attention scores, these in float32 (the
    softmax computes in float32 whatever the model's dtype).
    """
    r, t = rows, seq
    return ((9 * r * t * s.embed_dim + 9 * r * t * s.hidden_dim
             + 2 * r * t * s.num_heads * s.head_dim) * itemsize
            + 3 * r * s.num_heads * t * t * 4)


def update_activation_bytes(rows: int, seq: int, s: ModelShapes, itemsize: int,
                            remat: bool) -> int:
    """Activations of a training step's backward pass through all layers.

    With remat each layer keeps its input (and the gradient flowing into it) and one
    layer at a time is recomputed with its gradients (1.25 layers' activations);
    without it every layer keeps its activations, plus a quarter layer for the gradients.
    """
    layer = layer_activation_bytes(rows, seq, s, itemsize)
    if remat:
        return s.num_layers * 2 * rows * seq * s.embed_dim * itemsize + layer * 5 // 4
    return s.num_layers * layer + layer // 4


def packed_rows(s: ModelShapes, rows: int, prompt: int, completion: int,
                group: int) -> tuple[int, int]:
    """``(rows, seq)`` the layers process when G rows share a prompt (packed rows).

    :func:`jaxpost.tunix_ext.logps._packing_group`'s rule: the largest divisor of ``group``
    whose packed row ``prompt + size * completion`` fits in the sliding window.
    """
    for size in range(group, 1, -1):
        if group % size == 0 and rows % size == 0 and (
                s.sliding_window is None or prompt + size * completion <= s.sliding_window):
            return rows // size, prompt + size * completion
    return rows, prompt + completion


def logps_bytes(rows: int, completion: int, s: ModelShapes, itemsize: int, chunk_rows: int,
                tp: int, kind: str, prompt: int = 0) -> int:
    """The log-probabilities of ``rows`` completions of ``completion`` tokens, with gradients.

    Gemma 3 (chunked, :func:`jaxpost.tunix_ext.logps.completion_logps`): one chunk's
    ``[vocab, chunk_rows]`` logits and probabilities in float32 (the vocabulary split over
    ``tp``), and the final hidden states with each position's hidden-state gradient; on a
    CPU a bfloat16 model's embedding is also copied to float32 for the products (twice).
    Other families (Tunix's loss): the logits of all ``prompt + completion`` positions in
    the model's dtype, and the completion's log-softmax and its gradient in float32.
    """
    v = s.vocab_size
    if s.family != "gemma3":
        return rows * v * ((prompt + completion) * itemsize + completion * 2 * 4)
    total = 2 * -(-v // tp) * chunk_rows * 4 + 2 * rows * completion * s.embed_dim * itemsize
    if kind == "cpu" and itemsize < 4:
        total += 2 * v * s.embed_dim * 4
    return total


def kv_cache_bytes(s: ModelShapes, rows: int, tokens: int, itemsize: int) -> int:
    """Tunix's sampler cache: keys and values ``[rows, tokens, kv heads, head dim]`` per layer."""
    return s.num_layers * 2 * rows * tokens * s.num_kv_heads * s.head_dim * itemsize
