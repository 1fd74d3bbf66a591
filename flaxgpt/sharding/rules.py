"""Logical axis rules: the small table that maps model axis names onto mesh axes,
and the helpers that move data between the host and the mesh."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxgpt.config import ConfigError
from flaxgpt.sharding.mesh import MESH_AXES


def logical_rules(rules: Any) -> tuple:
    """Normalise config rules (lists from JSON) to flax's ((name, axes), ...) form and check them."""
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ConfigError(f"mesh.rules: a rule is (logical name, mesh axes), got {entry!r}")
        name, axes = entry
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        unknown = [a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.rules: rule for '{name}' names unknown mesh axes {unknown}; mesh axes are {MESH_AXES}"
            )
        out.append((name, axes))
    return tuple(out)


def unbox_shapes(tree: Any) -> Any:
    """Strip the logical-axis boxes of an abstract tree without applying sharding constraints
    (`nn.meta.unbox` applies them, which fails on shapes when a mesh context is active)."""
    return nn.meta.map_axis_meta(lambda box: unbox_shapes(box.value), tree)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: tuple) -> Any:
    """NamedShardings for a tree of boxed values annotated with logical axis names.

    Unannotated leaves are replicated. A dimension that its mesh axes do not divide is an
    error naming the parameter, the dimension and the axes.
    """
    # A box around an empty subtree (optax's MaskedNode, where a masked optimizer keeps no
    # state for a frozen parameter) is no array: drop the box, keep the empty node.
    abstract_tree = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) and not jax.tree.leaves(x.value) else x,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    logical = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    flat_values = jax.tree_util.tree_leaves_with_path(unbox_shapes(abstract_tree))
    flat_logical = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, value), names, sharding in zip(flat_values, flat_logical, flat_shardings):
        for dim, (size, axes) in enumerate(zip(value.shape, sharding.spec)):
            axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                raise ConfigError(
                    f"cannot shard {jax.tree_util.keystr(path)} {tuple(value.shape)}: dimension {dim} "
                    f"('{names[dim]}', size {size}) is not divisible by mesh axes {axes} of size {ways}; "
                    "change the model size, the mesh, or the rule for that logical axis"
                    + ("; model.vocab_multiple pads the vocabulary" if names[dim] == "vocab" else "")
                )
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
    """Batches are [batch, length]: the batch axis follows the 'activation_batch' rule."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules))


def local_batch_rows(sharding: NamedSharding, batch_size: int, length: int) -> np.ndarray:
    """The global row indices whose data this process's devices hold (each process loads only these)."""
    ways = math.prod(sharding.mesh.shape[a] for a in _axes(sharding.spec[0]))
    if batch_size % ways:
        raise ConfigError(
            f"batch size {batch_size} is not divisible by the {ways} ways the batch axis is "
            f"sharded over mesh axes {_axes(sharding.spec[0])}"
        )
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size, length)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.array(sorted(rows), dtype=np.int64)


def place_batch(
    local: dict[str, np.ndarray], rows: np.ndarray, sharding: NamedSharding, batch_size: int
) -> dict[str, jax.Array]:
    """This process's rows (in the order of `rows`) -> global [batch_size, ...] arrays on the mesh."""
    position = np.full(batch_size, -1, np.int64)
    position[rows] = np.arange(len(rows))

    def build(value: np.ndarray) -> jax.Array:
        def shard(index: tuple) -> np.ndarray:
            picked = position[np.arange(batch_size)[index[0]]]
            return value[picked][(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback((batch_size, *value.shape[1:]), sharding, shard)

    return {key: build(np.asarray(value)) for key, value in local.items()}


def mesh_context(mesh: Mesh, rules: tuple) -> contextlib.ExitStack:
    """The mesh and axis rules under which jitted code and sharding constraints resolve."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def sharded_abstract(boxed_tree: Any, mesh: Mesh, rules: tuple) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of an abstract boxed tree:
    the target of a checkpoint restore and the out_shardings of an init."""
    shardings = unbox_shapes(logical_shardings(boxed_tree, mesh, rules))
    structs = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox_shapes(boxed_tree), shardings
    )
    return structs, shardings


def host_value(tree: Any) -> Any:
    """Fetch whole arrays to the host, also when they span several processes."""

    def fetch(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def _axes(entry: Any) -> tuple:
    return entry if isinstance(entry, tuple) else (entry,) if entry else ()
