"""The accelerator presets' meshes, in bfloat16, on 8 simulated devices.

Each test runs a fresh Python with ``--xla_force_host_platform_device_count=8`` (the flag
must be set before JAX starts) and trains two GRPO steps of an accelerator preset whose
sizes are shrunk to a tiny Gemma 3 shaped like Gemma 3 1B (4 query heads, one KV head),
loaded the way the presets load Gemma 3 1B: a ``kaggle:`` handle resolved by kagglehub
(here from its cache, laid out as a download) into an Orbax checkpoint in the upstream
layout. Tunix applies activation shardings only off the CPU, so the script makes its
sharding helper take the TPU branch: the key projection's single head is then named for
the ``tp`` axis, which is what broke LoRA on the 2 x 4 mesh. Then the run resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import dataclasses, json, shutil, sys, types
    from pathlib import Path

    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from tunix.models.gemma3 import model as gemma3
    from tunix.rl import common as rl_common
    from tunix.utils import sharding_utils

    from jaxpost import fast_logits

    from jaxpost.models import hub
    from jaxpost.tunix_ext import losses
    from jaxpost.colab_pipeline import prepare_colab_session, train_grpo
    from jaxpost.config import get_preset
    from jaxpost.models.loading import embedded_model_dir

    preset, cache_dir, out_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    assert len(jax.devices()) == 8, jax.devices()

    class _Accelerator:  # what Tunix's shard() asks of jax.devices()[0]
        platform = "tpu"

    sharding_utils.jax = types.SimpleNamespace(
        devices=lambda: [_Accelerator()], device_put=jax.device_put, lax=jax.lax)

    # A Kaggle variation shaped like gemma3-1b-it: 4 query heads, 1 KV head.
    variation = "gemma3-1b-shape-it"
    V, D, F, H, K, HD, L = 262144, 64, 128, 4, 1, 32, 2
    cfg = gemma3.ModelConfig(num_layers=L, num_embed=V, embed_dim=D, hidden_dim=F,
                             num_heads=H, head_dim=HD, num_kv_heads=K, sliding_window_size=64)
    gemma3.ModelConfig.gemma3_1b_shape = staticmethod(lambda: cfg)
    hub.KAGGLE_VARIATIONS[variation] = ("gemma3", "gemma3_1b_shape", None)

    download = cache_dir / "models/google/gemma-3/flax" / variation / "1"
    if not download.is_dir():
        rng = np.random.default_rng(0)
        mat = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
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
            for n in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm",
                      "post_ffw_norm"):
                params[p + n] = {"scale": mat(D)}
        download.mkdir(parents=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(str(download / variation), params)
        checkpointer.wait_until_finished()
        shutil.copy(embedded_model_dir(False) / "tokenizer.model", download / "tokenizer.model")
        (download.parent / "1.complete").write_text("")  # kagglehub's completion marker

    # Which loss runs: jaxpost's chunked log-probs, or Tunix's full-logits GRPO loss.
    calls = {"chunked": 0, "tunix": 0}
    chunked, tunix_loss = losses.completion_logps, losses.algo_core.grpo_loss_fn
    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    losses.completion_logps = counting("chunked", chunked)
    losses.algo_core.grpo_loss_fn = counting("tunix", tunix_loss)

    smoke = get_preset("smoke")
    base = get_preset(preset)
    config = dataclasses.replace(
        base, model=f"kaggle:google/gemma-3/flax/{variation}/1", dataset=smoke.dataset,
        max_examples=16, eval_size=4, max_steps=2, batch_size=2, mini_batch_size=None,
        num_generations=2, max_new_tokens=8, max_prompt_length=96, lora_rank=8,
        lora_alpha=8.0, save_interval_steps=1, save_to_drive=False, output_dir=out_dir)
    assert config.dtype == "bfloat16", config.dtype

    session = prepare_colab_session(config)
    model, mesh = session.loaded.model, session.loaded.mesh
    assert type(model) is fast_logits.Gemma3TrimmedLogits, type(model)
    assert dict(mesh.shape) == {"fsdp": base.mesh_fsdp, "tp": base.mesh_tp}, mesh.shape

    def placements(state):
        # Each array against the sharding its annotations name on this mesh.
        found = {}
        expected = nnx.get_named_sharding(state, mesh)
        for (path, x), (_, want) in zip(jax.tree_util.tree_leaves_with_path(state),
                                        jax.tree_util.tree_leaves_with_path(expected)):
            key = jax.tree_util.keystr(path)
            assert x.dtype == jnp.bfloat16 or "lora" in key, (key, x.dtype)
            assert set(x.sharding.device_set) == set(mesh.devices.flat), key
            found[key] = (tuple(x.sharding.spec), x.sharding.shard_shape(x.shape),
                          tuple(want.spec))
        return found

    base_params = placements(nnx.state(model, nnx.Param))
    for key, (spec, _, want) in base_params.items():
        assert spec == want, (key, spec, want)
    q_key = next(k for k in base_params if "q_einsum" in k and "lora" not in k)
    assert base_params[q_key][1][0] == H // base.mesh_tp, base_params[q_key]
    lora = placements(nnx.state(session.lora_model, nnx.LoRAParam))
    assert lora, "no LoRA parameters"

    state = train_grpo(config, session)
    assert state.step == 2 and state.resumed_from is None, (state.step, state.resumed_from)
    losses = [h["loss"] for h in state.history]
    assert all(np.isfinite(losses)), losses
    assert calls["chunked"] > 0 and calls["tunix"] == 0, calls

    longer = dataclasses.replace(config, max_steps=3)
    resumed = train_grpo(longer, prepare_colab_session(longer))
    assert resumed.resumed_from == 2 and resumed.step == 3, (resumed.resumed_from, resumed.step)
    print("RESULT " + json.dumps({"calls": calls, "losses": losses, "q_einsum": base_params[q_key],
                                  "lora": sorted(lora.items())[:2]}))
""")


@pytest.mark.parametrize("preset", ["colab_tpu", "colab_tpu_v5e1"])
def test_preset_mesh_trains_in_bfloat16_and_resumes(preset, tmp_path):
    """``colab_tpu`` and ``kaggle_tpu`` share the 2 x 4 mesh; ``colab_tpu_v5e1`` and ``gpu``
    the 1 x 1 one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               KAGGLEHUB_CACHE=str(tmp_path / "kagglehub"),
               KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle-config"), JAX_PLATFORMS="cpu")
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, preset, str(tmp_path / "kagglehub"),
                        str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["calls"]["tunix"] == 0
