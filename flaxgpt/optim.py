"""The optimizer: optax AdamW with a warmup + decay schedule, a weight-decay mask
and global-norm clipping. Gradient accumulation lives in the train step (a scan
over micro-batches), where it is exact for token-weighted losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flaxgpt.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then decay to `min_lr` at
    `decay_steps` (default: max_steps), then flat at `min_lr`.

    Warmup reaches lr*(s+1)/(warmup+1) at update s, as nanoGPT does, so the
    very first update is not wasted at lr=0.
    """
    decay_steps = cfg.decay_steps or max_steps
    warmup = cfg.warmup_steps

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1.0) / (warmup + 1.0)
        progress = jnp.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        if cfg.decay == "cosine":
            decayed = cfg.min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (cfg.lr - cfg.min_lr)
        elif cfg.decay == "linear":
            decayed = cfg.min_lr + (1.0 - progress) * (cfg.lr - cfg.min_lr)
        else:
            decayed = jnp.full_like(progress, cfg.lr)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def weight_decay_mask(params: dict, no_decay: tuple) -> dict:
    """True where a parameter is decayed: every leaf whose name is not in `no_decay`."""

    def decide(path, _leaf) -> bool:
        leaf_name = getattr(path[-1], "key", str(path[-1]))
        return leaf_name not in no_decay

    return jax.tree_util.tree_map_with_path(decide, params)


def build_optimizer(
    cfg: OptimizerConfig, max_steps: int, trainable: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """AdamW (+ clipping) over every parameter, or, with `trainable` (params -> bool tree, e.g.
    `lora.trainable_mask`), over those alone: the frozen rest gets no update and no moments,
    and clipping sees only the trained gradients."""
    chain = _adamw_chain(cfg, max_steps)
    if trainable is None:
        return chain
    labels = lambda params: jax.tree.map(lambda train: "train" if train else "frozen", trainable(params))
    return optax.multi_transform({"train": chain, "frozen": optax.set_to_zero()}, labels)


def _adamw_chain(cfg: OptimizerConfig, max_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, max_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: weight_decay_mask(params, tuple(cfg.no_decay)),
        )
    )
    return optax.chain(*parts)
