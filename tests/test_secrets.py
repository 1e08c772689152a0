"""No secret in anything a run prints or writes: logs, config, checkpoints, exports, events."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxpost.colab_pipeline import resolve_credentials, run_full_pipeline
from jaxpost.config import get_preset
from jaxpost.plots import plot_training_curves

HF_SECRET = "hf_SECRETjaxpost123"
KAGGLE_SECRET = "kaggleSECRETjaxpost456"


def files_containing(root: Path, secrets: list[str]) -> list[str]:
    """Every file under ``root`` whose bytes contain one of ``secrets``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_the_scan_finds_a_planted_secret(tmp_path):
    """The check below is only as good as this scan; it must see through binary files."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "events.bin").write_bytes(b"\x00\x01" + HF_SECRET.encode() + b"\xff")
    (tmp_path / "clean.txt").write_text("nothing")
    assert files_containing(tmp_path, [HF_SECRET, KAGGLE_SECRET]) == [
        f"{tmp_path / 'a' / 'b' / 'events.bin'}: {HF_SECRET}"]


def test_smoke_run_never_prints_or_writes_a_secret(tmp_path, monkeypatch, capfd):
    for name in ("HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)  # recorded, so what the run exports is undone afterwards
    monkeypatch.setenv("KAGGLE_USERNAME", "jaxpost-test-user")
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_SECRET)
    out = tmp_path / "run"
    config = dataclasses.replace(get_preset("smoke"), output_dir=str(out), max_steps=1)

    credentials = resolve_credentials(hf_token=HF_SECRET)
    print(credentials, repr(credentials.hf_token), f"{credentials.kaggle_key}")  # masked
    _, state, export_path = run_full_pipeline(config, credentials=credentials)
    plot_training_curves(out)

    # The secrets did reach the hub clients (through the environment) ...
    import huggingface_hub

    assert huggingface_hub.get_token() == HF_SECRET
    assert os.environ["KAGGLE_KEY"] == KAGGLE_SECRET
    assert credentials.origins == {"HF_TOKEN": "explicit", "KAGGLE_USERNAME": "environment",
                                   "KAGGLE_KEY": "environment"}
    # ... and the run did print and write what it should ...
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "Credentials(HF_TOKEN=set (explicit)" in text
    assert "jaxpost quick test" in text and state.step == 1
    assert "local CPU x1" in text and "mesh fsdp=1 tp=1" in text and "LoRA" in text
    written = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert written >= {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "export",
                       "training_curves.png"}
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert (export_path / "adapter.safetensors").is_file()
    # ... without either secret in any of it.
    assert HF_SECRET not in text and KAGGLE_SECRET not in text
    assert files_containing(tmp_path, [HF_SECRET, KAGGLE_SECRET]) == []
