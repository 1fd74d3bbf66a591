"""Preference and critic-free RL losses against float64 numpy references written independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt import losses

RNG = np.random.default_rng(0)
B = 6
VALID = np.array([1, 1, 1, 1, 0, 0], np.float32)  # the last two rows are padding


def _logps(scale=5.0):
    return [(-scale * RNG.random(B)).astype(np.float32) for _ in range(4)]


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _ratio(out, name):
    total, count = out["ratios"][name]
    return float(total) / float(count)


def _np(x):
    return np.asarray(x, np.float64)


def test_sequence_logprobs_sum_response_tokens_of_rows_and_packed_segments():
    logits = RNG.normal(size=(2, 7, 11)).astype(np.float32)
    targets = RNG.integers(0, 11, size=(2, 7))
    weights = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0]], np.float32)
    x = _np(logits)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights
    sums, counts = losses.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(_np(sums), token.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), weights.sum(1))
    segments = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 0]])
    packed, packed_counts = losses.sequence_logprobs(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(segments), num_segments=2
    )
    expected = np.array([[token[0].sum(), 0.0], [token[1, :3].sum(), token[1, 3:].sum()]])
    np.testing.assert_allclose(_np(packed), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(packed_counts), [[3, 0], [2, 2]])


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_variants_match_reference_and_ignore_padding(loss_type, smoothing):
    pc, pr, rc, rr = _logps()
    beta = 0.3
    out = losses.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr, VALID)), beta, loss_type, smoothing)
    h = (_np(pc) - _np(rc)) - (_np(pr) - _np(rr))
    if loss_type == "ipo":
        per = (h - 1 / (2 * beta)) ** 2
    else:
        per = -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
    real = VALID > 0
    np.testing.assert_allclose(float(out["loss_sum"]), per[real].sum(), rtol=1e-5)
    assert float(out["weight_sum"]) == real.sum()
    chosen, rejected = beta * (_np(pc) - _np(rc)), beta * (_np(pr) - _np(rr))
    np.testing.assert_allclose(_ratio(out, "reward_accuracy"), np.mean(chosen[real] > rejected[real]))
    np.testing.assert_allclose(_ratio(out, "reward_margin"), np.mean((chosen - rejected)[real]), rtol=1e-5)
    np.testing.assert_allclose(_ratio(out, "chosen_logp"), np.mean(_np(pc)[real]), rtol=1e-5)
    # padding rows change nothing, whatever they hold
    noisy = pc.copy()
    noisy[~real] = -1e4
    again = losses.dpo_loss(*map(jnp.asarray, (noisy, pr, rc, rr, VALID)), beta, loss_type, smoothing)
    assert float(again["loss_sum"]) == pytest.approx(float(out["loss_sum"]), rel=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _logps()
    grad = jax.grad(lambda c, r: losses.dpo_loss(c, r, rc, rr, VALID, 0.1)["loss_sum"], argnums=(0, 1))
    d_chosen, d_rejected = grad(jnp.asarray(pc), jnp.asarray(pr))
    real = VALID > 0
    assert np.all(np.asarray(d_chosen)[real] < 0) and np.all(np.asarray(d_rejected)[real] > 0)
    assert np.all(np.asarray(d_chosen)[~real] == 0)


def test_kto_matches_reference_with_mismatched_pair_reference_point():
    logps, ref, kl_logps, kl_ref = _logps()
    desirable = np.array([1, 0, 1, 0, 1, 0], np.float32)
    beta, wd, wu = 0.2, 1.0, 1.5
    z0 = losses.kto_reference_point(jnp.asarray(kl_logps), jnp.asarray(kl_ref), jnp.asarray(VALID))
    real = VALID > 0
    expected_z0 = max(np.mean((_np(kl_logps) - _np(kl_ref))[real]), 0.0)
    np.testing.assert_allclose(float(z0), expected_z0, rtol=1e-5, atol=1e-7)
    out = losses.kto_loss(*map(jnp.asarray, (logps, ref, desirable, VALID)), z0, beta, wd, wu)
    r = _np(logps) - _np(ref)
    sig = lambda x: 1 / (1 + np.exp(-x))
    per = np.where(desirable > 0, wd * (1 - sig(beta * (r - expected_z0))), wu * (1 - sig(beta * (expected_z0 - r))))
    np.testing.assert_allclose(float(out["loss_sum"]), per[real].sum(), rtol=1e-5)
    assert float(out["weight_sum"]) == real.sum()
    good = real & (desirable > 0)
    np.testing.assert_allclose(_ratio(out, "chosen_reward"), beta * r[good].mean(), rtol=1e-5)
    # the reference point is a constant of the step: no gradient flows through it
    grad = jax.grad(lambda k: losses.kto_reference_point(k, jnp.asarray(kl_ref), jnp.asarray(VALID)))
    assert np.all(np.asarray(grad(jnp.asarray(kl_logps))) == 0)
    # a negative mean log-ratio clamps to 0
    assert float(losses.kto_reference_point(jnp.asarray(kl_ref), jnp.asarray(kl_ref) + 1, jnp.asarray(VALID))) == 0


def test_orpo_matches_reference():
    pc, pr, _, _ = _logps(scale=2.0)
    beta = 0.25
    out = losses.orpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(VALID), beta)
    c, r = _np(pc), _np(pr)
    log_odds = lambda x: x - np.log1p(-np.exp(x))
    per = -c - beta * _log_sigmoid(log_odds(c) - log_odds(r))
    real = VALID > 0
    np.testing.assert_allclose(float(out["loss_sum"]), per[real].sum(), rtol=1e-5)
    np.testing.assert_allclose(_ratio(out, "nll"), -c[real].mean(), rtol=1e-5)
    # a certain answer (mean log-prob 0) keeps a finite loss and gradient
    certain = losses.orpo_loss(jnp.zeros(2), jnp.full(2, -1.0), jnp.ones(2), beta)
    assert np.isfinite(float(certain["loss_sum"]))


def test_group_advantages_grpo_dr_grpo_and_rloo():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 1.0, 0.0, 0.3]], np.float32)
    r = _np(rewards)
    mean, std = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
    adv, informative = losses.group_advantages(jnp.asarray(rewards), "grpo")
    np.testing.assert_allclose(_np(adv), (r - mean) / (std + 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(informative), [True, False, True])
    unscaled, _ = losses.group_advantages(jnp.asarray(rewards), "grpo", scale=False)
    np.testing.assert_allclose(_np(unscaled), r - mean, rtol=1e-5, atol=1e-6)
    rloo, _ = losses.group_advantages(jnp.asarray(rewards), "rloo")
    others = np.array([[np.mean(np.delete(row, i)) for i in range(4)] for row in r])
    np.testing.assert_allclose(_np(rloo), r - others, rtol=1e-5, atol=1e-6)


def _grpo_reference(lp, old, ref, adv, mask, lo, hi, beta, normalization):
    ratio = np.exp(lp - old)
    per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - lo, 1 + hi) * adv[:, None])
    per = per + beta * (np.exp(ref - lp) - (ref - lp) - 1)
    lengths = mask.sum(1)
    if normalization == "sequence":
        rows = lengths > 0
        return ((per * mask).sum(1)[rows] / lengths[rows]).mean()
    if normalization == "token":
        return (per * mask).sum() / mask.sum()
    return (per * mask).sum() / (mask.shape[1] * (lengths > 0).sum())


@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_grpo_loss_matches_reference(normalization):
    b, t = 5, 7
    lp, old, ref = (-3 * RNG.random((b, t)) for _ in range(3))
    adv = RNG.normal(size=b)
    lengths = np.array([7, 3, 5, 1, 0])  # padded responses, and one row with none
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = losses.grpo_loss(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), 0.2, 0.28, 0.04, normalization)
    expected = _grpo_reference(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, normalization)
    np.testing.assert_allclose(float(out["loss_sum"]) / float(out["weight_sum"]), expected, rtol=1e-5)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    np.testing.assert_allclose(_ratio(out, "kl"), (k3 * mask).sum() / mask.sum(), rtol=1e-5)
