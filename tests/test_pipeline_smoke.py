"""End to end on CPU with the tiny random Gemma 3: train, checkpoint, resume, export, reload."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpost.colab_pipeline import (
    ColabTrainingConfig,
    export_checkpoint,
    prepare_colab_session,
    quick_test,
    run_full_pipeline,  # noqa: F401  (the acceptance import list)
    train_grpo,
)
from jaxpost.config import get_preset
from jaxpost.export import load_lora_export
from jaxpost.models.loading import load_model
from jaxpost.scoring import token_logprobs


def _arrays(model, kind):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, kind))]


# For each update of the smoke run: whether it took its rollout's layer inputs.
UPDATES_FROM_ROLLOUT = []
# The first update's memory: bytes of the JAX arrays the run holds right after it
# ("live"), and XLA's memory analyses of the steps compiled by then ("compiled").
FIRST_UPDATE_MEMORY = {}


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Two GRPO steps of the smoke preset, then a resumed run to step 3."""
    from jaxpost.tunix_ext import train_step
    out = tmp_path_factory.mktemp("smoke_run")
    config = dataclasses.replace(get_preset("smoke"), output_dir=str(out))
    # Arrays other tests left alive, held until the run's are measured: one of them freed
    # meanwhile (a cache replaced by the run) would otherwise be taken off the run's bytes.
    earlier = jax.live_arrays()
    before = sum(a.nbytes for a in earlier)
    session = prepare_colab_session(config)
    base_before = [x.copy() for x in _arrays(session.loaded.model, nnx.Param)]
    lora_before = [x.copy() for x in _arrays(session.lora_model, nnx.LoRAParam)]
    update = train_step._LoraTrainStep.__call__

    def recorded_update(self, inputs):
        out = update(self, inputs)
        UPDATES_FROM_ROLLOUT.append(self.used_rollout_layer_inputs)
        if not FIRST_UPDATE_MEMORY:
            FIRST_UPDATE_MEMORY.update(live=_live_bytes() - before, compiled=[
                e.memory_analysis() for _, cache in self._steps.values() for e in cache.values()])
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_step._LoraTrainStep, "__call__", recorded_update)
        state = train_grpo(config, session)
    del earlier
    return config, session, state, base_before, lora_before


def test_updates_take_the_rollouts_layer_inputs(smoke_run):
    """Each update follows its own rollout with the weights it sampled with, so none
    runs the layers forward again."""
    assert UPDATES_FROM_ROLLOUT == [True, True]


def test_memory_plan_matches_the_first_updates_memory(smoke_run):
    """The smoke preset's memory plan against its first update, measured on this CPU.

    The held rows (base weights, LoRA weights, AdamW moments, the rollout's kept layer
    inputs) against the bytes of the JAX arrays the run holds right after the update, and
    against the compiled step's arguments (those arrays and the batch): within 5%. The
    update's rows (LoRA gradients, activations, log-prob chunk) against the scratch memory
    XLA allocates for the compiled step: from 10% under to 25% over. For the tiny model
    these are mostly its embedding and one chunk of the vocabulary's logits.
    """
    from jaxpost.plan import memory_plan

    plan = memory_plan(smoke_run[0], platform="cpu")
    [compiled] = FIRST_UPDATE_MEMORY["compiled"]
    assert FIRST_UPDATE_MEMORY["live"] == pytest.approx(plan.held_bytes, rel=0.05)
    assert compiled.argument_size_in_bytes == pytest.approx(plan.held_bytes, rel=0.05)
    assert 0.9 <= plan.phases["GRPO update"] / compiled.temp_size_in_bytes <= 1.25


def test_lora_changed_and_base_did_not(smoke_run):
    config, session, state, base_before, lora_before = smoke_run
    lora_after = _arrays(state.lora_model, nnx.LoRAParam)
    assert any(not np.array_equal(a, b) for a, b in zip(lora_before, lora_after))
    base_after = _arrays(session.loaded.model, nnx.Param)
    assert len(base_after) == len(base_before)
    assert all(np.array_equal(a, b) for a, b in zip(base_before, base_after))


def test_checkpoint_written_and_metrics_recorded(smoke_run):
    config, _, state, _, _ = smoke_run
    assert state.step == 2 and state.resumed_from is None
    assert (state.checkpoint_dir / "actor" / "2").is_dir()
    steps = [h["step"] for h in state.history]
    assert steps == [1, 2]
    for key in ("reward", "loss", "kl", "learning_rate", "completion_length",
                "rewards/format_exact", "rewards/answer_match"):
        assert key in state.history[-1], key


def test_export_reloads_to_identical_logits(smoke_run):
    config, session, state, _, _ = smoke_run
    path = export_checkpoint(config, state)
    assert {p.name for p in path.iterdir()} >= {"adapter.safetensors", "config.yaml",
                                                "metrics.json", "README.md"}
    fresh = load_model(config.model, seed=config.seed)
    reloaded = load_lora_export(path, fresh)
    text = ["Calculate 3 + 4. <reasoning>3 plus 4</reasoning><answer>7</answer>"]
    trained = token_logprobs(session.loaded, text, model=state.lora_model)[0]
    again = token_logprobs(fresh, text, model=reloaded)[0]
    np.testing.assert_allclose(trained, again, rtol=0, atol=1e-5)
    base = token_logprobs(fresh, text)[0]
    assert np.abs(trained - base).max() > 1e-6  # the adapters do change the model


def test_evaluating_the_run_dir_uses_its_checkpoint(smoke_run, tmp_path):
    """``evaluate(lora=RUN_DIR)`` reads the latest checkpoint: same completions as its export."""
    import json

    from jaxpost.evaluate import evaluate

    config, session, state, _, _ = smoke_run
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                            + "\n" for i in range(2)))
    kwargs = dict(data=f"jsonl:{data}", num_examples=2, max_new_tokens=6, batch_size=2,
                  loaded=session.loaded)
    from_run = evaluate(lora=config.output_dir, **kwargs)
    from_export = evaluate(lora=export_checkpoint(config, state), **kwargs)
    assert from_run.settings["checkpoint_step"] == state.step == 2
    completions = [e["completions"] for e in from_run.examples]
    assert completions == [e["completions"] for e in from_export.examples]
    base = evaluate(lora=None, **kwargs)
    assert completions != [e["completions"] for e in base.examples]


def test_resume_continues_from_latest_checkpoint(smoke_run, capsys):
    config, session, _, _, _ = smoke_run
    longer = dataclasses.replace(config, max_steps=3)
    with pytest.raises(ValueError, match="needs 3"):
        train_grpo(longer, session)  # its data was prepared for 2 steps
    state = train_grpo(longer, prepare_colab_session(longer))
    out = capsys.readouterr().out
    assert "resuming from checkpoint step 2" in out
    assert state.resumed_from == 2 and state.step == 3
    assert (state.checkpoint_dir / "actor" / "3").is_dir()
    assert [h["step"] for h in state.history] == [1, 2, 3]


def test_resume_steps_past_an_unreadable_checkpoint(smoke_run, tmp_path, capsys):
    """GRPO's rerun moves a corrupt newest checkpoint aside and resumes from the one before
    (Tunix's cluster would otherwise stop on Orbax's error on every rerun)."""
    from jaxpost.checkpoints import latest_step
    from jaxpost.rundir import RunDir

    config = smoke_run[0]
    out = tmp_path / "run"
    shutil.copytree(config.output_dir, out)
    ckpt = RunDir(out).grpo_checkpoint_dir
    newest = latest_step(ckpt)
    (ckpt / str(newest) / "model_params" / "_sharding").write_text("{not json")
    again = dataclasses.replace(config, output_dir=str(out), max_steps=newest)
    state = train_grpo(again, prepare_colab_session(again))
    captured = capsys.readouterr()
    assert f"checkpoint step {newest} in {ckpt} cannot be read" in captured.err
    assert f"resuming from checkpoint step {newest - 1}" in captured.out
    assert state.resumed_from == newest - 1 and state.step == newest
    assert [p.name.rsplit("-", 1)[0] for p in RunDir(out).unreadable_dir.iterdir()] == [
        f"actor-{newest}"]


def test_export_reads_a_moved_run_where_it_lies(smoke_run, tmp_path, monkeypatch):
    """``jaxpost export DIR`` reads DIR, not the output_dir its config.yaml records, and
    writes one directory per format and type inside it."""
    from jaxpost import cli
    from jaxpost.checkpoints import latest_step
    from jaxpost.config import save_yaml
    from jaxpost.rundir import RunDir

    config = smoke_run[0]
    moved = tmp_path / "moved"
    shutil.copytree(config.output_dir, moved, ignore=shutil.ignore_patterns("export*"))
    # Trained with the default, relative output_dir; the current directory has its own.
    save_yaml(dataclasses.replace(config, output_dir="runs/default"), str(moved / "config.yaml"))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "runs" / "default").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert cli.main(["export", "../moved", "--format", "peft"]) == 0
    export = json.loads((moved / "export" / "metrics.json").read_text())
    assert export["step"] == latest_step(RunDir(moved).grpo_checkpoint_dir)
    assert (moved / "export-peft" / "adapter_model.safetensors").is_file()
    assert list((elsewhere / "runs" / "default").iterdir()) == []
    # One directory per GGUF type: a q8_0 export leaves the f16 one in place.
    assert cli.main(["export", "../moved", "--format", "gguf"]) == 0
    assert cli.main(["export", "../moved", "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    assert (moved / "export-gguf-f16" / "model-f16.gguf").is_file()
    assert (moved / "export-gguf-q8_0" / "model-q8_0.gguf").is_file()


def test_quick_test_answers(smoke_run):
    config, session, state, _, _ = smoke_run
    answer = quick_test(config, session, "Calculate 1 + 1.", trainer_state=state)
    assert isinstance(answer, str)


def test_cli_train_then_resume(tmp_path):
    """The acceptance commands: two steps, then three with the same (relative) output_dir."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxpost.cli", "train", "--preset", "smoke",
           "--set", "output_dir=run"]
    first = subprocess.run(cmd + ["--set", "max_steps=2"], capture_output=True, text=True,
                           timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "mean reward of the first steps" in first.stdout
    second = subprocess.run(cmd + ["--set", "max_steps=3"], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint step 2" in second.stdout
    assert (out / "checkpoints" / "actor" / "3").is_dir()
    assert (out / "export" / "adapter.safetensors").is_file()


def test_bad_config_fails_before_loading_anything():
    with pytest.raises(ValueError, match="num_generations"):
        ColabTrainingConfig(num_generations=1)
    r = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", "--set", "learnig_rate=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "did you mean 'learning_rate'" in r.stderr
