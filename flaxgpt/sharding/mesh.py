"""Build the device mesh from `MeshConfig`."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from flaxgpt.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve a -1 entry and check that the product equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    given = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {given}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh axis sizes must be positive or -1, got {given}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {given}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh {given} needs {math.prod(sizes)} devices but {n_devices} exist; "
            "set one axis to -1 to take the remaining devices"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) and automatic (not explicit) sharding.

    Device order comes from `mesh_utils.create_device_mesh`, which places the
    innermost axes (tensor, then fsdp) on the fastest interconnect.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
