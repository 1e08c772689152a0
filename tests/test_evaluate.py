"""Evaluation: scoring and pass@k on hand-written completions, reports, CLI, and a
tiny-model run of evaluate/compare; training-curve plots from a hand-written metrics file."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from jaxpost.cli import main
from jaxpost.evaluate import (
    Comparison,
    EvalReport,
    aggregate,
    compare,
    comparison_table,
    evaluate,
    examples_path,
    pass_at_k,
    score_completions,
)

GOOD = "<reasoning>6 times 7 is 42</reasoning><answer>42</answer>"
CLOSE = "<reasoning>about 40</reasoning>\n<answer>40</answer><end_of_turn>"
UNTAGGED = "The answer is 42."


# ---------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),
    (5, 5, 1, 1.0),
    (5, 2, 1, 0.4),                      # c / n
    (5, 2, 2, 1 - 3 / 10),               # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),            # 1 - C(7,5)/C(10,5)
    (4, 3, 2, 1.0),                      # n - c < k: every draw of 2 holds a correct one
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 4, 1), (3, 1, 0), (2, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------
# Scoring and aggregation


def test_score_completions_on_hand_written_completions():
    example = {"question": "What is 6 * 7?", "answer": "42"}
    record = score_completions(example, [GOOD, CLOSE, UNTAGGED])
    assert record["answer_reward"] == "answer_match"
    assert record["extracted"] == ["42", "40", None]
    assert record["correct"] == [True, False, False]
    assert record["format"] == [1.0, 1.0, 0.0]          # the end marker is ignored
    assert record["partial_credit"] == [1.0, 0.5, 0.0]  # 40 is within 10% of 42
    assert record["pass@1"] == pytest.approx(1 / 3)
    assert "tokens" not in record


def test_score_completions_uses_the_reasoning_gym_verifier():
    from jaxpost.data.datasets import load_examples

    [example] = load_examples("reasoning-gym:basic_arithmetic#min_terms=2&max_terms=2"
                              "&min_digits=1&max_digits=1&operators=+", seed=3, max_examples=1)
    right = f"<reasoning>add</reasoning><answer>{example['answer']}</answer>"
    wrong = f"<reasoning>add</reasoning><answer>{int(example['answer']) + 1}</answer>"
    record = score_completions(example, [right, wrong], k=2)
    assert record["answer_reward"] == "reasoning_gym"
    assert record["correct"] == [True, False]
    assert record["pass@2"] == 1.0


def test_score_completions_counts_an_echo_as_unformatted_given_the_prompt():
    from jaxpost.config import ColabTrainingConfig
    from jaxpost.data.prompts import format_prompt

    example = {"question": "Calculate 4 - 1.", "answer": "3"}
    prompt = format_prompt(example["question"], ColabTrainingConfig(), template="gemma")
    echo = ("<reasoning>You are given a problem. Think about it step by step and write your "
            "reasoning</reasoning><answer>3</answer>")
    answer = "<reasoning>4 - 1 = 3</reasoning><answer>3</answer>"
    assert score_completions(example, [echo, answer])["format"] == [1.0, 1.0]
    record = score_completions(example, [echo, answer], prompt=prompt)
    assert record["format"] == [0.0, 1.0]
    assert record["correct"] == [True, True]  # correctness does not look at the prompt


def test_aggregate_weighs_each_example_once():
    example = {"question": "q", "answer": "42"}
    two = score_completions(example, [GOOD, UNTAGGED])   # correct 1 of 2
    one = score_completions(example, [GOOD])             # correct 1 of 1
    metrics = aggregate([two, one])
    assert metrics["accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # not 2/3
    assert metrics["format_rate"] == pytest.approx(0.75)
    assert metrics["pass@1"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no examples"):
        aggregate([])


def test_token_counts_and_truncation(embedded_tokenizer):
    example = {"question": "q", "answer": "42"}
    record = score_completions(example, [GOOD, "one two"], tokenizer=embedded_tokenizer,
                               max_new_tokens=5)
    n_good = len(embedded_tokenizer.encode(GOOD)) - 1  # without BOS
    assert record["tokens"][0] == n_good > 5
    assert record["truncated"] == [True, False]
    metrics = aggregate([record])
    assert metrics["mean_completion_tokens"] == pytest.approx((n_good + record["tokens"][1]) / 2)
    assert metrics["truncated_rate"] == 0.5


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from jaxpost.models.loading import embedded_model_dir, load_sentencepiece

    return load_sentencepiece(embedded_model_dir(show_progress=False) / "tokenizer.model")


# ---------------------------------------------------------------------------
# Reports and files


def _report(label, correct_first):
    example = {"question": "What is 6 * 7?", "answer": "42"}
    record = score_completions(example, [GOOD if correct_first else UNTAGGED])
    records = [{"index": 0, "prompt": "p", **record}]
    return EvalReport(label, {"data": "jsonl:x"}, aggregate(records), records, 1.0)


def test_examples_path_sits_beside_the_summary():
    assert examples_path("out/eval.json").as_posix() == "out/eval.jsonl"
    assert examples_path("results").as_posix() == "results.jsonl"
    with pytest.raises(ValueError, match="ends in .jsonl"):
        examples_path("eval.jsonl")


def test_report_writes_summary_and_examples(tmp_path):
    report = _report("base", True)
    summary, jsonl = report.write(tmp_path / "sub" / "eval.json")
    data = json.loads(summary.read_text())
    assert data["metrics"]["accuracy"] == 1.0 and data["examples_file"] == "eval.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["completions"] == [GOOD] and rows[0]["reference"] == "42"
    assert sorted(p.name for p in summary.parent.iterdir()) == ["eval.json", "eval.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert summary.stat().st_mode & 0o777 == 0o666 & ~umask


def test_comparison_table_and_files(tmp_path):
    comparison = Comparison(_report("base", False), _report("trained", True))
    table = comparison.table()
    assert table == comparison_table(comparison.a, comparison.b)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["metric", "A: base", "B: trained", "delta"]
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert [c.strip() for c in accuracy.split(" | ")][1:] == ["0.000", "1.000", "+1.000"]
    summary, jsonl = comparison.write(tmp_path / "cmp.json")
    assert json.loads(summary.read_text())["delta"]["format_rate"] == 1.0
    [row] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert row["a"]["completions"] == [UNTAGGED] and row["b"]["completions"] == [GOOD]
    assert row["question"] == "What is 6 * 7?"


# ---------------------------------------------------------------------------
# Argument errors, raised before any model is loaded


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--data", "bogus:x"], "unknown dataset kind"),
    (["--data", "gsm8k:/nonexistent/test.jsonl"], "not found"),
    (["--lora", "/nonexistent/run"], "not a directory"),
    (["--num-examples", "0"], "num_examples=0"),
    (["--k", "2", "--temperature", "0"], "temperature=0"),
    (["--k", "3", "--num-samples", "2"], "num_samples=2"),
    (["--out", "x.jsonl"], "ends in .jsonl"),
])
def test_eval_cli_reports_bad_arguments(qa_file, tmp_path, capsys, extra, message):
    args = ["eval", "--model", "random:gemma3-tiny", "--data", f"jsonl:{qa_file}",
            "--num-examples", "2", "--out", str(tmp_path / "e.json")] + extra
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "jaxpost eval: error:" in err and message in err
    assert not (tmp_path / "e.json").exists()


def test_eval_rejects_a_directory_that_is_neither_export_nor_run(qa_file, tmp_path):
    with pytest.raises(ValueError, match="neither adapter.safetensors"):
        evaluate("random:gemma3-tiny", lora=tmp_path, data=f"jsonl:{qa_file}", num_examples=1)
    (tmp_path / "config.yaml").write_text("model: random:gemma3-tiny\n")
    with pytest.raises(ValueError, match="without a finished checkpoint"):
        evaluate("random:gemma3-tiny", lora=tmp_path, data=f"jsonl:{qa_file}", num_examples=1)
    with pytest.raises(ValueError, match="both the base model"):
        compare("random:gemma3-tiny", lora_b="base", data=f"jsonl:{qa_file}", num_examples=1)


# ---------------------------------------------------------------------------
# The tiny random model end to end


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A LoRA export for random:gemma3-tiny with non-zero adapters."""
    from jaxpost.config import get_preset
    from jaxpost.export import export_lora, lora_arrays, set_lora_arrays
    from jaxpost.models.lora import apply_lora
    from jaxpost.models.loading import load_model

    out = tmp_path_factory.mktemp("tiny_export")
    config = dataclasses.replace(get_preset("smoke"), output_dir=str(out / "run"))
    loaded = load_model(config.model, seed=config.seed, show_progress=False)
    model = apply_lora(loaded.model, loaded.mesh, rank=config.lora_rank,
                       alpha=config.lora_alpha, target_modules=config.lora_target_modules)
    rng = np.random.default_rng(0)
    set_lora_arrays(model, {k: rng.normal(0, 0.5, v.shape).astype(v.dtype)
                            for k, v in lora_arrays(model).items()})
    return export_lora(model, config, out / "export")


def test_evaluate_and_compare_with_the_tiny_model(qa_file, tiny_export, tmp_path, capsys):
    from jaxpost.models.loading import load_model

    data = f"jsonl:{qa_file}"
    # The base weights the export was trained on: a random model's weights follow its seed.
    loaded = load_model("random:gemma3-tiny", seed=42, show_progress=False)
    base = evaluate("random:gemma3-tiny", data=data, num_examples=3, max_new_tokens=4,
                    batch_size=2, out=tmp_path / "base.json", loaded=loaded)
    assert len(base.examples) == 3 and base.settings["lora"] is None
    assert all(len(r["completions"]) == 1 for r in base.examples)
    assert set(base.metrics) >= {"accuracy", "format_rate", "partial_credit", "pass@1",
                                 "mean_completion_tokens", "truncated_rate"}
    # The default prompt: the system prompt inside Gemma's user turn.
    assert base.examples[0]["prompt"].startswith("<start_of_turn>user\nYou are given a problem.")
    assert len((tmp_path / "base.jsonl").read_text().splitlines()) == 3

    # The CLI: base (A) against the export (B), on the same examples and seeds.
    assert main(["eval", "--data", data, "--num-examples", "3", "--max-new-tokens", "4",
                 "--batch-size", "2", "--compare", str(tiny_export),
                 "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "A: base" in printed and f"B: {tiny_export}" in printed and "delta" in printed
    summary = json.loads((tmp_path / "cmp.json").read_text())
    assert summary["a"]["settings"]["model"] == "random:gemma3-tiny"  # from the export
    assert summary["b"]["settings"]["lora_kind"] == "export"
    rows = [json.loads(x) for x in (tmp_path / "cmp.jsonl").read_text().splitlines()]
    # Greedy decoding: the base side reproduces the plain evaluation exactly.
    assert [r["a"]["completions"] for r in rows] == [r["completions"] for r in base.examples]


def test_pass_at_k_sampling_draws_n_completions(qa_file, tiny_export):
    report = evaluate(lora=tiny_export, data=f"jsonl:{qa_file}", num_examples=2, k=2,
                      num_samples=3, max_new_tokens=3, batch_size=4, seed=1)
    assert report.settings["temperature"] == 0.8 and report.settings["num_samples"] == 3
    assert all(len(r["completions"]) == 3 for r in report.examples)
    assert "pass@2" in report.metrics


# ---------------------------------------------------------------------------
# Training curves


def _write_metrics(run_dir):
    lines = []
    for step in (1, 2, 3):
        for name, value in (("reward", 0.1 * step), ("rewards/format_exact", 0.05 * step),
                            ("rewards/answer_match", 0.02 * step), ("kl", 0.001 * step),
                            ("loss", 0.5 / step), ("completion_length", 60 - step)):
            lines.append(json.dumps({"step": step, "name": name, "value": value}))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_cli_writes_a_png_with_per_reward_curves(tmp_path, capsys):
    from jaxpost.plots import training_figure

    run = tmp_path / "run"
    _write_metrics(run)
    png = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out
    reward_panel = training_figure(run).axes[0]
    assert reward_panel.get_legend_handles_labels()[1] == ["answer_match", "format_exact", "total"]


def test_plot_cli_without_metrics_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Weights & Biases


def test_wandb_requested_without_the_package_is_a_clear_error(monkeypatch):
    from jaxpost.config import ColabTrainingConfig, apply_overrides
    from jaxpost.train import start_wandb

    assert start_wandb(ColabTrainingConfig()) is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    config = apply_overrides(ColabTrainingConfig(), ["wandb_project=my-runs"])
    with pytest.raises(ValueError, match="wandb_project='my-runs' needs the wandb package"):
        start_wandb(config)
    with pytest.raises(ValueError, match="wandb_project"):
        ColabTrainingConfig(wandb_project=" ")


def test_metrics_recorder_forwards_each_value_to_a_wandb_run(tmp_path):
    from jaxpost.train import MetricsRecorder

    class Run:  # the two calls the recorder makes on a wandb run
        def __init__(self):
            self.logged = []

        def log(self, data):
            self.logged.append(data)

    run = Run()
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", total_steps=2, log_every=1,
                               wandb_run=run)
    recorder.log_scalar("rewards/train/format_exact", 0.5, step=0)  # rollout: step + 1
    recorder.log_scalar("actor/train/loss", 0.25, step=1)
    recorder.log_scalar("actor/train/loss", 0.25, step=1)  # repeated by a second logger
    recorder.close()
    assert run.logged[0] == {"step": 1, "rewards/format_exact": 0.5}
    assert {"step": 1, "loss": 0.25} in run.logged
    assert sum("loss" in x for x in run.logged) == 1


def test_metrics_recorder_logs_the_learning_rate_without_compiling_per_step(tmp_path):
    """Each step's learning rate is the schedule's value for it, and logging a step
    compiles nothing (in training, each step's eager schedule call compiled again)."""
    import jax.monitoring
    import optax

    from jaxpost.train import MetricsRecorder

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10, 1e-5)
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", total_steps=4, log_every=1,
                               schedule=schedule)
    compiles = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        recorder.log_scalar("actor/train/loss", 0.5, step=1)
        compiles.clear()
        for step in (2, 3, 4):
            recorder.log_scalar("actor/train/loss", 0.5, step=step)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        recorder.close()
    assert compiles == []
    rates = [row["learning_rate"] for row in recorder.history()]
    np.testing.assert_allclose(rates, [float(schedule(s)) for s in range(4)], rtol=1e-6)
    assert rates[0] == 0.0 and rates[2] == pytest.approx(1e-3)
