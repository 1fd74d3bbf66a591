"""The jitted train step: accumulation equals one big batch, non-finite steps are skipped,
and the data-parallel mesh gives the single-device result."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt import config as C
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import batch_sharding, logical_rules, make_mesh, place_batch
from flaxgpt.state import create_train_state
from flaxgpt.trainers.lm import make_train_step
from tests.conftest import REPO, tiny_model_config


def _setup(accum: int = 1, recipe: str = "gpt2", optimizer=None):
    model_cfg = tiny_model_config(recipe)
    train_cfg = C.TrainConfig(batch_size=8, grad_accum_steps=accum)
    opt_cfg = C.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2)
    model = Transformer(model_cfg)
    optimizer = optimizer or build_optimizer(opt_cfg, 10)
    mesh = make_mesh(C.MeshConfig())
    rules = logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    state, shardings = create_train_state(model, optimizer, jnp.zeros((1, model_cfg.block_size), jnp.int32),
                                          mesh, rules, seed=0)
    step = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(opt_cfg, 10), train_cfg))
    return model_cfg, state, step


def _batch(cfg, n=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(n, cfg.block_size + 1)).astype(np.int32)
    weights = (rng.random((n, cfg.block_size)) < 0.7).astype(np.float32)  # uneven weights per row
    return {
        "inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
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
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 state1.params, state4.params)


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
    cfg, state, step = _setup()
    before = jax.tree.map(np.asarray, state.params)
    bad = dict(_batch(cfg), loss_weights=jnp.full((8, cfg.block_size), jnp.nan))
    state, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))
    state, metrics = step(state, _batch(cfg))  # training carries on with finite parameters
    assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1
    assert float(metrics["lr"]) == pytest.approx(1e-2 / 3)  # schedule counts applied updates only


_DATA_PARALLEL_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
from flaxgpt import config as C
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import batch_sharding, logical_rules, make_mesh, place_batch
from flaxgpt.state import create_train_state
from flaxgpt.trainers.lm import make_train_step
import flax.linen as nn
out = {}
for n in (1, 8):
    mcfg = C.ModelConfig(recipe="llama", vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_heads=2,
                         d_model=32).resolved()
    model, opt_cfg = Transformer(mcfg), C.OptimizerConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(opt_cfg, 10)
    mesh = make_mesh(C.MeshConfig(data=-1), jax.devices()[:n])
    rules = logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    state, sh = create_train_state(model, opt, jnp.zeros((1, 16), jnp.int32), mesh, rules, 0)
    bs = batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(make_train_step(model, opt, learning_rate_schedule(opt_cfg, 10), C.TrainConfig(batch_size=16)),
                       in_shardings=(sh, bs), out_shardings=(sh, None), donate_argnums=0)
        losses = []
        for i in range(5):
            t = np.random.default_rng(i).integers(0, 40, size=(16, 17)).astype(np.int32)
            batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_weights": np.ones((16, 16), np.float32),
                     "segment_ids": np.ones((16, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (16, 1))}
            state, m = step(state, place_batch(batch, bs))
            losses.append(float(m["loss"]))
    out[n] = {"losses": losses, "batch_spec": str(bs.spec), "devices": len(state.params["token_embed"]["embedding"].sharding.device_set)}
print(json.dumps(out))
"""


def test_data_parallel_over_8_simulated_devices_matches_one_device(tmp_path):
    import subprocess, sys, os
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["8"]["devices"] == 8 and "data" in out["8"]["batch_spec"]
    np.testing.assert_allclose(out["8"]["losses"], out["1"]["losses"], rtol=1e-5)
