"""Platform detection, per-platform presets and defaults, and the output directory on Drive."""

from __future__ import annotations

import dataclasses
import os
import types

import pytest

from jaxpost.colab_pipeline import make_config
from jaxpost.config import PRESETS, get_preset
from jaxpost.runtime.platform import (
    PLATFORM_PRESETS,
    PlatformInfo,
    auto_config,
    detect_host,
    detect_platform,
    memory_defaults,
    mesh_defaults,
    resolve_output_dir,
)

GIB = 2**30
COLAB = {"COLAB_RELEASE_TAG": "release-colab_20260101-060000_RC00"}
KAGGLE = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}


def devices(platform: str, kind: str, n: int, gib: float | None):
    stats = {"bytes_limit": int(gib * GIB)} if gib else None
    return [types.SimpleNamespace(platform=platform, device_kind=kind,
                                  memory_stats=lambda: stats) for _ in range(n)]


@pytest.mark.parametrize("devs, env, name, preset, mesh", [
    (devices("tpu", "TPU v2", 8, 8), COLAB, "colab_tpu_v2_8", "colab_tpu", (2, 4)),
    (devices("tpu", "TPU v5 lite", 1, 16), COLAB, "colab_tpu_v5e1", "colab_tpu_v5e1", (1, 1)),
    (devices("tpu", "TPU v5 lite", 8, 16), KAGGLE, "kaggle_tpu_v5e8", "kaggle_tpu", (2, 4)),
    (devices("tpu", "TPU v4", 4, 32), {}, "tpu", "colab_tpu_v5e1", (1, 4)),
    (devices("gpu", "Tesla T4", 1, 15), COLAB, "gpu", "gpu", (1, 1)),
    (devices("gpu", "Tesla T4", 2, 15), KAGGLE, "gpu", "gpu", (2, 1)),
    (devices("cpu", "cpu", 1, None), {}, "cpu", "cpu", (None, 1)),
])
def test_detect_platform_names_the_preset_and_mesh(devs, env, name, preset, mesh):
    info = detect_platform(devs, environ=env)
    assert (info.name, info.preset) == (name, preset)
    assert mesh_defaults(info) == mesh
    config = auto_config(info)
    assert (config.mesh_fsdp, config.mesh_tp) == mesh
    # The mesh the chosen config asks for fits the devices found.
    assert config.mesh_fsdp is None or config.mesh_fsdp * config.mesh_tp == info.num_devices


def test_detect_host():
    assert detect_host(COLAB) == "colab"
    assert detect_host(KAGGLE) == "kaggle"
    assert detect_host({"HOME": "/root"}) == "local"


def test_describe_is_one_line_with_host_device_count_and_memory():
    info = detect_platform(devices("tpu", "TPU v5 lite", 1, 15.75), environ=COLAB)
    assert info.describe() == "Colab TPU v5 lite x1 (15.8 GiB each)"
    assert str(info) == ("Colab TPU v5 lite x1 (15.8 GiB each): platform colab_tpu_v5e1, "
                         "preset colab_tpu_v5e1")
    cpu = detect_platform(devices("cpu", "cpu", 1, None), environ={})
    assert cpu.memory_gib > 0  # host RAM, from psutil
    assert cpu.describe().startswith("local CPU x1 (") and cpu.describe().endswith(" GiB RAM)")


def test_real_devices_are_detected():
    info = detect_platform()
    assert info.kind in ("cpu", "gpu", "tpu") and info.num_devices >= 1
    assert info.name in PLATFORM_PRESETS


def test_every_platform_preset_exists_and_names_its_reproduce_command():
    for preset, _ in PLATFORM_PRESETS.values():
        assert preset in PRESETS
        assert f"jaxpost train --preset {preset}" in PRESETS[preset].__doc__
    assert get_preset("cpu") == get_preset("default")
    v5e1, v28 = get_preset("colab_tpu_v5e1"), get_preset("colab_tpu")
    assert (v5e1.mesh_fsdp, v5e1.mesh_tp, v28.mesh_fsdp, v28.mesh_tp) == (1, 1, 2, 4)
    assert dataclasses.replace(v5e1, mesh_fsdp=2, mesh_tp=4, output_dir=v28.output_dir) == v28
    gpu = get_preset("gpu")
    assert (gpu.mesh_fsdp, gpu.mesh_tp, gpu.max_new_tokens) == (1, 1, 512)


def _info(kind, gib, name, n=1):
    return PlatformInfo(kind=kind, device_kind="x", num_devices=n, memory_gib=gib,
                        host="local", name=name)


def test_memory_defaults_grow_batches_with_more_memory():
    gpu = get_preset("gpu")
    assert memory_defaults(_info("gpu", 15.0, "gpu"), gpu) == {}
    assert memory_defaults(_info("gpu", 11.0, "gpu"), gpu) == {}  # a T4 under XLA's 75%
    assert memory_defaults(_info("gpu", 40.0, "gpu"), gpu) == {"batch_size": 2}
    assert memory_defaults(_info("gpu", 80.0, "gpu"), gpu) == {"batch_size": 4}
    assert memory_defaults(_info("gpu", 1000.0, "gpu"), gpu) == {"batch_size": 8}
    kaggle = get_preset("kaggle_tpu")
    big = memory_defaults(_info("tpu", 32.0, "kaggle_tpu_v5e8", 8), kaggle)
    assert big == {"batch_size": 8, "mini_batch_size": 8}
    dataclasses.replace(kaggle, **big)  # still a valid config
    # A CPU is limited by time, not memory: no bigger batches.
    assert memory_defaults(_info("cpu", 64.0, "cpu"), get_preset("cpu")) == {}


def test_memory_defaults_shrink_the_token_budget_with_less_memory():
    gpu = get_preset("gpu")
    small = memory_defaults(_info("gpu", 7.5, "gpu"), gpu)
    assert small == {"max_new_tokens": 256}
    tiny = memory_defaults(_info("gpu", 1.0, "gpu"), gpu)
    assert tiny == {"max_new_tokens": 128}
    kaggle = get_preset("kaggle_tpu")
    half = memory_defaults(_info("tpu", 8.0, "kaggle_tpu_v5e8", 8), kaggle)
    assert half == {"max_new_tokens": 384, "batch_size": 1, "mini_batch_size": None,
                    "micro_batch_size": None}
    dataclasses.replace(kaggle, **half)
    assert memory_defaults(_info("gpu", None, "gpu"), gpu) == {}


def test_auto_config_applies_memory_defaults():
    info = detect_platform(devices("gpu", "NVIDIA H100 80GB HBM3", 1, 79.2), environ={})
    config = auto_config(info)
    assert config.batch_size == 4 and config.model == get_preset("gpu").model


def _config(tmp_path, **kw):
    return dataclasses.replace(get_preset("smoke"), output_dir="runs/my_run",
                               drive_dir=str(tmp_path / "drive" / "MyDrive" / "jaxpost"), **kw)


def test_output_dir_off_colab_stays_local_with_a_message(tmp_path, capsys):
    config = _config(tmp_path, save_to_drive=True)
    info = detect_platform(devices("cpu", "cpu", 1, None), environ={})
    assert resolve_output_dir(config, platform=info) == "runs/my_run"
    out = capsys.readouterr().out
    assert "save_to_drive is set" in out and "only on Colab" in out
    assert "local directory runs/my_run" in out
    assert not (tmp_path / "drive").exists()


def test_output_dir_on_colab_goes_to_drive_and_resolving_again_is_a_no_op(tmp_path, capsys):
    mounted = []

    def mount(path):
        mounted.append(path)
        os.makedirs(os.path.join(path, "MyDrive"))

    config = _config(tmp_path, save_to_drive=True)
    colab = detect_platform(devices("tpu", "TPU v5 lite", 1, 16), environ=COLAB)
    drive = types.SimpleNamespace(mount=mount)
    mount_point = str(tmp_path / "drive")
    target = resolve_output_dir(config, platform=colab, drive=drive, mount_point=mount_point)
    assert target == str(tmp_path / "drive" / "MyDrive" / "jaxpost" / "my_run")
    assert mounted == [mount_point] and os.path.isdir(target)
    assert "on Google Drive" in capsys.readouterr().out
    again = dataclasses.replace(config, output_dir=target)
    assert resolve_output_dir(again, platform=colab, drive=drive, mount_point=mount_point) == target
    assert mounted == [mount_point]  # already mounted: not asked again


def test_output_dir_on_colab_without_drive_warns_it_is_temporary(tmp_path, capsys):
    colab = detect_platform(devices("gpu", "Tesla T4", 1, 15), environ=COLAB)
    assert resolve_output_dir(_config(tmp_path), platform=colab) == "runs/my_run"
    assert "lost when the runtime is recycled" in capsys.readouterr().out


def test_make_config_reads_notebook_settings(tmp_path, capsys):
    cpu = detect_platform(devices("cpu", "cpu", 1, None), environ={})
    config = make_config("smoke", cpu, output_dir=str(tmp_path), max_steps="1",
                         save_to_drive="", learning_rate=1e-4)
    assert (config.output_dir, config.max_steps, config.learning_rate) == (str(tmp_path), 1, 1e-4)
    assert config.save_to_drive is False  # "" keeps the preset's value
    assert make_config("auto", cpu) == get_preset("cpu")
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        make_config("smoke", cpu, max_step="1")
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("colab_tpu_v5e", cpu)



@pytest.mark.parametrize("n, heads, mesh", [
    (8, 4, (2, 4)),     # Gemma 3 1B: 4 query heads
    (8, 2, (4, 2)),     # the tiny test model's 2 heads: tp=4 would not divide them
    (8, 1, (8, 1)),
    (8, 8, (2, 4)),
    (4, None, (1, 4)),  # heads unknown before a download
])
def test_tpu_tensor_parallel_divides_the_query_heads(n, heads, mesh):
    info = detect_platform(devices("tpu", "TPU v2", n, 8), environ={})
    assert mesh_defaults(info, heads) == mesh


def test_a_mesh_that_splits_heads_unevenly_is_refused_before_loading():
    from jaxpost.models.loading import attention_heads, check_tensor_parallel, load_model

    assert attention_heads("kaggle:google/gemma-3/flax/gemma3-1b-it") == (4, 1)
    assert attention_heads("embedded:gemma3-270m") == (4, 1)
    assert attention_heads("random:gemma3-tiny") == (2, 1)
    assert attention_heads("hf:google/gemma-3-1b-it") is None
    check_tensor_parallel("kaggle:google/gemma-3/flax/gemma3-1b-it", 4)  # KV heads may pad
    with pytest.raises(ValueError, match=r"mesh_tp=4 does not divide the 2 attention heads "
                                         r"of random:gemma3-tiny: use mesh_tp in \[1, 2\]"):
        load_model("random:gemma3-tiny", mesh_fsdp=1, mesh_tp=4)


def test_attention_heads_of_a_local_directory(tmp_path):
    import json

    from jaxpost.models.loading import attention_heads

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "num_attention_heads": 14, "num_key_value_heads": 2}))
    assert attention_heads(str(tmp_path)) == (14, 2)
    assert attention_heads(str(tmp_path / "missing")) is None
