"""The embedded model is the real Gemma 3 270M: tokenizer, greedy decoding, language-model loss."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from flax import nnx

from jaxpost.runtime import cache
from jaxpost.models.loading import embedded_model_dir, load_model
from jaxpost.sampling import generate
from jaxpost.scoring import mean_token_loss

PARAGRAPH = (
    "The history of science is full of discoveries that seemed small at the time. "
    "When researchers first looked at cells under a microscope, they could not have "
    "guessed how much of modern medicine would depend on what they saw."
)


def test_tokenizer_round_trips_text(embedded):
    tok = embedded.tokenizer
    for text in ["Hello, world!", "  two  spaces and\nnewlines\n", "émoji 🤖 and 12,345.67"]:
        ids = tok.encode(text)
        assert ids[0] == 2  # BOS
        assert tok.decode(ids) == text


def test_special_token_ids(embedded):
    tok = embedded.tokenizer
    assert (tok.pad_id(), tok.eos_id(), tok.bos_id()) == (0, 1, 2)
    assert tok.tokenizer.unk_id() == 3
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>")
    assert ids[:2] == [2, 105] and ids[-1] == 106
    assert 106 in embedded.eos_ids


def test_greedy_decoding_answers_arithmetic(embedded):
    [text] = generate(embedded, "Question: What is 2 + 3?\nAnswer:", max_new_tokens=16)
    assert "5" in text


def test_real_weights_model_language_far_better_than_random(embedded):
    from tunix.models.gemma3 import model as gemma3

    real = mean_token_loss(embedded, [PARAGRAPH])
    random_model = gemma3.Gemma3(embedded.model_config, rngs=nnx.Rngs(params=0))
    random = mean_token_loss(embedded, [PARAGRAPH], model=random_model)
    assert real < 4.0, real        # measured: about 2.5 nats per token
    assert random > 11.0, random   # about ln(262144) = 12.5: uniform over the vocabulary
    assert random - real > 7.0


def test_cached_load_does_not_convert_again(embedded):
    entry = embedded_model_dir()
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    again = embedded_model_dir()
    assert again == entry
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before


def test_corrupt_cache_is_rebuilt(embedded, tmp_path, monkeypatch):
    """A damaged entry is reported and converted again, never loaded."""
    good = embedded_model_dir()
    monkeypatch.setenv("JAXPOST_CACHE", str(tmp_path))
    damaged = tmp_path / "models" / good.name
    damaged.mkdir(parents=True)
    for p in good.iterdir():
        (damaged / p.name).symlink_to(p) if p.name == "model.safetensors" else \
            (damaged / p.name).write_bytes(p.read_bytes())
    tok = damaged / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[1000:1010] = b"corruption"
    tok.write_bytes(bytes(data))
    assert "corrupt" in cache.verify_entry(damaged)

    rebuilt = embedded_model_dir(show_progress=False)
    assert cache.verify_entry(rebuilt) is None
    assert (rebuilt / "tokenizer.model").read_bytes() == (good / "tokenizer.model").read_bytes()


def test_sharded_mesh_gives_same_greedy_tokens(embedded):
    """A 2x2 mesh over 4 simulated CPU devices decodes exactly like one device."""
    script = textwrap.dedent("""
        import jax
        from jaxpost.models.loading import load_model
        from jaxpost.runtime.mesh import make_mesh
        from jaxpost.sampling import generate
        assert len(jax.devices()) == 4, jax.devices()
        prompts = ["Question: What is 2 + 3?\\nAnswer:", "The capital of France is"]
        outs = []
        for mesh in (make_mesh(2, 2), make_mesh(1, 1, devices=jax.devices()[:1])):
            m = load_model("embedded:gemma3-270m", mesh=mesh, show_progress=False)
            outs.append(generate(m, prompts, max_new_tokens=12))
        print(repr(outs))
        assert outs[0] == outs[1], outs
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_unknown_source_lists_valid_forms():
    import pytest

    with pytest.raises(ValueError, match="embedded:gemma3-270m"):
        load_model("embedded:gemma9")
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        load_model("s3:bucket/model")


def test_cli_generate_prints_answer(embedded):
    r = subprocess.run(
        [sys.executable, "-m", "jaxpost.cli", "generate", "Question: What is 2 + 3?\nAnswer:",
         "--max-new-tokens", "16", "--temperature", "0"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5" in r.stdout
