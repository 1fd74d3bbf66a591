"""Splash attention, the Pallas flash-attention kernel for TPUs (`jax.experimental.pallas.ops.tpu`),
behind the model's attention interface: causal, segment ids for packed rows, grouped-query heads.

The kernel is a custom call that XLA cannot partition, so on a mesh it runs under `shard_map`:
each device attends its own rows (the batch's data/fsdp shards) and its own heads (tensor shards)
whole. Grouped-query attention runs the kernel's multi-query form once per key/value head, over
the query heads that share it. The kernel does not scale queries: they are scaled here.
`interpret=True` runs the same kernel through the Pallas interpreter on any backend (slow; tests).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array

# The kernel tiles the sequence in blocks of up to 512 queries and keys; TPU tiles need multiples of 128.
MAX_BLOCK = 512
MIN_BLOCK = 128


def target_platform() -> str:
    """The platform the code being traced will run on: the mesh in context (an ahead-of-time compile
    for a TPU topology traces on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def splash_obstacle(length: int, head_dim: int, dropout: float, train: bool) -> str | None:
    """Why the TPU kernel cannot run this attention, or None when it can."""
    if target_platform() != "tpu":
        return f"it needs a TPU, and the code runs on {target_platform()}"
    if length % MIN_BLOCK:
        return f"it needs a sequence length that is a multiple of {MIN_BLOCK}, got {length}"
    if head_dim % 64:
        return f"it needs model.head_dim a multiple of 64, got {head_dim}"
    if train and dropout > 0:
        return f"it has no attention dropout, and model.dropout={dropout} while training"
    return None


def _block(length: int) -> int:
    block = min(MAX_BLOCK, length)
    while length % block:
        block //= 2
    return block


@functools.lru_cache(maxsize=32)
def _kernel(group: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b = _block(length)
    sizes = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(group)])
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool) -> Array:
    """One device's attention: q [b, t, h, d], k and v [b, t, kv, d], segment_ids [b, t]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, d = q.shape
    kv = k.shape[2]
    group = h // kv
    kernel = _kernel(group, t, interpret)
    scaled = (q / jnp.sqrt(d).astype(q.dtype)).reshape(b, t, kv, group, d).transpose(0, 2, 3, 1, 4)  # [b,kv,g,t,d]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]

    def one_row(q_row, k_row, v_row, seg):
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(scaled, keys, values, segment_ids)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool = False) -> Array:
    """Causal attention within segments (as `model.attention_mask`), [b, t, heads, d] out; runs
    per device under `shard_map` when a mesh is in context."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_local, interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    batch, _, heads, _ = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None))
    kv_heads = nn.logical_to_mesh_axes((None, None, "activation_kv_heads", None))[2]
    divides = lambda axes, size: size % math.prod(mesh.shape[a] for a in _names(axes)) == 0
    batch = batch if divides(batch, q.shape[0]) else None  # e.g. the one-row batch of an init
    if heads != kv_heads or not (divides(heads, q.shape[2]) and divides(kv_heads, k.shape[2])):
        kv_heads = heads = None  # a key/value head's group of query heads must sit on one device
    qspec, kvspec = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, kv_heads, None)
    return jax.shard_map(
        local, in_specs=(qspec, kvspec, kvspec, PartitionSpec(batch, None)), out_specs=qspec, check_vma=False
    )(q, k, v, segment_ids)


def _names(axes) -> tuple:
    return axes if isinstance(axes, tuple) else (axes,) if axes else ()
