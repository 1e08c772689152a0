"""A rerun steps past a checkpoint that cannot be read, and a save cut short by a full
disk leaves the previous checkpoint readable (the SFT warm-up of the tiny model; GRPO's
resume goes through the same check, see test_pipeline_smoke)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxpost.checkpoints import finished_steps, resume_step, unreadable_reason
from jaxpost.colab_pipeline import prepare_colab_session, train_sft
from jaxpost.config import get_preset, save_yaml
from jaxpost.export import checkpoint_lora_arrays
from jaxpost.rundir import RunDir


def _config(out, **changes):
    settings = dict(output_dir=str(out), sft_steps=3, sft_batch_size=4, max_steps=0,
                    save_interval_steps=1, max_to_keep=10, max_new_tokens=32,
                    final_eval_examples=0, tensorboard=False)
    settings.update(changes)
    return dataclasses.replace(get_preset("smoke"), **settings)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished three-step warm-up (a checkpoint at every step) and its session."""
    config = _config(tmp_path_factory.mktemp("sft") / "run")
    session = prepare_colab_session(config)
    train_sft(config, session)
    assert finished_steps(RunDir(config.output_dir).sft_checkpoint_dir) == [1, 2, 3]
    return config, session


def _copy(config, tmp_path):
    """The run copied into ``tmp_path``, with its config pointing there."""
    out = tmp_path / "run"
    shutil.copytree(config.output_dir, out)
    return dataclasses.replace(config, output_dir=str(out)), RunDir(out).sft_checkpoint_dir


def _truncate_largest_array_file(step: Path) -> None:
    chunk = max((step / "model_params").rglob("ocdbt.process_0/d/*"),
                key=lambda p: p.stat().st_size)
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size // 2)


CORRUPTIONS = {
    "truncated array file": _truncate_largest_array_file,
    # The tracker's case: Orbax stops with "_sharding: Invalid JSON".
    "broken sharding metadata": lambda step: (step / "model_params" / "_sharding").write_text("{"),
    "broken tree metadata": lambda step: (step / "optimizer_state" / "_METADATA").write_text("{"),
    "missing array manifest": lambda step: (step / "model_params" / "manifest.ocdbt").unlink(),
    "missing optimizer state": lambda step: shutil.rmtree(step / "optimizer_state"),
}


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_rerun_moves_an_unreadable_newest_step_aside_and_resumes(sft_run, corruption, tmp_path,
                                                                 capsys):
    config, ckpt = _copy(sft_run[0], tmp_path)
    CORRUPTIONS[corruption](ckpt / "3")
    left = _files(ckpt / "3")
    assert unreadable_reason(ckpt / "3") is not None
    assert unreadable_reason(ckpt / "2") is None
    # A reader of the run (export, eval) takes step 2 and moves nothing.
    step, arrays = checkpoint_lora_arrays(ckpt)
    assert step == 2 and arrays and (ckpt / "3").is_dir()
    assert "checkpoint step 3" in capsys.readouterr().err

    state = train_sft(config, sft_run[1])
    err = capsys.readouterr().err
    assert state.resumed_from == 2 and state.step == 3 and len(state.losses) == 1
    assert f"checkpoint step 3 in {ckpt} cannot be read" in err
    [moved] = RunDir(config.output_dir).unreadable_dir.iterdir()
    assert moved.name.startswith("sft-3-") and str(moved) in err
    assert _files(moved) == left  # moved whole, nothing deleted
    assert finished_steps(ckpt) == [1, 2, 3] and unreadable_reason(ckpt / "3") is None


def test_every_unreadable_step_is_moved_and_training_starts_over(sft_run, tmp_path, capsys):
    config, ckpt = _copy(sft_run[0], tmp_path)
    for step in (1, 2, 3):
        (ckpt / str(step) / "model_params" / "_METADATA").write_text("")
    assert resume_step(ckpt) is None
    assert finished_steps(ckpt) == []
    moved = RunDir(config.output_dir).unreadable_dir.iterdir()
    assert sorted(p.name.rsplit("-", 1)[0] for p in moved) == ["sft-1", "sft-2", "sft-3"]
    assert capsys.readouterr().err.count("cannot be read") == 3


# Runs the warm-up, and lowers the process's file-size limit once step 1 is published,
# so that writing step 2's checkpoint fails as on a full disk (EFBIG instead of ENOSPC).
_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, time
    from pathlib import Path
    from jaxpost.tunix_ext import train_step
    from jaxpost.colab_pipeline import prepare_colab_session, train_sft
    from jaxpost.config import load_yaml

    config = load_yaml(sys.argv[1])
    step_1 = Path(config.checkpoint_dir).absolute() / "sft" / "1"
    update = train_step._LoraTrainStep.__call__
    calls = []

    def limited(self, inputs):
        calls.append(1)
        if len(calls) == 2:
            t0 = time.time()
            while not step_1.is_dir():  # Orbax publishes it in the background
                assert time.time() - t0 < 120, "step 1 was never published"
                time.sleep(0.05)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        return update(self, inputs)

    train_step._LoraTrainStep.__call__ = limited
    train_sft(config, prepare_colab_session(config))
""")


def test_a_save_cut_short_by_a_full_disk_leaves_the_previous_step(sft_run, tmp_path):
    config = dataclasses.replace(sft_run[0], output_dir=str(tmp_path / "run"))
    save_yaml(config, str(tmp_path / "config.yaml"))
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "config.yaml")],
                       capture_output=True, text=True, timeout=600)
    # Output goes to pipes, which the file-size limit does not cover.
    assert r.returncode != 0, r.stdout[-2000:]
    assert "orbax-checkpoint-tmp" in r.stderr and "File too large" in r.stderr, r.stderr[-3000:]
    ckpt = RunDir(config.output_dir).sft_checkpoint_dir
    assert finished_steps(ckpt) == [1] and unreadable_reason(ckpt / "1") is None

    state = train_sft(config, sft_run[1])
    assert state.resumed_from == 1 and state.step == 3
    assert finished_steps(ckpt) == [1, 2, 3]
