"""Logical axis rules: the small table that maps model axis names onto mesh axes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxgpt.sharding.mesh import MESH_AXES


def logical_rules(rules: Any) -> tuple:
    """Normalise config rules (lists from JSON) to flax's ((name, axes), ...) form and check them."""
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"a logical axis rule is (name, mesh axes), got {entry!r}")
        name, axes = entry
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            unknown = [a for a in axes if a not in MESH_AXES]
        else:
            unknown = [axes] if axes is not None and axes not in MESH_AXES else []
        if unknown:
            raise ValueError(f"rule for '{name}' names unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: tuple) -> Any:
    """NamedShardings for a tree of (possibly boxed) values annotated with logical names.

    Unannotated leaves are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
    """Batches are [batch, length, ...]: the batch axis follows the 'activation_batch' rule."""
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
    return NamedSharding(mesh, spec)


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local numpy rows -> global arrays on the mesh (each process passes its own rows)."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }
