"""LoRA around the model: which parameters train, and folding adapters into the base weights.

The adapters themselves live in `model.Linear`. With them on, a trainer differentiates only
the adapters (and heads the base model lacks, such as a reward model's `score`): the frozen
leaves go through `stop_gradient`, so XLA never computes their weight gradients, and the
optimizer (`optim.build_optimizer(..., trainable=...)`) keeps moments only for what trains.

A LoRA run that starts from another run or a Hugging Face model saves adapter-only checkpoints:
the trained leaves (`trained_part`) and their optimizer state, plus a record (`BASE_RECORD`) of
where the frozen base comes from and its `base_fingerprint`; a reader rebuilds the base from
that record, checks the fingerprint, and puts the trained leaves back in (`with_trained`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.config import ModelConfig
from flaxgpt.model import count_params
from flaxgpt.sharding import host_value

LORA_FIELDS = ("lora_rank", "lora_targets")  # they change the parameter tree
LORA_SETTINGS = LORA_FIELDS + ("lora_alpha", "lora_dropout")
# parameters a LoRA run trains besides the adapters: new heads with no pretrained value
NEW_HEADS = ("score",)
# the checkpoint record's key for an adapter-only checkpoint's base: its source and fingerprint
BASE_RECORD = "lora_base"
_SAMPLES = 16  # values per frozen tensor that enter the fingerprint
_DROPPED = object()


def _names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def trainable_mask(params: Any) -> Any:
    """True for adapter leaves and new heads, False for the frozen base."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(n.startswith("lora_") or n in NEW_HEADS for n in _names(path)), params
    )


def freeze_base(params: Any) -> Any:
    """Parameters with the frozen leaves (all but `trainable_mask`'s) cut from the gradient."""
    return jax.tree.map(lambda p, train: p if train else jax.lax.stop_gradient(p), params, trainable_mask(params))


def merge(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """(parameters with every adapter folded into its kernel, the config without adapters):
    the same function as the adapted model, in the base model's shapes (for export and for
    starting another run)."""
    if not cfg.lora_rank:
        return params, cfg
    scale = cfg.lora_alpha / cfg.lora_rank

    def fold(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
            # kernel [L.., in.., out..], a [L.., in.., r], b [L.., r, out..]; L: scanned layers, if any
            lead = a.ndim + b.ndim - 2 - kernel.ndim
            a2 = a.reshape(a.shape[:lead] + (-1, cfg.lora_rank)).astype(jnp.float32)
            b2 = b.reshape(b.shape[:lead] + (cfg.lora_rank, -1)).astype(jnp.float32)
            delta = (a2 @ b2).reshape(kernel.shape) * scale
            rest = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
            rest["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
            return rest
        return {k: fold(v) for k, v in node.items()}

    return fold(params), dataclasses.replace(cfg, lora_rank=0)


def count_trained(params: Any) -> int:
    """Parameters a LoRA run trains (adapters and new heads): what gets weight gradients."""
    mask = jax.tree.leaves(trainable_mask(params))
    return sum(math.prod(x.shape) for x, train in zip(jax.tree.leaves(params), mask) if train)


def describe_size(params: Any, rank: int) -> str:
    """ "1.23M parameters", or with adapters how many of them train."""
    total = count_params(params)
    if not rank:
        return f"{total / 1e6:.2f}M parameters"
    trained = count_trained(params)
    return f"{total / 1e6:.2f}M parameters, {trained / 1e6:.3f}M trained (LoRA rank {rank})"


def trained_part(params: Any) -> Any:
    """Only the trainable leaves (adapters, new heads) of a parameter tree, in their nested dicts:
    what an adapter-only checkpoint stores (works on arrays and on abstract shapes alike)."""

    def keep(node: Any, train: Any) -> Any:
        if not isinstance(node, dict):
            return node if train else _DROPPED
        kept = {k: keep(v, train[k]) for k, v in node.items()}
        kept = {k: v for k, v in kept.items() if v is not _DROPPED}
        return kept if kept else _DROPPED

    kept = keep(params, trainable_mask(params))
    return {} if kept is _DROPPED else kept


def with_trained(full: Any, trained: Any) -> Any:
    """`full` (a whole parameter tree) with the leaves of `trained` (a `trained_part`) put in."""
    if not isinstance(full, dict):
        return trained
    return {k: with_trained(v, trained[k]) if k in trained else v for k, v in full.items()}


def base_fingerprint(params: Any) -> str:
    """A checksum of the frozen base: each frozen leaf's path, shape and dtype and its values at
    a few fixed positions. The values are gathered exactly (one tensor at a time, whatever the
    sharding), so a resume on another mesh agrees, while another model, a retrained base or
    another dtype disagrees, without reading every weight a second time."""
    digest = hashlib.sha256()
    mask = jax.tree.leaves(trainable_mask(params))
    for (path, x), train in zip(jax.tree_util.tree_leaves_with_path(params), mask):
        if train:
            continue
        digest.update(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {x.dtype};".encode())
        picked = x
        if x.ndim:
            positions = np.unique(np.linspace(0, x.size - 1, _SAMPLES).astype(np.int64))
            picked = x[np.unravel_index(positions, x.shape)]
        digest.update(np.asarray(host_value(picked), np.float32).tobytes())
    return digest.hexdigest()[:20]
