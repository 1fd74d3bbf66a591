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


# ----------------------------------------------------------------------------- preference optimisation


def sequence_logprobs(
    logits: Array, targets: Array, weights: Array, segment_ids: Array | None = None, num_segments: int = 1
) -> tuple[Array, Array]:
    """(sum of the weighted targets' log-probabilities, number of weighted tokens) per sequence.

    The log-probability of a response is the sum over its tokens only (weights 1 on the
    response, 0 on prompt and padding), so rows of different lengths compare exactly; the
    count lets IPO and ORPO use the per-token mean instead. Without segment_ids each row is
    one sequence ([b]); with them (packed rows, segments numbered 1..num_segments, 0 padding)
    the result is [b, num_segments].
    """
    weights = weights.astype(jnp.float32)
    nll, _ = token_log_losses(logits, targets)
    if segment_ids is None:
        return -jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)
    member = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32) * weights[..., None]
    return -jnp.einsum("bt,bts->bs", nll, member), jnp.sum(member, axis=1)


def _implicit_ratios(chosen: Array, rejected: Array, chosen_logps: Array, rejected_logps: Array, valid: Array) -> dict:
    """The metrics TRL logs for pairwise methods, as (sum, count) ratios over valid pairs."""
    n = jnp.sum(valid)
    total = lambda x: (jnp.sum(x * valid), n)
    return {
        "reward_accuracy": total((chosen > rejected).astype(jnp.float32)),
        "reward_margin": total(chosen - rejected),
        "chosen_reward": total(chosen),
        "rejected_reward": total(rejected),
        "chosen_logp": total(chosen_logps),
        "rejected_logp": total(rejected_logps),
    }


def dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    valid: Array,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict:
    """DPO (Rafailov et al. 2023) over [b] sequence log-probabilities of the policy and reference.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps = label_smoothing > 0
    is conservative DPO (cDPO: a share eps of the labels assumed flipped).
    ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023; pass per-token mean log-probs, as TRL does).
    `valid` drops padding rows of a fixed-shape batch. The implicit rewards are beta * the
    log-ratios; their accuracy and margin are the usual progress metrics.
    """
    valid = valid.astype(jnp.float32)
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = (chosen_ratio - rejected_ratio).astype(jnp.float32)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    chosen, rejected = beta * jax.lax.stop_gradient(chosen_ratio), beta * jax.lax.stop_gradient(rejected_ratio)
    return {
        "loss_sum": jnp.sum(losses * valid),
        "weight_sum": jnp.sum(valid),
        "ratios": _implicit_ratios(chosen, rejected, chosen_logps, rejected_logps, valid),
    }


def kto_reference_point(kl_logps: Array, kl_ref_logps: Array, valid: Array) -> Array:
    """KTO's z0: the batch's mean log-ratio on mismatched (prompt, other record's response) pairs,
    clamped at 0 and cut from the gradient (Ethayarajh et al. 2024; TRL's estimate)."""
    mean = masked_mean((kl_logps - kl_ref_logps).astype(jnp.float32), valid)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    logps: Array,
    ref_logps: Array,
    desirable: Array,
    valid: Array,
    reference_point: Array,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> dict:
    """KTO over unpaired records [b]: thumbs-up rows lose w_d (1 - sigmoid(beta (r - z0))), thumbs-down
    rows w_u (1 - sigmoid(beta (z0 - r))), r the policy/reference log-ratio and z0 the reference
    point (`kto_reference_point`). Averaged over records, as TRL does."""
    valid, desirable = valid.astype(jnp.float32), desirable.astype(jnp.float32)
    ratio = (logps - ref_logps).astype(jnp.float32)
    up = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio - reference_point)))
    down = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (reference_point - ratio)))
    losses = desirable * up + (1.0 - desirable) * down
    reward = beta * jax.lax.stop_gradient(ratio)
    good, bad = valid * desirable, valid * (1.0 - desirable)
    return {
        "loss_sum": jnp.sum(losses * valid),
        "weight_sum": jnp.sum(valid),
        "ratios": {
            "chosen_reward": (jnp.sum(reward * good), jnp.sum(good)),
            "rejected_reward": (jnp.sum(reward * bad), jnp.sum(bad)),
            "chosen_logp": (jnp.sum(logps * good), jnp.sum(good)),
            "rejected_logp": (jnp.sum(logps * bad), jnp.sum(bad)),
            "kl_reference_point": (reference_point * jnp.sum(valid), jnp.sum(valid)),
        },
    }


def orpo_loss(chosen_mean_logps: Array, rejected_mean_logps: Array, valid: Array, beta: float) -> dict:
    """ORPO (Hong et al. 2024): SFT and preference in one loss, no reference model.

    Inputs are per-token mean log-probabilities [b]. Per pair: -mean log p(y_w) (the SFT NLL)
    - beta log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p). The mean
    log-probability is capped just below 0 so a certain answer's odds stay finite.
    """
    valid = valid.astype(jnp.float32)
    cap = lambda x: jnp.minimum(x.astype(jnp.float32), -1e-6)
    chosen, rejected = cap(chosen_mean_logps), cap(rejected_mean_logps)
    log_odds = (chosen - rejected) - (jnp.log(-jnp.expm1(chosen)) - jnp.log(-jnp.expm1(rejected)))
    odds_term = jax.nn.log_sigmoid(log_odds)
    losses = -chosen - beta * odds_term
    ratios = _implicit_ratios(
        beta * jax.lax.stop_gradient(chosen), beta * jax.lax.stop_gradient(rejected), chosen, rejected, valid
    )
    ratios["nll"] = (jnp.sum(-chosen * valid), jnp.sum(valid))
    ratios["log_odds_ratio"] = (jnp.sum(odds_term * valid), jnp.sum(valid))
    return {"loss_sum": jnp.sum(losses * valid), "weight_sum": jnp.sum(valid), "ratios": ratios}


# ----------------------------------------------------------------------------- critic-free RL (GRPO, RLOO)


def group_advantages(rewards: Array, method: str = "grpo", scale: bool = True) -> tuple[Array, Array]:
    """(advantages, informative) for rewards [prompts, G] of G sampled answers per prompt.

    grpo: r - the group's mean, divided by its (unbiased) std when `scale` (Dr. GRPO: scale=False).
    rloo: r - the mean of the other G - 1 answers (the leave-one-out baseline).
    `informative` [prompts] is False for a group whose answers all score the same: it carries
    no signal (DAPO's dynamic sampling drops it).
    """
    rewards = rewards.astype(jnp.float32)
    g = rewards.shape[1]
    mean = jnp.mean(rewards, axis=1, keepdims=True)
    std = jnp.std(rewards, axis=1, keepdims=True, ddof=1)
    if method == "grpo":
        advantages = (rewards - mean) / (std + 1e-4) if scale else rewards - mean
    elif method == "rloo":
        advantages = rewards - (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (g - 1)
    else:
        raise ValueError(f"unknown advantage method {method!r}; expected 'grpo' or 'rloo'")
    return advantages, std[:, 0] > 0


def grpo_loss(
    logprobs: Array,
    old_logprobs: Array,
    ref_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_low: float,
    clip_high: float,
    beta: float,
    normalization: str = "sequence",
    horizon: int | None = None,
) -> dict:
    """The GRPO objective over response tokens [b, T], advantages [b] (one per sequence).

    Per token: -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) + beta k3, where
    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 is the unbiased KL estimate of Shao et al.
    (clip_high > clip_low is DAPO's clip-higher). normalization: `sequence` (GRPO: each
    sequence's token mean, averaged over sequences), `token` (DAPO: over all tokens), or
    `constant` (Dr. GRPO: each sequence's token sum / T, removing the length bias; T is `horizon`,
    the longest answer allowed, when the columns are cut to the longest answer sampled).
    Returned as loss_sum / weight_sum so micro-batches average exactly.
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    surrogate = -jnp.minimum(ratio * adv, clipped)
    delta = ref_logprobs - logprobs
    k3 = jnp.exp(delta) - delta - 1.0
    per_token = (surrogate + beta * k3) * mask
    lengths = jnp.sum(mask, axis=1)
    has_tokens = (lengths > 0).astype(jnp.float32)
    if normalization == "sequence":
        loss_sum, weight_sum = jnp.sum(jnp.sum(per_token, axis=1) / jnp.maximum(lengths, 1.0)), jnp.sum(has_tokens)
    elif normalization == "token":
        loss_sum, weight_sum = jnp.sum(per_token), jnp.sum(lengths)
    elif normalization == "constant":
        loss_sum, weight_sum = jnp.sum(per_token) / (horizon or mask.shape[1]), jnp.sum(has_tokens)
    else:
        raise ValueError(f"unknown normalization {normalization!r}; expected 'sequence', 'token' or 'constant'")
    tokens = jnp.sum(mask)
    return {
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "ratios": {
            "kl": (jnp.sum(k3 * mask), tokens),
            "clip_fraction": (jnp.sum(((ratio * adv) > clipped).astype(jnp.float32) * mask), tokens),
        },
    }
