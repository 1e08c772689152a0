"""Device meshes for CPU, GPU and TPU.

Every model in jaxpost lives on a two-axis mesh ``('fsdp', 'tp')``: Tunix's model
sharding rules name exactly these axes. Axis types are ``Auto``: with explicit axis
types Tunix 0.1.7's embedding gather fails on CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import jax
import numpy as np

AXIS_NAMES = ("fsdp", "tp")


def make_mesh(fsdp: int | None = None, tp: int = 1, devices=None) -> jax.sharding.Mesh:
    """Builds a ``(fsdp, tp)`` mesh over local devices.

    Args:
      fsdp: size of the data/parameter-sharding axis; None uses every device not used
        by ``tp``.
      tp: size of the tensor-parallel axis.
      devices: the devices to use (default ``jax.devices()``).

    Raises:
      ValueError: when ``fsdp * tp`` does not match the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if tp < 1 or n % tp:
        raise ValueError(f"mesh_tp={tp} is invalid: it must divide the {n} available devices")
    if fsdp is None:
        fsdp = n // tp
    if fsdp < 1 or fsdp * tp > n:
        raise ValueError(
            f"mesh_fsdp={fsdp} x mesh_tp={tp} needs {fsdp * tp} devices, but {n} are available "
            f"({devices[0].platform}); set mesh_fsdp to None to use them all")
    grid = np.asarray(devices[: fsdp * tp]).reshape(fsdp, tp)
    return jax.sharding.Mesh(grid, AXIS_NAMES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(AXIS_NAMES))


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    """One line: platform, device count and axis sizes, e.g. ``cpu x4 mesh fsdp=2 tp=2``."""
    devs = mesh.devices.flatten()
    sizes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"{devs[0].platform} x{len(devs)} mesh {sizes}"


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
    """Makes ``mesh`` the current mesh the way Tunix 0.1.7 reads it.

    Tunix's sharding helpers read the legacy ``with mesh:`` thread resource, which
    ``jax.set_mesh`` does not set; jax 0.10 marks that form deprecated, so its warning
    is silenced here, in one place.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mesh.__enter__()
    try:
        yield mesh
    finally:
        mesh.__exit__(None, None, None)
