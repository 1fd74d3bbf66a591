"""Losses. Each returns sums and weight totals so callers can average exactly
across micro-batches, devices and hosts (a mean of means would not be exact)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_cross_entropy(
    logits: Array, targets: Array, weights: Array, z_loss: float = 0.0
) -> dict[str, Array]:
    """Weighted next-token cross-entropy.

    logits [b, t, vocab] (any float dtype; computed in float32), targets [b, t] ints,
    weights [b, t] (0 masks a token, e.g. prompts in SFT or padding).
    z_loss adds z_loss * logsumexp(logits)^2 per token (PaLM), keeping logits from drifting.

    Returns loss_sum (sum of weighted NLL), z_loss_sum and weight_sum.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = log_z - target_logit
    return {
        "loss_sum": jnp.sum(nll * weights),
        "z_loss_sum": z_loss * jnp.sum(jnp.square(log_z) * weights),
        "weight_sum": jnp.sum(weights),
    }
