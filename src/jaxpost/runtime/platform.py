"""Where a run happens: the accelerator, the notebook host, and the defaults that follow.

* :func:`detect_platform` reads the JAX devices and the environment: TPU, GPU or CPU;
  Colab, Kaggle or a local machine; device count and memory per device.
* :func:`auto_config` picks the preset named for that platform (``PLATFORM_PRESETS``),
  fits its mesh to the devices and scales prompts per step and the token budget (the
  KV-cache size is ``max_prompt_length + max_new_tokens``) to the memory found.
* :func:`resolve_output_dir` puts a run on Google Drive when ``save_to_drive`` is set on
  Colab, so a fresh runtime that reruns the notebook resumes from its last checkpoint.

The numbers are expectations for Gemma 3 1B with LoRA, not measurements on every chip.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxpost.config import ColabTrainingConfig, get_preset

DRIVE_MOUNT = "/content/drive"

# Platform name -> (preset, memory in GiB per device the preset was sized for).
PLATFORM_PRESETS: dict[str, tuple[str, float | None]] = {
    "colab_tpu_v2_8": ("colab_tpu", 8.0),
    "colab_tpu_v5e1": ("colab_tpu_v5e1", 16.0),
    "kaggle_tpu_v5e8": ("kaggle_tpu", 16.0),
    "tpu": ("colab_tpu_v5e1", 16.0),
    "gpu": ("gpu", 15.0),  # a Colab/Kaggle T4
    "cpu": ("cpu", 8.0),   # host RAM
}
# Platform name -> (device kind, devices), for memory plans made away from the machine
# (jaxpost.plan).
PLATFORM_DEVICES: dict[str, tuple[str, int]] = {
    "colab_tpu_v2_8": ("tpu", 8),
    "colab_tpu_v5e1": ("tpu", 1),
    "kaggle_tpu_v5e8": ("tpu", 8),
    "tpu": ("tpu", 1),
    "gpu": ("gpu", 1),
    "cpu": ("cpu", 1),
}
_HOST_NAMES = {"colab": "Colab", "kaggle": "Kaggle", "local": "local"}
_MAX_BATCH_SCALE = 8
_MIN_NEW_TOKENS = 128
# JAX reports a little less than the nominal memory (a v5e's 16 GiB as about 15.75, and
# on a GPU by default 75% of it, XLA's preallocation): below this fraction of the
# reference a platform counts as smaller.
_SMALLER = 0.6


@dataclasses.dataclass(frozen=True)
class PlatformInfo:
    """The machine a run is on.

    Attributes:
      kind: ``"tpu"``, ``"gpu"`` or ``"cpu"``.
      device_kind: JAX's name for the device, e.g. ``"TPU v5 lite"``, ``"Tesla T4"``.
      num_devices: local devices JAX sees (a TPU v2-8 shows 8 cores).
      memory_gib: memory per device in GiB (host RAM for CPU); None if unknown.
      host: ``"colab"``, ``"kaggle"`` or ``"local"``.
      name: a key of :data:`PLATFORM_PRESETS`.
    """

    kind: str
    device_kind: str
    num_devices: int
    memory_gib: float | None
    host: str
    name: str

    @property
    def preset(self) -> str:
        """The preset sized for this platform."""
        return PLATFORM_PRESETS[self.name][0]

    def describe(self) -> str:
        """One phrase: ``Colab TPU v5 lite x1 (15.8 GiB each)``, ``local CPU x1 (31.2 GiB RAM)``."""
        if self.kind == "cpu":
            kind, memory = "CPU", f" ({self.memory_gib:.1f} GiB RAM)" if self.memory_gib else ""
        else:
            kind = self.device_kind
            memory = f" ({self.memory_gib:.1f} GiB each)" if self.memory_gib else ""
        return f"{_HOST_NAMES[self.host]} {kind} x{self.num_devices}{memory}"

    def __str__(self) -> str:
        return f"{self.describe()}: platform {self.name}, preset {self.preset}"


def detect_host(environ: Mapping[str, str] | None = None) -> str:
    """``"colab"``, ``"kaggle"`` or ``"local"``, from variables those runtimes set."""
    environ = os.environ if environ is None else environ
    if "COLAB_RELEASE_TAG" in environ or "COLAB_GPU" in environ:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    return "local"


def _memory_gib(device: Any, kind: str) -> float | None:
    if kind == "cpu":
        # psutil is needed only to read the host's memory
        import psutil

        return psutil.virtual_memory().total / 2**30
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return limit / 2**30 if limit else None


def _platform_name(kind: str, device_kind: str, n: int) -> str:
    if kind != "tpu":
        return kind
    lowered = device_kind.lower()
    if "v2" in lowered and n == 8:
        return "colab_tpu_v2_8"
    if ("v5 lite" in lowered or "v5e" in lowered) and n == 8:
        return "kaggle_tpu_v5e8"
    if ("v5 lite" in lowered or "v5e" in lowered) and n == 1:
        return "colab_tpu_v5e1"
    return "tpu"


def detect_platform(devices=None, environ: Mapping[str, str] | None = None) -> PlatformInfo:
    """Describes the accelerator and host.

    Args:
      devices: the devices to describe (default ``jax.devices()``); anything with
        ``platform``, ``device_kind`` and optionally ``memory_stats()``.
      environ: the environment (default ``os.environ``), for the host.
    """
    if devices is None:
        # not at the top: this module is read before JAX starts (the CLI, the config)
        import jax

        devices = jax.devices()
    devices = list(devices)
    first = devices[0]
    kind = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(first.platform, "cpu")
    device_kind = str(getattr(first, "device_kind", kind))
    return PlatformInfo(kind=kind, device_kind=device_kind, num_devices=len(devices),
                        memory_gib=_memory_gib(first, kind), host=detect_host(environ),
                        name=_platform_name(kind, device_kind, len(devices)))


def mesh_defaults(info: PlatformInfo, num_heads: int | None = None) -> tuple[int | None, int]:
    """``(mesh_fsdp, mesh_tp)`` for the platform and a model with ``num_heads`` query heads.

    TPUs shard heads four ways where the device count and the heads allow (Tunix's Gemma
    demos use ``tp=4``), else two ways or not at all, and parameters over the rest; GPUs
    shard parameters over all devices; a CPU uses every device JAX shows (one, unless
    ``--xla_force_host_platform_device_count``). ``num_heads`` None assumes any ``tp``
    divides them (see :func:`jaxpost.models.loading.attention_heads`).
    """
    n = info.num_devices
    if info.kind == "cpu":
        return None, 1
    if info.kind == "gpu" or n == 1:
        return n, 1
    tp = next(t for t in (4, 2, 1) if n % t == 0 and (num_heads is None or num_heads % t == 0))
    return n // tp, tp


def memory_defaults(info: PlatformInfo, config: ColabTrainingConfig) -> dict[str, Any]:
    """Prompts per step and token budget scaled to the memory found.

    The preset of ``info`` was sized for :data:`PLATFORM_PRESETS`' memory per device.
    With at least twice that, prompts per step (and the mini batch) grow by a power of two
    (at most 8x; never on a CPU, where time, not memory, is the limit); with clearly less
    (under 60%), the completion budget ``max_new_tokens`` (and so the KV cache) shrinks in
    proportion, down to 128 tokens, and prompts per step drop to one.

    Returns:
      The changed fields only (empty when the memory matches or is unknown).
    """
    reference = PLATFORM_PRESETS[info.name][1]
    if not info.memory_gib or not reference:
        return {}
    scale = info.memory_gib / reference
    if scale >= 2 and info.kind != "cpu":
        factor = min(2 ** int(math.log2(scale)), _MAX_BATCH_SCALE)
        changes: dict[str, Any] = {"batch_size": config.batch_size * factor}
        if config.mini_batch_size is not None:
            changes["mini_batch_size"] = config.mini_batch_size * factor
        return changes
    if scale < _SMALLER:
        tokens = max(_MIN_NEW_TOKENS, int(config.max_new_tokens * scale) // 64 * 64)
        changes = {"max_new_tokens": min(tokens, config.max_new_tokens)}
        if config.batch_size > 1:
            changes.update(batch_size=1, mini_batch_size=None, micro_batch_size=None)
        return changes
    return {}


def auto_config(info: PlatformInfo | None = None) -> ColabTrainingConfig:
    """The preset for the platform with its mesh and memory defaults applied."""
    info = info or detect_platform()
    # not at the top: the config and the CLI read this module; that one starts JAX
    from jaxpost.models.loading import attention_heads

    config = get_preset(info.preset)
    heads = attention_heads(config.model)
    fsdp, tp = mesh_defaults(info, heads[0] if heads else None)
    return dataclasses.replace(config, mesh_fsdp=fsdp, mesh_tp=tp,
                               **memory_defaults(info, config))


def _drive_target(output_dir: str, drive_dir: str) -> str:
    """``output_dir`` when it is under ``drive_dir``, else its last part under it."""
    output = os.path.normpath(output_dir)
    drive_dir = os.path.normpath(drive_dir)
    if output == drive_dir or output.startswith(drive_dir + os.sep):
        return output_dir  # already on Drive
    return os.path.join(drive_dir, Path(output).name)


def resolve_output_dir(config: ColabTrainingConfig, *, platform: PlatformInfo | None = None,
                       drive: Any = None, mount_point: str = DRIVE_MOUNT) -> str:
    """Where the run writes: on Google Drive with ``save_to_drive`` on Colab, else local.

    On Colab with ``save_to_drive``, mounts Drive (asking for access once) and returns
    ``drive_dir/<last part of output_dir>``: a new runtime that reruns the notebook finds
    the checkpoints there and resumes. Off Colab it says that Drive is not available and
    returns ``output_dir``. Calling it again on its own result changes nothing.

    Args:
      platform: the detected platform (default: the host is read from the environment).
      drive: ``google.colab.drive`` or a stand-in with ``mount(path)``.
      mount_point: where Drive is mounted.
    """
    host = platform.host if platform is not None else detect_host()
    if not config.save_to_drive:
        if host == "colab":
            print(f"jaxpost: output in {config.output_dir} on this runtime's disk (lost when "
                  "the runtime is recycled; set save_to_drive=True to keep it on Google Drive)",
                  flush=True)
        return config.output_dir
    if host != "colab":
        print(f"jaxpost: save_to_drive is set, but Google Drive is mounted only on Colab and "
              f"this is {_HOST_NAMES[host]}; output stays in the local directory "
              f"{config.output_dir}", flush=True)
        return config.output_dir
    if not os.path.isdir(os.path.join(mount_point, "MyDrive")):
        if drive is None:
            # google.colab exists only inside Colab
            from google.colab import drive
        drive.mount(mount_point)
    target = _drive_target(config.output_dir, config.drive_dir)
    os.makedirs(target, exist_ok=True)
    print(f"jaxpost: output in {target} on Google Drive; rerunning this notebook on a new "
          "runtime resumes from its last checkpoint there", flush=True)
    return target
