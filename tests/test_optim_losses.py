"""Loss weighting, z-loss, learning-rate schedules and the weight-decay mask."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt.config import ConfigError, ModelConfig, OptimizerConfig
from flaxgpt.losses import token_cross_entropy
from flaxgpt.optim import build_optimizer, learning_rate_schedule, weight_decay_mask
from tests.conftest import REPO, init_params, tiny_model_config


def test_cross_entropy_matches_manual_and_respects_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], np.float32)
    out = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(out["loss_sum"]), (nll * weights).sum(), rtol=1e-5)
    assert float(out["weight_sum"]) == 5.0
    # Masked tokens do not influence the loss at all, whatever their logits.
    noisy = logits.copy()
    noisy[weights == 0] += 100.0 * rng.normal(size=noisy[weights == 0].shape)
    again = token_cross_entropy(jnp.asarray(noisy), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(again["loss_sum"]), float(out["loss_sum"]), rtol=1e-6)


def test_z_loss_is_weighted_square_log_partition():
    logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    out = token_cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]), z_loss=1e-2)
    log_z = np.log(np.exp([1.0, 2.0, 3.0]).sum())
    np.testing.assert_allclose(float(out["z_loss_sum"]), 1e-2 * log_z**2, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_gradient_matches_numpy(dtype):
    """The hand-written backward (softmax minus one-hot, z-loss included) against the gradient
    written out in numpy; it comes back in the logits' dtype."""
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    logits = (3 * jax.random.normal(keys[0], (2, 6, 13))).astype(dtype)
    targets = jax.random.randint(keys[1], (2, 6), 0, 13)
    weights = (jax.random.uniform(keys[2], (2, 6)) > 0.3).astype(jnp.float32)

    def total(x):
        sums = token_cross_entropy(x, targets, weights, z_loss=0.1)
        return sums["loss_sum"] + sums["z_loss_sum"]

    grad = jax.grad(total)(logits)
    assert grad.dtype == dtype
    x = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    probs = np.exp(x - log_z[..., None])
    w = np.asarray(weights, np.float64)[..., None]
    expected = w * (probs - np.eye(13)[np.asarray(targets)]) + w * 0.1 * 2 * log_z[..., None] * probs
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, atol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_cosine_schedule_values():
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay="cosine")
    s = learning_rate_schedule(cfg, max_steps=2000)
    np.testing.assert_allclose(float(s(0)), 1e-3 / 101, rtol=1e-5)
    np.testing.assert_allclose(float(s(99)), 1e-3 * 100 / 101, rtol=1e-5)
    np.testing.assert_allclose(float(s(100)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(1050)), 5.5e-4, rtol=1e-5)  # halfway: midpoint of lr and min_lr
    np.testing.assert_allclose(float(s(2000)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(5000)), 1e-4, rtol=1e-5)  # flat after decay_steps


def test_linear_and_constant_schedules():
    lin = learning_rate_schedule(
        OptimizerConfig(lr=1.0, min_lr=0.0, warmup_steps=10, decay="linear", decay_steps=110), max_steps=999
    )
    np.testing.assert_allclose([float(lin(10)), float(lin(60)), float(lin(110))], [1.0, 0.5, 0.0], atol=1e-6)
    const = learning_rate_schedule(OptimizerConfig(lr=0.5, min_lr=0.0, warmup_steps=0, decay="constant"), 100)
    np.testing.assert_allclose([float(const(0)), float(const(99))], [0.5, 0.5])


def test_weight_decay_mask_excludes_biases_norms_embeddings():
    _, params = init_params(tiny_model_config("gpt2"))
    mask = weight_decay_mask(params, ("bias", "scale", "embedding"))
    assert mask["token_embed"]["embedding"] is False and mask["position_embed"]["embedding"] is False
    assert mask["layers_0"]["attn"]["query"]["kernel"] is True
    assert mask["layers_0"]["attn"]["query"]["bias"] is False
    assert mask["layers_0"]["attn_norm"]["scale"] is False and mask["final_norm"]["bias"] is False
    assert mask["layers_0"]["mlp"]["down"]["kernel"] is True
    everything = weight_decay_mask(params, ())
    assert all(jax.tree.leaves(everything))


def test_decay_applies_to_masked_in_params_only():
    _, params = init_params(tiny_model_config("gpt2"))
    params = jax.tree.map(lambda x: jnp.ones_like(x), params)
    opt = build_optimizer(
        OptimizerConfig(lr=0.1, min_lr=0.1, warmup_steps=0, decay="constant", weight_decay=0.5, grad_clip=0.0),
        max_steps=10,
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["layers_0"]["mlp"]["up"]["kernel"]), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["layers_0"]["mlp"]["up"]["bias"]), 1.0)
    np.testing.assert_array_equal(np.asarray(new["token_embed"]["embedding"]), 1.0)


def test_gradient_clipping_is_part_of_the_optimizer():
    """With grad_clip=1 the optimizer equals clip-then-AdamW, and differs from no clipping
    (Adam is not scale invariant across steps whose gradient norms differ)."""
    params = {"w": jnp.ones((4,))}
    grads = [{"w": jnp.full((4,), 10.0)}, {"w": jnp.full((4,), 0.1)}]

    def run(opt):
        state, out = opt.init(params), []
        for g in grads:
            updates, state = opt.update(g, state, params)
            out.append(np.asarray(updates["w"]))
        return out

    make = lambda clip: build_optimizer(
        OptimizerConfig(lr=1.0, min_lr=1.0, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=clip), 10
    )
    reference = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    )
    clipped, unclipped, expected = run(make(1.0)), run(make(0.0)), run(reference)
    np.testing.assert_allclose(clipped[1], expected[1], rtol=1e-6)
    assert not np.allclose(clipped[1], unclipped[1])


def test_model_flops_and_peak_table():
    from types import SimpleNamespace

    from flaxgpt import mfu

    cfg = ModelConfig(recipe="gpt2", vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128).resolved()
    # nanoGPT's estimate_mfu: 6N + 12 L H Q T per token
    assert mfu.flops_per_token(cfg, 800_000) == 6 * 800_000 + 12 * 4 * 4 * 32 * 64
    assert mfu.known_peak(SimpleNamespace(device_kind="TPU v5 lite"), "bfloat16") == 197e12
    assert mfu.known_peak(SimpleNamespace(device_kind="TPU v5p"), "bfloat16") == 459e12
    assert mfu.known_peak(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert mfu.known_peak(SimpleNamespace(device_kind="cpu"), "float32") is None
    assert 1e9 < mfu.measured_peak("float32") < 1e14


_FAULTS_PER_STEP = """
import sys
from flaxgpt import host_allocator, mfu
applied = host_allocator.tune_host_allocator()
from benchmarks.train_throughput import CONFIGS, FlaxgptTrainer
trainer = FlaxgptTrainer({**CONFIGS["shakespeare_char"], "batch": int(sys.argv[1]), "steps": 4}, "float32", warmup=2)
trainer.time(8)  # a first window can still grow the heap (~1,600 faults once, more beside a busy worker)
settled = trainer.page_faults
trainer.time(16)
print(applied, (trainer.page_faults - settled) / 16)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_tuned_host_allocator_stops_per_step_page_faults():
    """XLA:CPU's per-step buffers must be reused, not faulted in anew each step (a third of
    shakespeare_char's CPU step before the tuning); FLAXGPT_HOST_ALLOCATOR=default opts out.
    At batch 12 the step's buffer is 45 MiB; at batch 24 it is 95 MiB, over the 64 MB a worker
    thread's own arena can hold, which only `one-arena` keeps from being mapped afresh."""

    def faults(setting: str, batch: int) -> tuple[str, float]:
        env = {**os.environ, "FLAXGPT_HOST_ALLOCATOR": setting}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_PER_STEP, str(batch)],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        applied, per_step = out.stdout.split()[-2:]
        return applied, float(per_step)

    default_applied, default_faults = faults("default", 12)
    tuned_applied, tuned_faults = faults("tuned", 12)
    assert (default_applied, tuned_applied) == ("False", "True")
    assert default_faults > 5_000  # 4 KiB pages: the buffers come back from the kernel each step
    assert tuned_faults < default_faults / 4  # measured: 12,787 -> 0-3 alone, 0-100 beside a busy worker
    large_tuned = faults("tuned", 24)[1]
    large_one_arena = faults("one-arena", 24)[1]
    assert large_tuned > 5_000  # measured 24,500: glibc maps the thread's 95 MiB request afresh
    assert large_one_arena < large_tuned / 4  # measured 0


def test_unknown_host_allocator_setting_is_named(monkeypatch):
    from flaxgpt import host_allocator

    monkeypatch.setenv("FLAXGPT_HOST_ALLOCATOR", "off")
    with pytest.raises(ConfigError, match="FLAXGPT_HOST_ALLOCATOR='off'"):
        host_allocator.tune_host_allocator()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_host_allocator_advice_names_one_arena_when_buffers_outgrow_a_thread_arena(monkeypatch):
    """The training loop logs this before its first step: compiled ahead (nothing runs here), a
    step with a [4608, 4608] float32 temporary (81 MiB) gets the advice, a small one does not,
    nor does a process already on `one-arena` or opted out with `default`."""
    from flaxgpt import host_allocator

    big = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
    small = jax.jit(lambda x: jnp.tanh(x.T @ x))
    x = jax.ShapeDtypeStruct((4608, 64), jnp.float32)
    monkeypatch.setenv("FLAXGPT_HOST_ALLOCATOR", "tuned")
    assert host_allocator.host_allocator_advice(big, x) is None  # 81 MiB: too little to be worth one arena
    monkeypatch.setattr(host_allocator, "ADVICE_MIN_BYTES", 0)
    advice = host_allocator.host_allocator_advice(big, x)
    assert advice is not None and "81 MiB" in advice and "FLAXGPT_HOST_ALLOCATOR=one-arena" in advice
    assert host_allocator.host_allocator_advice(small, x) is None
    for setting in ("one-arena", "default"):
        monkeypatch.setenv("FLAXGPT_HOST_ALLOCATOR", setting)
        assert host_allocator.host_allocator_advice(big, x) is None
