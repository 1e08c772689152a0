"""PEFT and merged Hugging Face exports of the tiny random Gemma 3 with random LoRA adapters.

The adapters get random non-zero A and B (B starts at zero in training, which would make
every export trivially equal to the base model).
"""

from __future__ import annotations

import functools
import http.server
import json
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxpost import hf_export
from jaxpost.export import lora_arrays, set_lora_arrays
from jaxpost.models.lora import apply_lora
from jaxpost.runtime.mesh import use_mesh
from jaxpost.models.loading import load_model

RANK, ALPHA = 4, 8.0
IDS = [2, 818, 5279, 529, 7001, 563, 236743, 236832, 900, 107, 105, 2364]


def logits_of(loaded, model, ids=IDS) -> np.ndarray:
    """Full-sequence float32 logits ``[seq, vocab]`` of one unpadded token sequence."""
    from tunix.sft import utils as sft_utils

    tokens = jnp.asarray([ids], dtype=jnp.int32)
    mask = jnp.ones_like(tokens, dtype=bool)
    with use_mesh(loaded.mesh):
        positions = sft_utils.build_positions_from_mask(mask)
        attn = sft_utils.make_causal_attn_mask(mask)
        out, _ = model(tokens, positions, None, attn)
    return np.asarray(out[0], dtype=np.float32)


@functools.lru_cache(maxsize=1)
def tiny_lora_setup():
    """The tiny random Gemma 3, random LoRA arrays for it and the LoRA model's logits.

    Cached per process, so the GGUF tests reuse it (building it takes ~30 s on 2 cores).
    """
    loaded = load_model("random:gemma3-tiny", show_progress=False)
    lora_model = apply_lora(loaded.model, loaded.mesh, rank=RANK, alpha=ALPHA)
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
              for k, v in lora_arrays(lora_model).items()}
    set_lora_arrays(lora_model, arrays)
    return loaded, arrays, logits_of(loaded, lora_model)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lora_setup()


@pytest.fixture(scope="module")
def base_dir(tiny, tmp_path_factory):
    loaded, _, _ = tiny
    return hf_export.write_hf_model(loaded, tmp_path_factory.mktemp("x") / "base")


def run_config():
    """The config of a run on the tiny model (the smoke preset's prompt format)."""
    import dataclasses

    from jaxpost.config import get_preset

    return dataclasses.replace(get_preset("smoke"), lora_rank=RANK, lora_alpha=ALPHA, seed=0,
                               dtype="float32")


@pytest.fixture(scope="module")
def merged_dir(tiny, tmp_path_factory):
    loaded, arrays, _ = tiny
    return hf_export.write_hf_model(loaded, tmp_path_factory.mktemp("x") / "merged",
                                    lora=arrays, alpha=ALPHA, config=run_config(),
                                    metrics={"step": 3})


@pytest.fixture(scope="module")
def peft_dir(tiny, tmp_path_factory):
    loaded, arrays, _ = tiny
    return hf_export.write_peft_adapter(loaded, arrays, tmp_path_factory.mktemp("x") / "peft",
                                        alpha=ALPHA, config=run_config(), metrics={"step": 3})


def test_peft_names_shapes_and_config_follow_hf_dims(tiny, peft_dir, base_dir):
    hf = json.loads((base_dir / "config.json").read_text())
    d, heads, kv, hd, ff = (hf["hidden_size"], hf["num_attention_heads"],
                            hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"])
    # nn.Linear (in, out) of each Gemma3 module, from config.json alone.
    dims = {"self_attn.q_proj": (d, heads * hd), "self_attn.k_proj": (d, kv * hd),
            "self_attn.v_proj": (d, kv * hd), "self_attn.o_proj": (heads * hd, d),
            "mlp.gate_proj": (d, ff), "mlp.up_proj": (d, ff), "mlp.down_proj": (ff, d)}
    expected = {}
    for i in range(hf["num_hidden_layers"]):
        for module, (n_in, n_out) in dims.items():
            p = f"base_model.model.model.layers.{i}.{module}"
            expected[p + ".lora_A.weight"] = (RANK, n_in)
            expected[p + ".lora_B.weight"] = (n_out, RANK)
    tensors = load_file(str(peft_dir / hf_export.PEFT_ADAPTER_FILE))
    assert {k: v.shape for k, v in tensors.items()} == expected
    cfg = json.loads((peft_dir / hf_export.PEFT_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA and not cfg["use_rslora"]
    assert sorted(cfg["target_modules"]) == sorted(m.split(".")[1] for m in dims)
    assert cfg["base_model_name_or_path"] == "random:gemma3-tiny"
    assert {p.name for p in peft_dir.iterdir()} >= {"README.md", "metrics.json"}


def test_peft_delta_equals_qwix_delta(tiny, base_dir):
    """B @ A of each PEFT pair equals the change qwix makes to that HF weight."""
    loaded, arrays, _ = tiny
    base = load_file(str(base_dir / hf_export.HF_MODEL_FILE))
    merged = hf_export.merged_hf_tensors(loaded, arrays, alpha=ALPHA)
    peft = hf_export.peft_tensors(arrays, loaded.model_config)
    for key in (k for k in peft if k.endswith("lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = (ALPHA / RANK) * peft[key.replace("lora_A", "lora_B")] @ peft[key]
        np.testing.assert_allclose(delta, merged[module + ".weight"] - base[module + ".weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=module)


def test_partial_targets_use_an_exact_regex(tiny):
    loaded, arrays, _ = tiny
    some = {k: v for k, v in arrays.items() if k.startswith("layers.1.attn.q_einsum")}
    tensors = hf_export.peft_tensors(some, loaded.model_config)
    target = hf_export.peft_target_modules(tensors, loaded.model_config.num_layers)
    import re

    assert re.fullmatch(target, "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(target, "model.layers.0.self_attn.q_proj")


def test_merged_dir_loads_back_to_the_lora_model(tiny, merged_dir):
    loaded, _, want = tiny
    assert {p.name for p in merged_dir.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.model", "README.md", "metrics.json"}
    back = load_model(str(merged_dir), show_progress=False)
    np.testing.assert_allclose(logits_of(back, back.model), want, rtol=0, atol=1e-4)
    assert back.eos_ids == loaded.eos_ids
    text = "Calculate 3 + 4. <reasoning>3 plus 4</reasoning>"
    assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)


def test_base_dir_round_trips_exactly(tiny, base_dir):
    loaded, _, _ = tiny
    back = load_model(str(base_dir), show_progress=False)
    np.testing.assert_array_equal(logits_of(back, back.model), logits_of(loaded, loaded.model))


# Where transformers' own conversion of Gemma's tokenizer.model splits otherwise: runs of
# spaces; and the chat markers, digits, accents, CJK and emoji.
TOKENIZER_TEXTS = ["a  b   c" + " " * 40 + "d", "  leading", "Calculate 3 + 4.\n\n\t1234",
                   "<start_of_turn>user\n<reasoning>3 plus 4</reasoning><end_of_turn>",
                   "naïve café 東京 🙂"]


def test_exports_carry_the_tokenizer_and_the_runs_prompt_format(tiny, peft_dir, merged_dir):
    """What the tracker found missing: a tokenizer that adds BOS, a tokenizer.json, the
    chat template with the run's system prompt, the end-of-turn ids."""
    import tokenizers

    from jaxpost.data.prompts import format_prompt, jinja_chat_template, system_text

    loaded = tiny[0]
    config = run_config()
    for path in (peft_dir, merged_dir):
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
        assert tok_cfg["add_bos_token"] is True and tok_cfg["add_eos_token"] is False
        assert tok_cfg["chat_template"] == jinja_chat_template("gemma", system_text(config))
        assert system_text(config) in tok_cfg["chat_template"]
        assert (path / "tokenizer.model").is_file()
        fast = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        for text in TOKENIZER_TEXTS:
            assert fast.encode(text).ids == loaded.tokenizer.encode(text), text
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(loaded.eos_ids) and 106 in loaded.eos_ids

    transformers = pytest.importorskip("transformers")
    question = "What is 7 + 5?"
    want = loaded.tokenizer.encode(format_prompt(question, config, template="gemma"))
    for path in (peft_dir, merged_dir):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        assert tokenizer("hi").input_ids == loaded.tokenizer.encode("hi")  # BOS included
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == list(want)
        assert tokenizer.decode(want[-4:], skip_special_tokens=True) == "\nmodel\n"


def test_transformers_with_peft_matches_jaxpost(tiny, base_dir, peft_dir, merged_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, want = tiny
    ids = torch.tensor([IDS])
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits[0].numpy()
    # Both sides run float32; differences are summation order only.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    from transformers import AutoTokenizer

    text = "Calculate 3 + 4. <start_of_turn>user\n<reasoning>3 plus 4</reasoning>"
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer(text).input_ids == tiny[0].tokenizer.encode(text)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(input_ids=ids).logits[0].numpy(), want, rtol=0,
                                   atol=1e-4)


def test_other_families_and_bad_lora_are_refused(tiny, tmp_path):
    import dataclasses

    loaded, arrays, _ = tiny
    qwen = dataclasses.replace(loaded, family="qwen2")
    with pytest.raises(ValueError, match="only Gemma 3"):
        hf_export.write_peft_adapter(qwen, arrays, tmp_path / "p", alpha=ALPHA)
    with pytest.raises(ValueError, match="embedder"):
        hf_export.peft_tensors({"embedder.input_embedding_lora_a": np.zeros((4, 2))},
                               loaded.model_config)
    half = {k: v for k, v in arrays.items() if not k.endswith("q_einsum.w_lora_b")}
    with pytest.raises(ValueError, match="incomplete"):
        hf_export.merge_lora(hf_export.base_params(loaded), half, alpha=ALPHA)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_exports_replace_only_their_own_directories(tiny, tmp_path, capsys):
    loaded, arrays, _ = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a jaxpost export"):
        hf_export.write_peft_adapter(loaded, arrays, mine, alpha=ALPHA)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        hf_export.write_peft_adapter(loaded, arrays, tmp_path / "a-file", alpha=ALPHA)

    out = hf_export.write_peft_adapter(loaded, arrays, tmp_path / "out", alpha=ALPHA,
                                       config=run_config())
    (out / "notes.txt").write_text("added to an export")
    # Replaces its own export.
    hf_export.write_peft_adapter(loaded, arrays, out, alpha=ALPHA, config=run_config())
    assert "removed its files that the new export does not write: notes.txt" in (
        capsys.readouterr().err)
    assert not (out / "notes.txt").exists() and (out / hf_export.PEFT_ADAPTER_FILE).is_file()
    # Written through private temporary files, shared as any file the user writes.
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("README.md", "config.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The three Hub endpoints create_repo + upload_folder use; records what it got."""

    calls: list = []

    def _reply(self, body: dict, code: int = 200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append((self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer hf_writeTOKEN123":
            return self._reply({"error": "Invalid credentials"}, 401)
        if self.path == "/api/repos/create":
            return self._reply({"url": f"http://{self.headers['Host']}/me/run"})
        if self.path == "/api/validate-yaml":  # the README's model-card metadata
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                           "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            host = self.headers["Host"]
            return self._reply({"commitUrl": f"http://{host}/me/run/commit/{'1' * 40}",
                                "commitOid": "1" * 40})
        return self._reply({"error": "unexpected"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    _FakeHub.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_to_hub_creates_a_private_repo_and_uploads_every_file(peft_dir, fake_hub,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_writeTOKEN123")  # read through jaxpost.runtime.credentials
    url = hf_export.push_to_hub(peft_dir, "me/run", endpoint=fake_hub)
    assert url == f"{fake_hub}/me/run"
    paths = [c[0] for c in _FakeHub.calls if c[0] != "/api/validate-yaml"]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/me/run/commit/main"
    create = json.loads(_FakeHub.calls[0][2])
    assert (create["name"], create["organization"]) == ("run", "me")
    assert create["visibility"] == "private"
    commit = [json.loads(line) for line in _FakeHub.calls[-1][2].splitlines()]
    uploaded = {c["value"]["path"] for c in commit if c["key"] == "file"}
    assert uploaded == {p.name for p in peft_dir.iterdir()}
    assert "hf_writeTOKEN123" not in capsys.readouterr().out


def test_push_to_hub_refuses_bad_input_and_hides_the_token(peft_dir, fake_hub, monkeypatch,
                                                          tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="repo_id='no-slash'"):
        hf_export.push_to_hub(peft_dir, "no-slash", token="x")
    with pytest.raises(ValueError, match="not an export directory"):
        hf_export.push_to_hub(tmp_path, "me/run", token="x")
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        hf_export.push_to_hub(peft_dir, "me/run", endpoint=fake_hub)
    assert _FakeHub.calls == []  # all refused before any request
    with pytest.raises(PermissionError, match="HTTP 401") as e:
        hf_export.push_to_hub(peft_dir, "me/run", token="hf_wrongSECRET999", endpoint=fake_hub)
    assert "hf_wrongSECRET999" not in str(e.value)
    assert _FakeHub.calls[0][1] == "Bearer hf_wrongSECRET999"


def test_cli_converts_a_lora_export(tiny, tmp_path, capsys):
    """``jaxpost export LORA_DIR --format peft|merged`` (a LoRA export of the tiny model)."""
    from jaxpost import cli
    from jaxpost.export import ADAPTER_FILE, EXPORT_CONFIG

    loaded, arrays, want = tiny
    config = run_config()
    lora_dir = tmp_path / "export"
    lora_dir.mkdir()
    from jaxpost.config import save_yaml
    from safetensors.numpy import save_file

    save_file(arrays, str(lora_dir / ADAPTER_FILE))
    save_yaml(config, str(lora_dir / EXPORT_CONFIG))
    assert cli.main(["export", str(lora_dir), "--format", "peft"]) == 0
    peft = tmp_path / "export-peft"
    assert str(peft) in capsys.readouterr().out
    assert {p.name for p in peft.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.json",
        "README.md", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    got = load_file(str(peft / hf_export.PEFT_ADAPTER_FILE))
    expected = hf_export.peft_tensors(arrays, loaded.model_config)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert cli.main(["export", str(lora_dir), "--format", "merged", "--out",
                     str(tmp_path / "m")]) == 0
    back = load_model(str(tmp_path / "m"), show_progress=False)
    np.testing.assert_allclose(logits_of(back, back.model), want, rtol=0, atol=1e-4)
    assert cli.main(["export", str(tmp_path / "nothing"), "--format", "gguf"]) == 2
    assert "RUN_DIR must be" in capsys.readouterr().err
    assert cli.main(["export", str(lora_dir), "--format", "peft", "--out", str(tmp_path / "p2"),
                     "--push-to-hub", "bad id"]) == 2
    assert "repo_id='bad id' is malformed" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()  # refused before exporting
