"""Losses. Each returns sums and weight totals so callers can average exactly
across micro-batches, devices and hosts (a mean of means would not be exact)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def token_log_losses(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token (negative log-likelihood of the target, log partition function), in float32.

    Why a custom VJP: autodiff of take_along_axis scatters the target's gradient into a
    float32 [b, t, vocab] buffer that is then cast back to the logits' dtype, three passes
    over the largest tensor of the step (3.3 GB for GPT-2 at 16x1024). Here the backward is one
    elementwise pass, softmax minus one-hot, written straight in the logits' dtype.
    """
    logits32 = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits32, axis=-1)
    target_logit = jnp.take_along_axis(logits32, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - target_logit, log_z


def _token_log_losses_fwd(logits: Array, targets: Array):
    nll, log_z = token_log_losses(logits, targets)
    return (nll, log_z), (logits, targets, log_z)


def _token_log_losses_bwd(residuals, cotangents):
    logits, targets, log_z = residuals
    d_nll, d_log_z = cotangents
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = probs * (d_nll + d_log_z)[..., None] - jnp.where(is_target, d_nll[..., None], 0.0)
    return d_logits.astype(logits.dtype), None


token_log_losses.defvjp(_token_log_losses_fwd, _token_log_losses_bwd)


def token_cross_entropy(logits: Array, targets: Array, weights: Array, z_loss: float = 0.0) -> dict[str, Array]:
    """Weighted next-token cross-entropy.

    logits [b, t, vocab] (any float dtype; computed in float32), targets [b, t] ints,
    weights [b, t] (0 masks a token, e.g. prompts in SFT or padding).
    z_loss adds z_loss * logsumexp(logits)^2 per token (PaLM), keeping logits from drifting.

    Returns loss_sum (sum of weighted NLL), z_loss_sum and weight_sum.
    """
    weights = weights.astype(jnp.float32)
    nll, log_z = token_log_losses(logits, targets)
    return {
        "loss_sum": jnp.sum(nll * weights),
        "z_loss_sum": z_loss * jnp.sum(jnp.square(log_z) * weights),
        "weight_sum": jnp.sum(weights),
    }


def ranking_loss(rewards: Array, ranks: Array, valid: Array, margin: float = 0.0) -> dict:
    """The InstructGPT reward-model loss over every ranked pair of each prompt's K responses.

    rewards, ranks, valid: [batch, K]. Response i beats j when ranks[i] < ranks[j] (equal
    ranks are ties: no pair); `valid` marks real responses (K is padded to the batch's
    largest). Each prompt's pairs form one batch element: the prompt's loss is the mean
    over its pairs of -log sigmoid(r_better - r_worse - margin), so a prompt with K
    responses weighs the same as one with two.

    Returns loss_sum (over prompts), weight_sum (prompts with at least one pair) and
    ratios: pairwise accuracy and the mean reward margin r_better - r_worse.
    """
    rewards = rewards.astype(jnp.float32)
    valid = valid.astype(bool)
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    nll = -jax.nn.log_sigmoid(diff - margin)
    pairs = jnp.sum(better, axis=(1, 2)).astype(jnp.float32)
    per_prompt = jnp.sum(jnp.where(better, nll, 0.0), axis=(1, 2)) / jnp.maximum(pairs, 1.0)
    has_pairs = (pairs > 0).astype(jnp.float32)
    total_pairs = jnp.sum(pairs)
    return {
        "loss_sum": jnp.sum(per_prompt * has_pairs),
        "weight_sum": jnp.sum(has_pairs),
        "ratios": {
            "accuracy": (jnp.sum(jnp.where(better & (diff > 0), 1.0, 0.0)), total_pairs),
            "reward_margin": (jnp.sum(jnp.where(better, diff, 0.0)), total_pairs),
        },
    }


# ----------------------------------------------------------------------------- PPO (RLHF)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) / std over the masked entries (the mean is added back if not shift_mean)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def generalized_advantages(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """GAE over response tokens: (advantages, returns), both [batch, T].

    `mask` marks each row's response tokens (1 up to its last token, 0 after): the episode
    ends at the last real token, so nothing is bootstrapped past it.
    """
    mask = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, inputs):
        delta, cont = inputs
        advantage = delta + gamma * lam * cont * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros_like(rewards[:, 0]), (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, clip: float
) -> dict[str, Array]:
    """The clipped surrogate objective (as a loss), with its clip fraction and approximate KL."""
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    return {
        "policy_loss": masked_mean(jnp.maximum(unclipped, clipped), mask),
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
    }


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float) -> dict[str, Array]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within `clip` of the rollout's value."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    losses, clipped_losses = jnp.square(values - returns), jnp.square(clipped - returns)
    return {
        "value_loss": 0.5 * masked_mean(jnp.maximum(losses, clipped_losses), mask),
        "value_clip_fraction": masked_mean((clipped_losses > losses).astype(jnp.float32), mask),
    }


def adaptive_kl_coef(coef: Array, observed_kl: Array, target: float, horizon: float, n_steps: int) -> Array:
    """Ziegler et al. (2019): scale beta by 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)
