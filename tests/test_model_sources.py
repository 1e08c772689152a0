"""Model sources: local Hugging Face directories of each family, the hf: and kaggle: paths.

Every checkpoint here is written by the test itself: tiny random weights under the exact
Hugging Face tensor names, a config.json and a tokenizer built with ``tokenizers``. The
loaded Tunix model is checked three ways: its config fields against config.json, a few
parameters against the safetensors tensors (after the known transposes), and its logits
against a NumPy re-implementation of the Hugging Face forward pass. Nothing touches the
network or the embedded 270M model.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxpost import fast_logits

from jaxpost.models import hub

from jaxpost.models import families as model_families

from jaxpost.models import loading as models
from jaxpost.runtime.mesh import make_mesh
from jaxpost.models.loading import load_model

L, D, H, K, HD, F = 2, 32, 2, 1, 16, 64  # layers, hidden, heads, kv heads, head dim, mlp
VOCAB_TOKENS, V = 300, 304  # tokenizer size; embedding rows (padded, as Qwen pads its vocab)
TEXT = "the cat sat on the mat, one plus two is three!"


# ---------------------------------------------------------------- checkpoint writers


def write_tokenizer(d: Path, *, bos: str | None = "<s>") -> None:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json), as Qwen and
    Llama 3 ship; with ``bos`` it prepends BOS the way Llama 3's post-processor does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<eot>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT, "hello world", "a dog ran"] * 10, trainers.BpeTrainer(
        vocab_size=VOCAB_TOKENS, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, specials.index(bos))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 128}))


def hf_config(kind: str) -> dict:
    """config.json for a tiny model of ``kind`` (a Hugging Face model_type)."""
    base = {"num_hidden_layers": L, "vocab_size": V, "hidden_size": D, "intermediate_size": F,
            "num_attention_heads": H, "num_key_value_heads": K, "eos_token_id": 2,
            "bos_token_id": 1, "max_position_embeddings": 128, "torch_dtype": "float32"}
    if kind == "qwen2":
        return base | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                       "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                       "tie_word_embeddings": True, "use_sliding_window": False,
                       "sliding_window": 64, "rope_scaling": None}
    if kind == "qwen3":
        return base | {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                       "head_dim": HD, "rope_theta": 5_000_000.0, "rms_norm_eps": 1e-6,
                       "hidden_act": "silu", "attention_bias": False,
                       "tie_word_embeddings": False, "use_sliding_window": False}
    if kind == "qwen3_moe":
        return hf_config("qwen3") | {
            "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
            "decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [],
            "tie_word_embeddings": True}
    if kind == "llama":
        return base | {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                       "head_dim": HD, "rope_theta": 500_000.0, "rms_norm_eps": 1e-5,
                       "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                       "tie_word_embeddings": True, "eos_token_id": [2, 4],
                       "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}}
    if kind == "gemma2":
        return base | {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                       "head_dim": HD, "query_pre_attn_scalar": HD, "rope_theta": 10_000.0,
                       "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                       "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                       "sliding_window": 4, "tie_word_embeddings": True}
    raise AssertionError(kind)


def hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the Hugging Face names and [out, in] shapes of ``cfg``."""
    rng = np.random.default_rng(seed)
    kind = cfg["model_type"]
    gemma = kind == "gemma2"

    def mat(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm():  # Gemma stores w for (1 + w); the others store w itself
        return mat(D, scale=0.1) + (0.0 if gemma else 1.0)

    t = {"model.embed_tokens.weight": mat(V, D, scale=1.0), "model.norm.weight": norm()}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": mat(H * HD, D),
              p + "self_attn.k_proj.weight": mat(K * HD, D),
              p + "self_attn.v_proj.weight": mat(K * HD, D),
              p + "self_attn.o_proj.weight": mat(D, H * HD),
              p + "input_layernorm.weight": norm(),
              p + "post_attention_layernorm.weight": norm()}
        if kind == "qwen3_moe":
            fe = cfg["moe_intermediate_size"]
            t[p + "mlp.gate.weight"] = mat(cfg["num_experts"], D, scale=1.0)
            for e in range(cfg["num_experts"]):
                t |= {p + f"mlp.experts.{e}.gate_proj.weight": mat(fe, D),
                      p + f"mlp.experts.{e}.up_proj.weight": mat(fe, D),
                      p + f"mlp.experts.{e}.down_proj.weight": mat(D, fe)}
        else:
            t |= {p + "mlp.gate_proj.weight": mat(F, D), p + "mlp.up_proj.weight": mat(F, D),
                  p + "mlp.down_proj.weight": mat(D, F)}
        if kind == "qwen2":
            t |= {p + "self_attn.q_proj.bias": mat(H * HD), p + "self_attn.k_proj.bias": mat(K * HD),
                  p + "self_attn.v_proj.bias": mat(K * HD)}
        if kind in ("qwen3", "qwen3_moe"):
            t |= {p + "self_attn.q_norm.weight": mat(HD, scale=0.1) + 1.0,
                  p + "self_attn.k_norm.weight": mat(HD, scale=0.1) + 1.0}
        if gemma:
            t |= {p + "pre_feedforward_layernorm.weight": norm(),
                  p + "post_feedforward_layernorm.weight": norm()}
    return t


def write_checkpoint(d: Path, kind: str, **overrides) -> tuple[dict, dict[str, np.ndarray]]:
    """Writes a tiny checkpoint directory; returns its config and tensors."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(kind) | overrides
    tensors = hf_tensors(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(d, bos=None if kind.startswith("qwen") else "<s>")
    return cfg, tensors


# ---------------------------------------------------------------- NumPy reference forward


def _rms(x, w, eps, plus_one=False):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * ((1.0 + w) if plus_one else w)


def _rope(x, theta):  # x: [T, heads, hd]; Hugging Face's rotate_half convention
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(x.shape[0])[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(cfg: dict, t: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """The Hugging Face forward pass of ``cfg`` in float64, for one sequence: [T, vocab]."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    kind, eps, n = cfg["model_type"], cfg["rms_norm_eps"], len(tokens)
    gemma = kind == "gemma2"
    theta = 10_000.0 if gemma else cfg["rope_theta"]
    x = t["model.embed_tokens.weight"][tokens]
    if gemma:
        x = x * np.sqrt(D)
    causal = np.tril(np.ones((n, n), bool))
    for i in range(L):
        p = f"model.layers.{i}."
        w = lambda name: t[p + name]  # noqa: E731
        h = _rms(x, w("input_layernorm.weight"), eps, gemma)
        q = h @ w("self_attn.q_proj.weight").T
        k = h @ w("self_attn.k_proj.weight").T
        v = h @ w("self_attn.v_proj.weight").T
        if kind == "qwen2":
            q, k, v = (q + w("self_attn.q_proj.bias"), k + w("self_attn.k_proj.bias"),
                       v + w("self_attn.v_proj.bias"))
        q, k, v = q.reshape(n, H, HD), k.reshape(n, K, HD), v.reshape(n, K, HD)
        if kind.startswith("qwen3"):
            q = _rms(q, w("self_attn.q_norm.weight"), eps)
            k = _rms(k, w("self_attn.k_norm.weight"), eps)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(HD)
        mask = causal
        if gemma:
            s = np.tanh(s / cfg["attn_logit_softcapping"]) * cfg["attn_logit_softcapping"]
            if i % 2 == 0:  # sliding layers: keys within the window
                mask = causal & (np.arange(n)[None, :] > np.arange(n)[:, None] - cfg["sliding_window"])
        s = np.where(mask[None], s, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", prob, v).reshape(n, H * HD) @ w("self_attn.o_proj.weight").T
        if gemma:
            o = _rms(o, w("post_attention_layernorm.weight"), eps, True)
            x = x + o
            h = _rms(x, w("pre_feedforward_layernorm.weight"), eps, True)
            m = (_gelu_tanh(h @ w("mlp.gate_proj.weight").T) * (h @ w("mlp.up_proj.weight").T)
                 ) @ w("mlp.down_proj.weight").T
            x = x + _rms(m, w("post_feedforward_layernorm.weight"), eps, True)
            continue
        x = x + o
        h = _rms(x, w("post_attention_layernorm.weight"), eps)
        silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
        if kind == "qwen3_moe":
            r = h @ w("mlp.gate.weight").T
            r = np.exp(r - r.max(-1, keepdims=True))
            r /= r.sum(-1, keepdims=True)
            m = np.zeros_like(x)
            for tok in range(n):
                top = np.argsort(-r[tok])[: cfg["num_experts_per_tok"]]
                for e in top:
                    e_out = (silu(h[tok] @ w(f"mlp.experts.{e}.gate_proj.weight").T)
                             * (h[tok] @ w(f"mlp.experts.{e}.up_proj.weight").T)
                             ) @ w(f"mlp.experts.{e}.down_proj.weight").T
                    m[tok] += r[tok, e] / r[tok, top].sum() * e_out
        else:
            m = (silu(h @ w("mlp.gate_proj.weight").T) * (h @ w("mlp.up_proj.weight").T)
                 ) @ w("mlp.down_proj.weight").T
        x = x + m
    x = _rms(x, t["model.norm.weight"], eps, gemma)
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    logits = x @ head.T
    if gemma:
        cap = cfg["final_logit_softcapping"]
        logits = np.tanh(logits / cap) * cap
    return logits


def forward(loaded, tokens: list[int]) -> np.ndarray:
    """Logits of the loaded Tunix model for one sequence: [1, T, vocab]."""
    n = len(tokens)
    ids = jnp.asarray([tokens], jnp.int32)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    mask = jnp.tril(jnp.ones((1, n, n), jnp.bool_))
    with loaded.mesh:
        logits, _ = loaded.model(ids, pos, None, mask)
    return np.asarray(logits, np.float64)


# ---------------------------------------------------------------- local directories


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


# model_type -> (family, Tunix field -> config.json key)
SIZE_FIELDS = {"num_layers": "num_hidden_layers", "embed_dim": "hidden_size",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
FAMILIES = {
    "qwen2": ("qwen2", SIZE_FIELDS | {"vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
                                      "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
                                      "use_tied_embedding": "tie_word_embeddings"}),
    "qwen3": ("qwen3", SIZE_FIELDS | {"vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
                                      "head_dim": "head_dim", "rope_theta": "rope_theta",
                                      "norm_eps": "rms_norm_eps",
                                      "use_tied_embedding": "tie_word_embeddings"}),
    "qwen3_moe": ("qwen3", SIZE_FIELDS | {"vocab_size": "vocab_size",
                                          "hidden_dim": "moe_intermediate_size",
                                          "num_experts": "num_experts",
                                          "num_experts_per_tok": "num_experts_per_tok",
                                          "use_tied_embedding": "tie_word_embeddings"}),
    "llama": ("llama3", SIZE_FIELDS | {"vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
                                       "head_dim": "head_dim", "rope_theta": "rope_theta",
                                       "norm_eps": "rms_norm_eps",
                                       "weight_tying": "tie_word_embeddings"}),
    "gemma2": ("gemma2", SIZE_FIELDS | {"num_embed": "vocab_size", "hidden_dim": "intermediate_size",
                                        "head_dim": "head_dim",
                                        "final_logit_softcap": "final_logit_softcapping",
                                        "attn_logits_soft_cap": "attn_logit_softcapping",
                                        "sliding_window_size": "sliding_window"}),
}


def _load(path: Path, mesh, kind: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(str(path), mesh=mesh)
    rope_warnings = [w for w in caught if "rope_scaling" in str(w.message)]
    # Llama 3.1/3.2's rope_scaling cannot be represented in Tunix: it must be reported.
    assert bool(rope_warnings) == (kind == "llama")
    return loaded


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_local_dir_loads_each_family(tmp_path, mesh, kind):
    cfg, t = write_checkpoint(tmp_path / kind, kind)
    loaded = _load(tmp_path / kind, mesh, kind)
    family, fields = FAMILIES[kind]
    assert loaded.family == family
    assert loaded.path == tmp_path / kind and loaded.source == str(tmp_path / kind)
    for field, key in fields.items():
        assert getattr(loaded.model_config, field) == cfg[key], field

    m, lay = loaded.model, loaded.model.layers
    np.testing.assert_array_equal(np.asarray(m.embedder.input_embedding[...]),
                                  t["model.embed_tokens.weight"])
    wq = t["model.layers.0.self_attn.q_proj.weight"].T.reshape(D, H, HD)  # [D, heads, hd]
    if kind == "gemma2":
        np.testing.assert_array_equal(np.asarray(lay[0].attn.q_einsum.w[...]), wq.transpose(1, 0, 2))
        wv = t["model.layers.0.self_attn.v_proj.weight"].T.reshape(D, K, HD).transpose(1, 0, 2)
        np.testing.assert_array_equal(np.asarray(lay[0].attn.kv_einsum.w[...])[1], wv)
    else:
        np.testing.assert_array_equal(np.asarray(lay[0].attn.q_proj.w[...]), wq)
    if kind == "qwen3_moe":
        np.testing.assert_array_equal(
            np.asarray(lay[1].mlp.down_proj[...])[3],
            t["model.layers.1.mlp.experts.3.down_proj.weight"].T)
    else:
        np.testing.assert_array_equal(np.asarray(lay[1].mlp.down_proj.kernel[...]),
                                      t["model.layers.1.mlp.down_proj.weight"].T)
    if kind == "qwen2":
        np.testing.assert_array_equal(np.asarray(lay[1].attn.k_bias[...]),
                                      t["model.layers.1.self_attn.k_proj.bias"])
    if not cfg["tie_word_embeddings"]:
        np.testing.assert_array_equal(np.asarray(m.lm_head.w[...]), t["lm_head.weight"].T)

    tokens = loaded.tokenizer.encode(TEXT)
    assert loaded.tokenizer.decode(tokens, skip_special_tokens=True) == TEXT
    # Qwen adds no BOS (bos_id() is None); the others prepend it
    assert (tokens[0] == 1) == (not kind.startswith("qwen"))
    logits = forward(loaded, tokens)
    assert logits.shape == (1, len(tokens), V)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[0], reference_logits(cfg, t, tokens), rtol=2e-4, atol=2e-4)

    # end of turn: the tokenizer's EOS, then config.json's, then generation_config.json's
    assert loaded.eos_ids == (2, 4)
    assert loaded.tokenizer.eos_id() == 2 and loaded.tokenizer.pad_id() == 0
    assert loaded.tokenizer.bos_id() == (None if kind.startswith("qwen") else 1)


def test_bfloat16_load_casts_parameters(tmp_path, mesh):
    _, t = write_checkpoint(tmp_path / "q", "qwen2")
    loaded = load_model(str(tmp_path / "q"), mesh=mesh, dtype="bfloat16")
    emb = loaded.model.embedder.input_embedding[...]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(emb, np.float32), t["model.embed_tokens.weight"],
                               rtol=1e-2, atol=1e-2)
    assert loaded.model_config.param_dtype == jnp.bfloat16
    assert np.isfinite(forward(loaded, [5, 6, 7])).all()


def test_mixed_dtype_file_uses_tunix_per_tensor_loader(tmp_path, mesh):
    # Tunix 0.1.7's memory-mapped loader reads a whole file in its first tensor's dtype;
    # a file mixing float16 and float32 must go through the per-tensor path instead.
    d = tmp_path / "mixed"
    cfg, t = write_checkpoint(d, "llama")
    t16 = dict(t, **{"model.embed_tokens.weight": t["model.embed_tokens.weight"].astype(np.float16)})
    save_file(t16, str(d / "model.safetensors"))
    assert model_families.check_safetensors(d, model_families.expected_tensors(
        "llama", model_families.llama3_config_from_hf(cfg))) == "original"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(str(d), mesh=mesh)
    np.testing.assert_array_equal(np.asarray(loaded.model.embedder.input_embedding[...]),
                                  t16["model.embed_tokens.weight"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(loaded.model.layers[0].mlp.down_proj.kernel[...]),
                                  t["model.layers.0.mlp.down_proj.weight"].T)


def test_sharded_checkpoint_files_load(tmp_path, mesh):
    d = tmp_path / "sharded"
    cfg, t = write_checkpoint(d, "qwen3")
    (d / "model.safetensors").unlink()
    names = sorted(t)
    save_file({k: t[k] for k in names[::2]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[1::2]}, str(d / "model-00002-of-00002.safetensors"))
    loaded = load_model(str(d), mesh=mesh)
    tokens = [5, 6, 7, 8]
    np.testing.assert_allclose(forward(loaded, tokens)[0], reference_logits(cfg, t, tokens),
                               rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------- config and file errors


@pytest.mark.parametrize("kind,key", [
    ("qwen2", "num_hidden_layers"), ("qwen2", "rope_theta"), ("qwen3", "head_dim"),
    ("llama", "rms_norm_eps"), ("gemma2", "num_key_value_heads"),
    ("qwen3_moe", "moe_intermediate_size"), ("gemma2", "sliding_window"),
])
def test_missing_required_config_key_is_named(tmp_path, mesh, kind, key):
    d = tmp_path / kind
    cfg, _ = write_checkpoint(d, kind)
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"required key '{key}' is missing"):
        load_model(str(d), mesh=mesh)


@pytest.mark.parametrize("kind,override,match", [
    ("gemma2", {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar=144"),
    ("gemma2", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen2", {"num_hidden_layers": 0}, "num_hidden_layers=0"),
])
def test_config_tunix_cannot_represent_is_refused(tmp_path, mesh, kind, override, match):
    d = tmp_path / kind
    write_checkpoint(d, kind, **override)
    with pytest.raises(ValueError, match=match):
        load_model(str(d), mesh=mesh)


def test_checkpoint_not_matching_config_names_the_tensor(tmp_path, mesh):
    d = tmp_path / "q"
    cfg, _ = write_checkpoint(d, "qwen3")
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"lack \d+ tensor\(s\).*model\.layers\.2\."):
        load_model(str(d), mesh=mesh)
    (d / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 32}))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight has shape \[64, 32\].*\[32, 32\]"):
        load_model(str(d), mesh=mesh)
    # untied head declared but the file has none
    write_checkpoint(d, "qwen2")
    cfg2 = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg2 | {"tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(str(d), mesh=mesh)


def test_missing_tokenizer_is_reported(tmp_path, mesh):
    d = tmp_path / "q"
    write_checkpoint(d, "qwen2")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        load_model(str(d), mesh=mesh)


def test_unknown_prefix_missing_dir_and_bad_dirs_list_valid_forms(tmp_path, mesh):
    with pytest.raises(ValueError, match="(?s)unknown prefix 'ftp'.*Valid forms.*hf:ORG/NAME"):
        load_model("ftp:x/y", mesh=mesh)
    with pytest.raises(ValueError, match="(?s)is not a directory.*Valid forms.*embedded:gemma3-270m"):
        load_model(str(tmp_path / "nope"), mesh=mesh)
    with pytest.raises(ValueError, match="(?s)empty source.*Valid forms"):
        load_model("  ", mesh=mesh)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(str(tmp_path / "empty"), mesh=mesh)
    d = tmp_path / "bert"
    write_checkpoint(d, "qwen2")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type='bert' is not supported; supported: \["
                                         r"'gemma2', 'gemma3', 'gemma3_text', 'llama', 'qwen2', "
                                         r"'qwen3', 'qwen3_moe'\]"):
        load_model(str(d), mesh=mesh)


def test_eos_ids_accepts_int_list_and_missing():
    class Tok:
        def __init__(self, eos):
            self._eos = eos

        def eos_id(self):
            return self._eos

    assert model_families.eos_ids(Tok(7), {"eos_token_id": [7, 9]}, {"eos_token_id": 11}) == (7, 9, 11)
    assert model_families.eos_ids(Tok(None), {"eos_token_id": 3}, {}) == (3,)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        model_families.eos_ids(Tok(None), {}, {})


# ---------------------------------------------------------------- hf:


def _fake_hub_cache(cache_root: Path, repo_id: str, src: Path) -> Path:
    """Lays ``src``'s files out exactly as huggingface_hub caches a snapshot of ``repo_id``."""
    repo = cache_root / "hf" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


@pytest.fixture
def jaxpost_cache(tmp_path, monkeypatch):
    root = tmp_path / "jaxpost-cache"
    monkeypatch.setenv("JAXPOST_CACHE", str(root))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return root


def test_hf_download_offline_uses_cached_snapshot(tmp_path, jaxpost_cache, monkeypatch, mesh):
    cfg, t = write_checkpoint(tmp_path / "src", "qwen2")
    snap = _fake_hub_cache(jaxpost_cache, "org/name", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hf_download("org/name").resolve() == snap.resolve()
    loaded = load_model("hf:org/name", mesh=mesh)
    assert loaded.family == "qwen2" and loaded.source == "hf:org/name"
    assert loaded.path.resolve() == snap.resolve()
    tokens = loaded.tokenizer.encode(TEXT)
    np.testing.assert_allclose(forward(loaded, tokens)[0], reference_logits(cfg, t, tokens),
                               rtol=2e-4, atol=2e-4)


@pytest.fixture
def hub_online(monkeypatch):
    """Online mode, even if HF_HUB_OFFLINE was set when huggingface_hub was imported."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hf_download_unreachable_hub_falls_back_to_cache(tmp_path, jaxpost_cache, hub_online):
    write_checkpoint(tmp_path / "src", "qwen2")
    snap = _fake_hub_cache(jaxpost_cache, "org/name", tmp_path / "src")
    # nothing listens on port 9 (discard): the connection is refused at once
    got = hub.hf_download("org/name", endpoint="http://127.0.0.1:9")
    assert got.resolve() == snap.resolve()
    with pytest.raises(ConnectionError, match="could not be reached.*embedded:gemma3-270m"):
        hub.hf_download("org/other", endpoint="http://127.0.0.1:9")


def test_hf_download_offline_miss_says_offline(jaxpost_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\).*"
                                              r"local checkpoint directory.*embedded:gemma3-270m"):
        hub.hf_download("org/missing")
    with pytest.raises(ConnectionError, match="offline"):
        load_model("hf:org/missing", mesh=make_mesh())


@pytest.mark.parametrize("bad", ["gpt2", "org/", "/name", "a/b/c", "org/na me", "org/na--me", ""])
def test_hf_malformed_repo_id(jaxpost_cache, bad):
    with pytest.raises(ValueError):
        hub.hf_download(bad)


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers the Hub's repo-info call the way huggingface.co does for each error case."""

    def do_GET(self):  # noqa: N802
        if "/gated" in self.path:
            code, headers = 403, {"X-Error-Code": "GatedRepo",
                                  "X-Error-Message": "Access to model org/gated is restricted."}
        elif "/badtoken" in self.path:
            code, headers = 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
        else:
            code, headers = 404, {"X-Error-Code": "RepoNotFound",
                                  "X-Error-Message": "Repository not found"}
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hf_errors_are_translated(jaxpost_cache, hub_online, fake_hub):
    secret = "hf_SECRETSECRETSECRET"
    with pytest.raises(PermissionError, match="gated.*HF_TOKEN") as e:
        hub.hf_download("org/gated", endpoint=fake_hub, token=secret)
    assert secret not in str(e.value)
    with pytest.raises(ValueError, match="'org/nothere' was not found"):
        hub.hf_download("org/nothere", endpoint=fake_hub)
    with pytest.raises(PermissionError, match="HTTP 401.*HF_TOKEN") as e:
        hub.hf_download("org/badtoken", endpoint=fake_hub, token=secret)
    assert secret not in str(e.value)


# ---------------------------------------------------------------- kaggle:


@pytest.mark.parametrize("handle,family,layers,embed", [
    ("google/gemma-3/flax/gemma3-1b-it", "gemma3", 26, 1152),
    ("google/gemma-3/flax/gemma3-270m", "gemma3", 18, 640),
    ("google/gemma-3/flax/gemma3-4b-it/1", "gemma3", 34, 2560),
    ("google/gemma-2/flax/gemma2-2b-it", "gemma2", 26, 2304),
    ("google/gemma-2/flax/gemma2-9b", "gemma2", 42, 3584),
    ("google/gemma/flax/2b-it", "gemma", 18, 2048),
])
def test_kaggle_variation_picks_tunix_preset(handle, family, layers, embed):
    km = hub.parse_kaggle_handle(handle)
    assert km.family == family and km.variation == handle.split("/")[3]
    cfg = km.model_config()
    assert (cfg.num_layers, cfg.embed_dim) == (layers, embed)
    assert km.version == (1 if handle.endswith("/1") else None)


def test_kaggle_unknown_variation_and_bad_handles(mesh):
    with pytest.raises(ValueError, match="unknown Flax variation 'gemma3-999b'.*gemma3-1b-it"):
        load_model("kaggle:google/gemma-3/flax/gemma3-999b", mesh=mesh)  # before any download
    with pytest.raises(ValueError, match="framework 'pytorch' is not supported"):
        hub.parse_kaggle_handle("google/gemma-3/pytorch/gemma3-1b-it")
    for bad in ["google/gemma-3", "google/gemma-3/flax/gemma3-1b-it/v1", "a//b/c"]:
        with pytest.raises(ValueError, match="Kaggle handle"):
            hub.parse_kaggle_handle(bad)
    km = hub.parse_kaggle_handle("google/gemma-3/transformers/gemma-3-1b-it")
    assert km.framework == "transformers" and km.family is None


def test_kaggle_gemma3_orbax_checkpoint_loads(tmp_path, mesh):
    """A kagglehub-style download (checkpoint folder + tokenizer.model) in upstream layout."""
    import orbax.checkpoint as ocp
    import sentencepiece as spm
    from tunix.models.gemma3 import model as gemma3

    root = tmp_path / "download"
    root.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT, "hello world", "the dog sat", "<end_of_turn>"] * 20),
        model_prefix=str(root / "tokenizer"), vocab_size=40, hard_vocab_limit=False,
        model_type="word",
        user_defined_symbols=["<end_of_turn>"], bos_id=2, eos_id=1, pad_id=0, unk_id=3)
    rng = np.random.default_rng(0)
    mat = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    params = {"transformer/embedder": {"input_embedding": mat(V, D)},
              "transformer/final_norm": {"scale": mat(D)}}
    for i in range(L):
        p = f"transformer/layer_{i}/"
        params |= {p + "attn/q_einsum": {"w": mat(H, D, HD)},
                   p + "attn/kv_einsum": {"w": mat(2, K, D, HD)},
                   p + "attn/attn_vec_einsum": {"w": mat(H, HD, D)},
                   p + "attn/_query_norm": {"scale": mat(HD)},
                   p + "attn/_key_norm": {"scale": mat(HD)},
                   p + "mlp/gating_einsum": {"w": mat(2, F, D)},
                   p + "mlp/linear": {"w": mat(F, D)}}
        for n in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            params[p + n] = {"scale": mat(D)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(root / "gemma3-tiny-it"), params)
    ckpt.wait_until_finished()

    km = hub.KaggleModel("google/gemma-3/flax/gemma3-tiny-it", "google", "gemma-3", "flax",
                         "gemma3-tiny-it", None, "gemma3", None, None)
    cfg = gemma3.ModelConfig(num_layers=L, num_embed=V, embed_dim=D, hidden_dim=F, num_heads=H,
                             head_dim=HD, num_kv_heads=K, sliding_window_size=4)
    loaded = hub.load_kaggle_checkpoint(root, km, "kaggle:test", mesh, jnp.float32,
                                        model_config=cfg)
    assert loaded.family == "gemma3" and loaded.model_config.param_dtype == jnp.float32
    # jaxpost's memory path (chunked log-probs, decoding layout) as for any Gemma 3 source
    assert type(loaded.model) is fast_logits.Gemma3TrimmedLogits
    assert type(loaded.model.layers[0].attn) is fast_logits.DecodingAttention
    lay = loaded.model.layers[1]
    w = params["transformer/layer_1/mlp/gating_einsum"]["w"]
    np.testing.assert_array_equal(np.asarray(lay.mlp.gate_proj.kernel[...]), w[0].T)
    np.testing.assert_array_equal(np.asarray(lay.mlp.up_proj.kernel[...]), w[1].T)
    np.testing.assert_array_equal(np.asarray(lay.attn.q_einsum.w[...]),
                                  params["transformer/layer_1/attn/q_einsum"]["w"])
    tokens = loaded.tokenizer.encode("the cat sat")
    assert tokens[0] == loaded.tokenizer.bos_id() == 2
    logits = forward(loaded, tokens)
    assert logits.shape == (1, len(tokens), V) and np.isfinite(logits).all()
    sp = loaded.tokenizer.tokenizer
    assert loaded.eos_ids == (1, sp.PieceToId("<end_of_turn>"))


def test_kaggle_download_without_tokenizer_or_checkpoint_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        hub.find_tokenizer_model(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint folder 'gemma3-1b-it'"):
        hub.kaggle_checkpoint_dir(tmp_path, "gemma3-1b-it")


class _FakeKaggle(http.server.BaseHTTPRequestHandler):
    """Answers kagglehub's model lookup as api.kaggle.com does for a refused or missing model."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = 403 if body.get("modelSlug") == "private-model" else 404
        payload = json.dumps({"code": code, "message": "refused" if code == 403 else "not found"})
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def kaggle_test_env(tmp_path, monkeypatch):
    """kagglehub pointed at its TEST endpoint (localhost:7777), with no credentials."""
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")


def test_kaggle_unreachable_is_explained(kaggle_test_env):
    try:
        server = http.server.HTTPServer(("127.0.0.1", 7777), _FakeKaggle)
    except OSError:
        pytest.skip("port 7777 (kagglehub's TEST endpoint) is in use")
    server.server_close()  # nothing listens now: connections are refused
    with pytest.raises(ConnectionError, match="cannot reach Kaggle.*/VERSION.*embedded:gemma3-270m"):
        models.load_kaggle("google/gemma-3/flax/gemma3-1b-it", "kaggle:x", None, None)


def test_kaggle_refusal_and_missing_model_are_translated(kaggle_test_env):
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 7777), _FakeKaggle)
    except OSError:
        pytest.skip("port 7777 (kagglehub's TEST endpoint) is in use")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PermissionError, match="HTTP 403.*KAGGLE_USERNAME and KAGGLE_KEY.*"
                                                  "kaggle.com/models/google/private-model"):
            models.load_kaggle("google/private-model/flax/gemma3-1b-it", "kaggle:x", None, None)
        with pytest.raises(ValueError, match="'google/nothing/flax/gemma3-1b-it' was not found"):
            models.load_kaggle("google/nothing/flax/gemma3-1b-it", "kaggle:x", None, None)
    finally:
        server.shutdown()
        server.server_close()


def test_read_safetensors_matches_the_safetensors_package(tmp_path):
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from jaxpost.models.loading import read_safetensors

    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.normal(size=(3, 5)).astype(np.float32),
               "a.scale": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
               "c.ids": np.arange(6, dtype=np.int32).reshape(2, 3)}
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file))
    ours = dict(read_safetensors(file))
    theirs = load_file(str(file))
    assert sorted(ours) == sorted(theirs)
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        np.testing.assert_array_equal(ours[name], array)

    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        dict(read_safetensors(file))
