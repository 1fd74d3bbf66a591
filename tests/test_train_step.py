"""The jitted train step: accumulation equals one big batch, non-finite steps are skipped.
(Sharded equivalence lives in test_sharding.py.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt import config as C
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import logical_rules, make_mesh
from flaxgpt.state import create_train_state
from flaxgpt.trainers.step import make_train_step
from tests.conftest import tiny_model_config


def _setup(accum: int = 1, recipe: str = "gpt2", optimizer=None, donate: bool = False, **model_fields):
    model_cfg = tiny_model_config(recipe, **model_fields)
    train_cfg = C.TrainConfig(batch_size=8, grad_accum_steps=accum)
    opt_cfg = C.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2)
    model = Transformer(model_cfg)
    optimizer = optimizer or build_optimizer(opt_cfg, 10)
    mesh = make_mesh(C.MeshConfig())
    rules = logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    state, shardings = create_train_state(
        model, optimizer, jnp.zeros((1, model_cfg.block_size), jnp.int32), mesh, rules, seed=0
    )
    step = jax.jit(
        make_train_step(model, optimizer, learning_rate_schedule(opt_cfg, 10), train_cfg),
        donate_argnums=0 if donate else (),
    )
    return model_cfg, state, step


def _batch(cfg, n=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(n, cfg.block_size + 1)).astype(np.int32)
    weights = (rng.random((n, cfg.block_size)) < 0.7).astype(np.float32)  # uneven weights per row
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "loss_weights": jnp.asarray(weights),
        "segment_ids": jnp.ones((n, cfg.block_size), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(cfg.block_size), (n, cfg.block_size)),
    }


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_accumulating_four_micro_batches_equals_one_big_batch(recipe):
    # Plain SGD keeps parameters linear in the gradients, so they compare tightly (Adam's
    # m/sqrt(v) would turn a rounding-level gradient difference into a full-size step).
    cfg, state1, step1 = _setup(1, recipe, optax.sgd(0.5))
    _, state4, step4 = _setup(4, recipe, optax.sgd(0.5))
    for i in range(3):
        state1, m1 = step1(state1, _batch(cfg, seed=i))
        state4, m4 = step4(state4, _batch(cfg, seed=i))
        np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
        assert float(m1["tokens"]) == float(m4["tokens"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
        state1.params,
        state4.params,
    )


def test_loss_falls_when_fitting_one_batch():
    cfg, state, step = _setup()
    batch = _batch(cfg)
    first = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < 0.8 * first
    assert int(state.step) == 10


def test_non_finite_step_is_skipped_and_counted():
    cfg, state, step = _setup(donate=True)  # donated, as the trainers run it
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    bad = dict(_batch(cfg), loss_weights=jnp.full((8, cfg.block_size), jnp.nan))
    state, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, (state.params, state.opt_state)))
    state, metrics = step(state, _batch(cfg))  # training carries on with finite parameters
    assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1
    assert float(metrics["lr"]) == pytest.approx(1e-2 / 3)  # schedule counts applied updates only


def test_donated_step_updates_parameters_and_moments_in_place():
    """The non-finite guard must not make XLA copy the state: selecting between old and new
    values of donated buffers copied every parameter and Adam moment each step (71 copies,
    ~2 % of shakespeare_char's CPU step)."""
    cfg, state, step = _setup(donate=True)
    hlo = step.lower(state, _batch(cfg)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    inputs = set(re.findall(r"%(\S+) = \S+ parameter\(\d+\)", entry))
    copied = [
        (shape, name)
        for shape, name in re.findall(r"= (\S+) copy\(%([^)\s]+)\)", entry)
        if name in inputs and not shape.endswith("[]")
    ]
    assert len(inputs) > 2 * len(jax.tree.leaves(state.params)), "expected parameters and moments as inputs"
    assert copied == []


def test_bfloat16_parameters_train_and_keep_their_optimizer_state_dtypes():
    """Adam's moments of bfloat16 parameters start bfloat16; the update must not turn them float32
    (the non-finite guard's two branches would disagree and the step would not trace)."""
    cfg, state, step = _setup(param_dtype="bfloat16")
    before = [x.dtype for x in jax.tree.leaves(state.opt_state)]
    new, metrics = step(state, _batch(cfg))
    assert [x.dtype for x in jax.tree.leaves(new.opt_state)] == before and jnp.bfloat16 in before
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
