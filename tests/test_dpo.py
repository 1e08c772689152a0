"""DPO: jaxpost's chunked loss equals Tunix's, pairs are tokenized in Tunix's layout, the
preference margin rises from 0 (the reference is the policy the stage starts from), and
`jaxpost train --set algorithm=dpo` runs and resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.sft.dpo import dpo_trainer

from jaxpost.config import get_preset
from jaxpost.dpo import preference_batches, tokenize_pairs
from jaxpost.models.lora import apply_lora
from jaxpost.models.loading import load_model
from jaxpost.data.preferences import PreferencePair
from jaxpost.tunix_ext import checkpointing, losses, trainers


@pytest.fixture(scope="module")
def policy_and_reference():
    """A LoRA policy whose adapters are non-zero, and its reference: the same model
    before that change (a frozen copy sharing the base weights)."""
    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    reference = trainers.frozen_copy(model)
    state = nnx.state(model, nnx.LoRAParam)
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         state)
    nnx.update(model, noisy)
    return loaded, model, reference


def _batch(loaded, pairs=3, prompt_len=8, comp_len=6):
    """Tunix's tokenized DPO input: prompts left-padded, completions right-padded (pad 0)."""
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.num_embed
    prompt = rng.integers(10, vocab, (pairs, prompt_len)).astype(np.int32)
    prompt[0, :3] = 0
    chosen = rng.integers(10, vocab, (pairs, comp_len)).astype(np.int32)
    chosen[1, 4:] = 0
    rejected = rng.integers(10, vocab, (pairs, comp_len)).astype(np.int32)
    rejected[2, 2:] = 0
    return {"prompt_ids": prompt, "prompt_mask": (prompt != 0).astype(np.int32),
            "chosen_ids": chosen, "chosen_mask": (chosen != 0).astype(np.int32),
            "rejected_ids": rejected, "rejected_mask": (rejected != 0).astype(np.int32)}


@pytest.fixture(scope="module")
def trainer(policy_and_reference, tmp_path_factory):
    loaded, model, reference = policy_and_reference
    out = tmp_path_factory.mktemp("dpo_trainer")
    return trainers.build_dpo_trainer(
        model, reference, optax.sgd(0.0), beta=0.1, pad_id=0,
        checkpoint_dir=str(out / "ckpt"), tensorboard_dir=str(out / "tb"), max_steps=1,
        save_interval_steps=1, max_to_keep=1, metric_backends=[])


def test_chunked_reference_pass_equals_tunix(policy_and_reference, trainer):
    loaded, _, _ = policy_and_reference
    assert trainer.chunked
    batch = _batch(loaded)
    ours = trainer._prepare_inputs(batch)
    tunix = dpo_trainer.DPOTrainer._prepare_inputs(trainer, batch)
    for name in ("input_ids", "positions", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, name)),
                                      np.asarray(getattr(tunix, name)), err_msg=name)
    assert ours.logits_to_keep == tunix.logits_to_keep == 6
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(np.asarray(getattr(ours, name)),
                                   np.asarray(getattr(tunix, name)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_chunked_loss_equals_tunix_in_value_and_gradient(policy_and_reference, trainer,
                                                         beta, label_smoothing):
    loaded, model, _ = policy_and_reference
    example = trainer._prepare_inputs(_batch(loaded))

    def loss_and_grad(fn):
        # As Tunix's trainer differentiates its loss: with respect to the LoRA weights.
        grad_fn = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, nnx.LoRAParam),
                                     has_aux=True)
        return grad_fn(model, example, algorithm="dpo", beta=beta,
                       label_smoothing=label_smoothing)

    def chunked(model, train_example, algorithm, beta, label_smoothing):
        return losses.dpo_loss_chunked(model, train_example, algorithm, beta,
                                       label_smoothing, pad_id=0)

    (ours, our_aux), our_grads = loss_and_grad(chunked)
    (tunix, tunix_aux), tunix_grads = loss_and_grad(dpo_trainer.dpo_loss_fn)
    assert float(ours) == pytest.approx(float(tunix), rel=1e-4, abs=1e-6)
    # The policy differs from its reference, so the loss is not DPO's starting log 2.
    assert abs(float(tunix) - math.log(2)) > 1e-3
    assert set(our_aux) == set(tunix_aux)
    for key in tunix_aux:
        assert float(our_aux[key]) == pytest.approx(float(tunix_aux[key]), rel=1e-4,
                                                    abs=1e-5), key
    tunix_leaves = jax.tree.leaves(tunix_grads)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in tunix_leaves)
    for a, b in zip(jax.tree.leaves(our_grads), tunix_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def test_frozen_copy_keeps_the_weights_it_was_taken_with(policy_and_reference):
    loaded, model, reference = policy_and_reference
    policy_lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    reference_lora = jax.tree.leaves(nnx.state(reference, nnx.LoRAParam))
    assert any(not np.array_equal(a, b) for a, b in zip(policy_lora, reference_lora))
    # The base weights are the same buffers: no second copy of the model.
    def base(m):
        return jax.tree.leaves(nnx.split(m, nnx.LoRAParam, ...)[2])

    assert len(base(model)) == len(base(reference)) > 0
    assert all(a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
               for a, b in zip(base(model), base(reference)))


class _Tokenizer:
    def encode(self, text):
        return [1] + [ord(c) for c in text]

    def bos_id(self):
        return 1


def test_pairs_tokenized_in_tunix_dpo_layout():
    pairs = [PreferencePair("q", "ab", "c"),
             PreferencePair("qq", "x", "y", chosen_ids=(5, 6, 9), rejected_ids=(7,),
                            prompt="<qq!>"),
             PreferencePair("long" * 20, "a", "b"),
             PreferencePair("z", "same" * 5 + "A", "same" * 5 + "B"),
             PreferencePair("p", "a", "b", rejected_ids=(0, 4))]
    data = tokenize_pairs(pairs, _Tokenizer(), lambda q: f"<{q}>", end_id=9, pad_id=0,
                          max_prompt_length=16, max_completion_length=8)
    # Left out: the long prompt, "same..." (equal within 8 tokens), the padding token.
    assert (len(data), data.skipped, data.truncated) == (2, 3, 1)
    assert data.prompt_ids.shape == (2, 8) and data.chosen_ids.shape == (2, 8)
    assert data.prompt_ids[0].tolist() == [0, 0, 0, 0, 1, ord("<"), ord("q"), ord(">")]
    assert data.prompt_ids[1].tolist()[-6:] == [1] + [ord(c) for c in "<qq!>"]
    assert data.chosen_ids[0, :3].tolist() == [ord("a"), ord("b"), 9]
    assert data.rejected_ids[0, :2].tolist() == [ord("c"), 9]
    assert data.chosen_ids[1, :3].tolist() == [5, 6, 9] and data.rejected_ids[1, 0] == 7
    for ids, mask in ((data.prompt_ids, data.prompt_mask), (data.chosen_ids, data.chosen_mask),
                      (data.rejected_ids, data.rejected_mask)):
        np.testing.assert_array_equal(mask, ids != 0)
    first = preference_batches(data, batch_size=3, steps=2, seed=0)
    again = preference_batches(data, batch_size=3, steps=2, seed=0)
    assert len(first) == 2 and first[0]["chosen_ids"].shape == (3, 8)
    assert set(first[0]) == {"prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask",
                             "rejected_ids", "rejected_mask"}
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    with pytest.raises(ValueError, match="none of the 1 preference pairs is usable"):
        tokenize_pairs(pairs[2:3], _Tokenizer(), lambda q: q, end_id=9, pad_id=0,
                       max_prompt_length=8, max_completion_length=8)


def _lora(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def test_margin_rises_from_zero_after_an_sft_warm_up(tmp_path):
    """Two SFT steps, then twelve DPO steps of 4 pairs on 8 hand-written pairs (an answer
    in the format against a plain sentence). The reference is the warmed policy, so
    DPO's first step has margin 0 and loss log 2 although the warm-up moved the
    adapters; then the margin and the share of pairs ranked right rise. Measured on a
    shared 2-core CPU: margin 0 -> 0.34 (mean of the last 3 steps), accuracy 0 -> 1.0
    from step 4 on; 45 s."""
    from jaxpost.colab_pipeline import prepare_colab_session, train_dpo, train_sft

    rows = [{"question": f"Calculate {a} + {b}.",
             "chosen": f"<reasoning>{a} + {b} = {a + b}</reasoning>\n<answer>{a + b}</answer>",
             "rejected": f"The sum is {a + b}."}
            for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (5, 3), (8, 1)]]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(
        get_preset("smoke"), output_dir=str(tmp_path / "run"), algorithm="dpo",
        preference_data=f"preference-jsonl:{path}", sft_steps=2, sft_batch_size=4,
        sft_learning_rate=1e-2, max_steps=12, batch_size=4, learning_rate=2e-2,
        warmup_ratio=0.25, max_grad_norm=1.0, max_new_tokens=32, save_interval_steps=100,
        final_eval_examples=0)
    session = prepare_colab_session(config)
    assert len(session.preferences) == 8
    base = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(session.loaded.model,
                                                                       nnx.Param))]
    initial = _lora(session.lora_model)
    train_sft(config, session)
    warmed = _lora(session.lora_model)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, warmed))
    state = train_dpo(config, session)
    rows = [h for h in state.history if "dpo/loss" in h]
    assert [h["step"] for h in rows] == list(range(1, 13))
    margins = [h["dpo/rewards/margin"] for h in rows]
    accuracy = [h["dpo/rewards/accuracy"] for h in rows]
    print("margin by step:", [round(m, 4) for m in margins], "accuracy:", accuracy)
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and accuracy[0] == 0.0
    assert np.mean(margins[-3:]) > 0.2, margins
    assert min(accuracy[-3:]) == 1.0, accuracy
    assert any(not np.array_equal(a, b) for a, b in zip(warmed, _lora(session.lora_model)))
    after = jax.tree.leaves(nnx.state(session.loaded.model, nnx.Param))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(base, after))
    ckpt = checkpointing.final_checkpoint_dir(config.checkpoint_dir)
    assert ckpt == checkpointing.dpo_checkpoint_dir(config.checkpoint_dir)
    assert checkpointing.latest_checkpoint_step(ckpt) == 12 == state.step


def test_self_pairs_need_samples_that_score_differently(tmp_path):
    """The random model's samples all score 0: "self" finds no preference and says what
    to change, where "self+demonstrations" pairs each demonstration with a sample."""
    from jaxpost.colab_pipeline import prepare_colab_session
    from jaxpost.data.demonstrations import load_demonstrations
    from jaxpost.dpo import sample_self_pairs
    from jaxpost.train import train_grpo

    config = dataclasses.replace(get_preset("smoke"), output_dir=str(tmp_path),
                                 algorithm="dpo", preference_data="self", num_batches=1)
    session = prepare_colab_session(config)
    with pytest.raises(ValueError, match="all 2 groups of 2 samples scored the same"):
        sample_self_pairs(config, session, end_id=1)
    with pytest.raises(ValueError, match="trained by jaxpost.dpo.train_dpo"):
        train_grpo(config, session)
    with_demos = dataclasses.replace(config, preference_data="self+demonstrations")
    session.demonstrations = load_demonstrations(
        "auto", dataset=config.dataset, seed=config.seed, max_examples=config.max_examples)
    pairs, summary = sample_self_pairs(with_demos, session, end_id=1)
    assert len(pairs) == 2 and "2 chosen are demonstrations" in summary
    assert all(p.chosen_score > p.rejected_score == 0.0 for p in pairs)
    assert all(p.chosen_ids is None and p.rejected_ids is not None for p in pairs)


def test_cli_dpo_train_then_resume(tmp_path):
    """`jaxpost train --preset smoke --set algorithm=dpo`: two steps, then three."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxpost.cli", "train", "--preset", "smoke",
           "--set", "algorithm=dpo", "--set", "output_dir=run"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DPO starting: 2 steps of 2 pairs" in first.stdout
    assert "DPO sequence log-probs: jaxpost's chunked log-probs" in first.stdout
    assert "DPO pairs ranked right 0.00 -> " in first.stdout
    second = subprocess.run(cmd + ["--set", "max_steps=3"], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming DPO from checkpoint step 2" in second.stdout
    assert "DPO step 3/3" in second.stdout and "DPO step 2/" not in second.stdout
    assert (out / "checkpoints" / "dpo" / "3").is_dir()
    assert not (out / "checkpoints" / "actor").exists()
    assert (out / "export" / "adapter.safetensors").is_file()
    assert json.loads((out / "export" / "metrics.json").read_text())["step"] == 3
    from jaxpost.train import read_metrics

    assert [r["step"] for r in read_metrics(out) if "dpo/loss" in r] == [1, 2, 3]
    pairs = [json.loads(line) for line in (out / "preference_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_metrics_recorder_keeps_the_dpo_stage_and_reports_its_margin(tmp_path, capsys):
    from jaxpost.train import MetricsRecorder, TrainingDiverged, read_metrics

    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", total_steps=2, log_every=1,
                               stage="dpo")
    recorder.log_scalar("sft/train/loss", 3.0, step=1)  # the warm-up's, not DPO's
    recorder.log_scalar("actor/train/loss", 2.0, step=1)  # GRPO's
    recorder.log_scalar("dpo/train/loss", 0.69, step=1)
    assert capsys.readouterr().out == ""  # Tunix logs the implicit rewards after the loss
    recorder.log_scalar("dpo/train/rewards/margin", 0.125, step=1)
    recorder.log_scalar("dpo/train/rewards/accuracy", 0.75, step=1)
    recorder.log_scalar("dpo/train/log_probs/chosen", -12.5, step=1)
    line = capsys.readouterr().out
    assert line.startswith("jaxpost: DPO step 1/2 | loss 0.6900 | margin 0.1250 | "
                           "accuracy 0.75"), line
    with pytest.raises(TrainingDiverged, match="dpo/loss became nan at step 2"):
        recorder.log_scalar("dpo/train/loss", float("nan"), step=2)
    recorder.close()
    assert read_metrics(tmp_path) == [{"step": 1, "dpo/loss": 0.69, "dpo/step_seconds":
                                       pytest.approx(0.0, abs=60), "dpo/rewards/margin": 0.125,
                                       "dpo/rewards/accuracy": 0.75,
                                       "dpo/log_probs/chosen": -12.5}]


def test_training_curves_of_a_dpo_run_show_its_margin_and_accuracy(tmp_path):
    from jaxpost.plots import training_figure

    lines = [json.dumps({"step": 1, "name": "sft/loss", "value": 2.0})]
    for step in (1, 2, 3):
        for name, value in (("dpo/loss", 0.69 - 0.01 * step),
                            ("dpo/rewards/margin", 0.1 * (step - 1)),
                            ("dpo/rewards/accuracy", 0.5 * (step > 1))):
            lines.append(json.dumps({"step": step, "name": name, "value": value}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    fig = training_figure(tmp_path)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == ["DPO implicit reward margin (chosen - rejected)",
                          "DPO pairs ranked right", "DPO loss"]
    margin = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(margin, [0.0, 0.1, 0.2])
    assert fig.get_suptitle().endswith("1 SFT steps, 3 DPO steps")
