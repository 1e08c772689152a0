"""GGUF export of the tiny random Gemma 3 with random LoRA adapters, read back by jaxpost.

Reading a GGUF file parses its 262144-entry vocabulary (~35 s on 2 CPU cores), so each
file is read once: f16 through ``load_model("gguf:...")``, q8_0 through one
``GGUFReader`` whose metadata is checked and whose tensors are loaded as a model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpost import gguf_export, hf_export

from jaxpost.runtime import cache

from jaxpost.models import gguf as gguf_import
from jaxpost.models.loading import load_model
from test_hf_export import ALPHA, logits_of, run_config, tiny_lora_setup

TEXTS = ["Calculate 3 + 4. <reasoning>3 plus 4</reasoning><answer>7</answer>",
         "<start_of_turn>user\nHi  there\n\n<end_of_turn>\n", "naïve café 東京 🙂"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_lora_setup()


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """Both types; f16 with a run's config (its prompt format goes into the file), q8_0
    without (the family's template, no system prompt)."""
    loaded, arrays, _ = tiny
    root = tmp_path_factory.mktemp("gguf")
    return {t: gguf_export.write_gguf_export(loaded, root / t, lora=arrays, alpha=ALPHA,
                                             gguf_type=t, metrics={"step": 1},
                                             config=run_config() if t == "f16" else None)
            for t in gguf_export.GGUF_TYPES}


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """A jaxpost cache shared by the tests that load the f16 file (converted once)."""
    return tmp_path_factory.mktemp("cache")


def test_generate_chats_with_a_gguf_export_in_its_runs_prompt_format(tiny, exports,
                                                                    gguf_cache, monkeypatch,
                                                                    capsys):
    """``jaxpost generate "..." --chat --model gguf:FILE``, as the export's README says:
    the run's system prompt and template, and nothing but the completion on stdout."""
    from jaxpost import cli
    from jaxpost.data.prompts import format_prompt
    from jaxpost.sampling import chat_prompt, generate

    monkeypatch.setenv("JAXPOST_CACHE", str(gguf_cache))
    source = f"gguf:{exports['f16'] / 'model-f16.gguf'}"
    question = "What is 7 + 5?"
    args = ["generate", question, "--chat", "--model", source, "--max-new-tokens", "6"]
    assert cli.main(args) == 0
    trained = capsys.readouterr()
    assert cli.main(args + ["--system-prompt", ""]) == 0
    plain = capsys.readouterr()
    # The first use of the file converts it; that progress goes to stderr.
    assert "reading" in trained.err and "jaxpost" not in trained.out
    assert "system prompt the model was trained with" in trained.err
    assert "system prompt" not in plain.err

    back = load_model(source, show_progress=False)
    [want] = generate(back, format_prompt(question, run_config()), max_new_tokens=6)
    [bare] = generate(back, chat_prompt(question, back), max_new_tokens=6)
    assert trained.out == want + "\n" and plain.out == bare + "\n"
    assert want != bare  # the system prompt reached the model
    assert cli.main(["generate", question, "--system-prompt", "x"]) == 2
    assert "add --chat" in capsys.readouterr().err


def test_f16_loads_back_through_the_gguf_source(tiny, exports, gguf_cache, monkeypatch):
    from jaxpost.data.prompts import system_text

    loaded, _, want = tiny
    out = exports["f16"]
    file = out / "model-f16.gguf"
    assert {p.name for p in out.iterdir()} == {file.name, "Modelfile", "README.md",
                                               "metrics.json", "config.yaml"}
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile
    assert f'SYSTEM """{system_text(run_config())}"""' in modelfile
    assert "PARAMETER stop <end_of_turn>" in modelfile
    monkeypatch.setenv("JAXPOST_CACHE", str(gguf_cache))  # the tiny model is already loaded
    back = load_model(f"gguf:{file}", show_progress=False)
    assert (cache.cache_root() / "models" / f"gguf-{cache.file_digest(file)}").is_dir()
    got = logits_of(back, back.model)
    err = np.abs(got - want).max()
    # Logits span about +-5. f16 rounds each weight to 11 significant bits (relative error
    # <= 2**-11 ~ 5e-4); through 2 layers and a 262144-row tied embedding that gives
    # ~1e-3, so 1e-2 is a loose bound that still catches any layout or norm mistake (>0.1).
    assert 0 < err < 1e-2, err
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    for text in TEXTS:
        assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text), text
    assert back.eos_ids == loaded.eos_ids


def test_q8_0_metadata_and_logits(tiny, exports, tmp_path):
    import gguf

    loaded, arrays, want = tiny
    cfg = loaded.model_config
    r = gguf.GGUFReader(str(exports["q8_0"] / "model-q8_0.gguf"))
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert f("general.architecture") == "gemma3"
    assert f("gemma3.block_count") == cfg.num_layers
    assert f("gemma3.embedding_length") == cfg.embed_dim
    assert f("gemma3.feed_forward_length") == cfg.hidden_dim
    assert f("gemma3.attention.head_count") == cfg.num_heads
    assert f("gemma3.attention.head_count_kv") == cfg.num_kv_heads
    assert f("gemma3.attention.key_length") == f("gemma3.attention.value_length") == cfg.head_dim
    assert f("gemma3.attention.sliding_window") == cfg.sliding_window_size
    assert f("gemma3.rope.freq_base") == cfg.global_base_frequency
    assert f("gemma3.rope.freq_base_swa") == cfg.local_base_frequency
    assert f("gemma3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert f("tokenizer.ggml.model") == "llama" and f("tokenizer.ggml.add_bos_token") is True
    sp = loaded.tokenizer.tokenizer
    assert len(r.fields["tokenizer.ggml.tokens"].data) == sp.vocab_size()
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id"),
            f("tokenizer.ggml.padding_token_id")) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    # The prompt format (without a run's config: Gemma's, no system prompt) and the
    # special tokens llama.cpp needs to hold a chat.
    from jaxpost.data.prompts import jinja_chat_template

    assert f("tokenizer.chat_template") == jinja_chat_template("gemma", "")
    eot = sp.piece_to_id("<end_of_turn>")
    assert f("tokenizer.ggml.eot_token_id") == eot and eot in loaded.eos_ids
    token_types = r.fields["tokenizer.ggml.token_type"]
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        assert token_types.contents(sp.piece_to_id(marker)) == 3, marker  # control
    assert "SYSTEM" not in (exports["q8_0"] / "Modelfile").read_text()

    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.attn_k.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["output_norm.weight"] == types["blk.0.attn_q_norm.weight"] == "F32"
    norm = next(t for t in r.tensors if t.name == "output_norm.weight")
    np.testing.assert_allclose(np.asarray(norm.data),
                               hf_export.base_params(loaded)["final_norm.scale"] + 1, rtol=1e-6)

    # The same conversion as the gguf: source, from this reader.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(gguf_import.read_hf_config(r)))
    (hf_dir / "tokenizer.model").write_bytes(gguf_import.sentencepiece_model_bytes(r))
    from safetensors.numpy import save_file

    tensors = dict(gguf_import.dequantized_tensors(r))
    merged = hf_export.merged_hf_tensors(loaded, arrays, alpha=ALPHA)
    for name, value in merged.items():
        # q8_0: int8 times one f16 scale d = max|block| / 127 per 32 values: rounding
        # to int8 costs <= d / 2, the f16 rounding of d up to 127 * 2**-11 * d more.
        blocks = np.abs(value).reshape(-1, 32).max(-1, keepdims=True) if value.ndim == 2 else 0
        err = np.abs(tensors[name] - value).reshape(-1, 32 if value.ndim == 2 else value.size)
        assert np.all(err <= blocks / 127 * 0.57 + 1e-7), name
    save_file(tensors, str(hf_dir / "model.safetensors"))
    back = load_model(str(hf_dir), show_progress=False)
    err = np.abs(logits_of(back, back.model) - want).max()
    # Per-weight error up to ~1/220 of its block's maximum: ~10x f16's, hence 0.1.
    assert 0 < err < 0.1, err


def test_bad_gguf_type_is_refused_before_writing(tiny, tmp_path):
    loaded, arrays, _ = tiny
    with pytest.raises(ValueError, match="gguf_type='q4'"):
        gguf_export.write_gguf_export(loaded, tmp_path / "g", lora=arrays, alpha=ALPHA,
                                      gguf_type="q4")
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="no llama.cpp"):
        gguf_export.gguf_tensor_name("model.layers.0.mlp.experts.0.up_proj.weight")
