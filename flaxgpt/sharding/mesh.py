"""Build the device mesh from `MeshConfig`, and join a multi-process run."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from flaxgpt.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes within one slice of `n_devices` devices; resolves -1."""
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


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) and automatic (not explicit) sharding.

    Device order comes from `mesh_utils`, which puts the innermost axes (tensor, then fsdp)
    on the fastest links; with dcn_* > 1 it builds a hybrid mesh whose outer factor spans
    slices (TPU multi-slice) or, where devices have no slice, processes.
    """
    devices = list(devices) if devices is not None else jax.devices()
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    granules = math.prod(dcn)
    if min(dcn) < 1:
        raise ConfigError(f"mesh.dcn_* sizes must be >= 1, got {dict(zip(MESH_AXES, dcn))}")
    if len(devices) % granules:
        raise ConfigError(
            f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} need a multiple of {granules} "
            f"devices, but {len(devices)} exist"
        )
    ici = mesh_shape(cfg, len(devices) // granules)
    if granules > 1:
        slices = {getattr(d, "slice_index", 0) for d in devices}
        processes = {d.process_index for d in devices}
        by_slice = len(slices) > 1
        if len(slices if by_slice else processes) != granules:
            raise ConfigError(
                f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} span {granules} slices, but the devices come from "
                f"{len(slices)} slice(s) and {len(processes)} process(es)"
            )
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run if one is asked for; returns whether it did.

    Explicit arguments win, then FLAXGPT_COORDINATOR_ADDRESS / FLAXGPT_NUM_PROCESSES /
    FLAXGPT_PROCESS_ID. On a multi-host Cloud TPU VM (TPU_WORKER_HOSTNAMES lists several
    hosts) or a multi-slice job, JAX discovers everything itself. A single host does nothing.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("FLAXGPT_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("FLAXGPT_NUM_PROCESSES", 1)
    if process_id is None:
        process_id = _env_int("FLAXGPT_PROCESS_ID", 0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(
            f"process id {process_id} is out of range: a run of {num_processes} processes "
            f"has ids 0 to {num_processes - 1}"
        )
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError(
                "a coordinator address needs the number of processes and this process's id "
                "(--num-processes, --process-id)"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if (num_processes or 1) > 1 or (process_id or 0) > 0:  # otherwise the run would go on alone
        raise ConfigError(
            f"{num_processes} processes (this one {process_id}) need the coordinator's HOST:PORT "
            "(--coordinator-address or FLAXGPT_COORDINATOR_ADDRESS)"
        )
    multi_host_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
    if multi_host_tpu:
        jax.distributed.initialize()
        return True
    return False


def _env_int(name: str, minimum: int) -> int | None:
    """The integer in environment variable `name` (None if unset); ConfigError naming it if not one."""
    text = os.environ.get(name, "")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{name}={text!r}: expected an integer >= {minimum}")
    return value
