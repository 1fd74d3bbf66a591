"""Everything that knows about devices: the mesh and the logical-axis rules.

The model names logical axes only; this package turns them into
`NamedSharding`s over a `jax.sharding.Mesh`.
"""

from flaxgpt.sharding.mesh import MESH_AXES, initialize_distributed, make_mesh, mesh_shape
from flaxgpt.sharding.rules import (
    batch_sharding,
    host_value,
    local_batch_rows,
    logical_rules,
    logical_shardings,
    mesh_context,
    place_batch,
    replicated,
    sharded_abstract,
    unbox_shapes,
)

__all__ = [
    "MESH_AXES",
    "initialize_distributed",
    "make_mesh",
    "mesh_shape",
    "batch_sharding",
    "host_value",
    "local_batch_rows",
    "logical_rules",
    "logical_shardings",
    "mesh_context",
    "place_batch",
    "replicated",
    "sharded_abstract",
    "unbox_shapes",
]
