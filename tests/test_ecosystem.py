"""Exports of the embedded Gemma 3 270M in the ecosystem's own tools.

A run's LoRA adapters (random, small) on the real model, exported merged and as GGUF,
then read by transformers (its tokenizer and chat template here; its model where torch
is installed) and by llama.cpp (where llama-cpp-python is installed). Each part that
needs a package outside jaxpost's dependencies is skipped, with the reason, without it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jaxpost.config import get_preset
from jaxpost.data.prompts import format_prompt, jinja_chat_template, system_text
from test_hf_export import logits_of

QUESTIONS = ["What is 7 + 5?", "  Tom has 3 apples and buys 4 more.  How many does he have?\n"]


@pytest.fixture(scope="module")
def trained(embedded):
    """The embedded model with small random adapters, as a run of the default preset."""
    from jaxpost.export import lora_arrays, set_lora_arrays
    from jaxpost.models.lora import apply_lora

    config = get_preset("default")
    model = apply_lora(embedded.model, embedded.mesh, rank=config.lora_rank,
                       alpha=config.lora_alpha, target_modules=config.lora_target_modules)
    rng = np.random.default_rng(0)
    # Small enough to keep the model's answers, large enough to move its logits.
    arrays = {k: (rng.standard_normal(v.shape) * 0.02).astype(np.float32)
              for k, v in lora_arrays(model).items()}
    set_lora_arrays(model, arrays)
    return config, arrays, model


@pytest.fixture(scope="module")
def merged(embedded, trained, tmp_path_factory):
    from jaxpost.hf_export import write_hf_model

    config, arrays, _ = trained
    return write_hf_model(embedded, tmp_path_factory.mktemp("eco") / "merged", lora=arrays,
                          alpha=config.lora_alpha, config=config)


def _prompt_ids(embedded, config, question):
    return embedded.tokenizer.encode(format_prompt(question, config))


def _chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_transformers_chat_template_gives_jaxposts_prompt_ids(embedded, trained, merged):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = trained[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged))
    for question in QUESTIONS:
        want = _prompt_ids(embedded, config, question)
        assert _chat_ids(tokenizer, [{"role": "user", "content": question}]) == want
        # The run's system prompt given explicitly: the same prompt.
        system = {"role": "system", "content": system_text(config)}
        assert _chat_ids(tokenizer, [system, {"role": "user", "content": question}]) == want
        assert tokenizer(question).input_ids == embedded.tokenizer.encode(question)


def test_transformers_model_matches_jaxpost(embedded, trained, merged):
    torch = pytest.importorskip("torch", reason="torch is not installed (transformers' model "
                                                "needs it)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from jaxpost.sampling import generate

    config, _, lora_model = trained
    ids = _prompt_ids(embedded, config, QUESTIONS[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    want = logits_of(embedded, lora_model, ids)
    # float32 on both sides; the rest is summation order (measured: ~1e-4 of logits ~+-30).
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-4)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged))
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}],
                                           add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    [ours] = generate(embedded, format_prompt(QUESTIONS[0], config), model=lora_model,
                      max_new_tokens=24)
    assert text.strip() == ours.strip()


def test_llama_cpp_chats_with_the_gguf_export(embedded, trained, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    import gguf
    import llama_cpp

    from jaxpost.gguf_export import write_gguf_export

    config, arrays, _ = trained
    out = write_gguf_export(embedded, tmp_path / "gguf", lora=arrays, alpha=config.lora_alpha,
                            config=config, gguf_type="f16")
    file = out / "model-f16.gguf"
    reader = gguf.GGUFReader(str(file))
    assert reader.fields["tokenizer.chat_template"].contents() == jinja_chat_template(
        "gemma", system_text(config))
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=512, verbose=False, seed=0)
    question = QUESTIONS[0]
    want = _prompt_ids(embedded, config, question)
    text = format_prompt(question, config)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}],
                                       temperature=0.0, max_tokens=48)
    choice = reply["choices"][0]
    assert choice["message"]["content"].strip(), reply
    assert reply["usage"]["prompt_tokens"] == len(want)
