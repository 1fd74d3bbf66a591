"""Runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the caller) and prints
one JSON object: for each recipe and mesh, 10 training losses, parameter shardings and the
bytes of params + optimizer state on device 0."""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import config as C
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import batch_sharding, host_value, local_batch_rows, logical_rules, make_mesh, place_batch
from flaxgpt.state import create_train_state
from flaxgpt.trainers.step import make_train_step

MESHES = {
    "1dev": None,
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "d2f2t2": dict(data=2, fsdp=2, tensor=2),
    "f4t2": dict(data=1, fsdp=4, tensor=2),
}
BATCH, LENGTH, STEPS = 16, 16, 10


def model_config(recipe: str) -> C.ModelConfig:
    return C.ModelConfig(
        recipe=recipe,
        vocab_size=64,
        block_size=LENGTH,
        n_layer=1,
        n_head=4,
        n_kv_heads=2 if recipe == "llama" else None,
        d_model=64,
    ).resolved()


def run(recipe: str, mesh_kwargs) -> dict:
    devices = jax.devices()[:1] if mesh_kwargs is None else jax.devices()
    mesh = make_mesh(C.MeshConfig(**(mesh_kwargs or {})), devices)
    rules = logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    model, opt_cfg = Transformer(model_config(recipe)), C.OptimizerConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(opt_cfg, STEPS)
    state, shardings = create_train_state(model, optimizer, jnp.zeros((1, LENGTH), jnp.int32), mesh, rules, 0)
    rows_sharding = batch_sharding(mesh, rules)
    rows = local_batch_rows(rows_sharding, BATCH, LENGTH)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(
            make_train_step(model, optimizer, learning_rate_schedule(opt_cfg, STEPS), C.TrainConfig(batch_size=BATCH)),
            in_shardings=(shardings, rows_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        losses = []
        for i in range(STEPS):
            t = np.random.default_rng(i).integers(0, 64, size=(BATCH, LENGTH + 1)).astype(np.int32)
            batch = {
                "inputs": t[:, :-1],
                "targets": t[:, 1:],
                "loss_weights": np.ones((BATCH, LENGTH), np.float32),
                "segment_ids": np.ones((BATCH, LENGTH), np.int32),
                "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
            }
            local = {k: v[rows] for k, v in batch.items()}
            state, metrics = step(state, place_batch(local, rows, rows_sharding, BATCH))
            losses.append(float(host_value(metrics["loss"])))
    tree = {"params": state.params, "opt_state": state.opt_state}
    device0 = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device0)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    replicated = sum(x.nbytes for x in jax.tree.leaves(tree) if x.sharding.is_fully_replicated)
    specs = {
        jax.tree_util.keystr(p): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
        for p, x in jax.tree_util.tree_leaves_with_path(state.params)
    }
    return {
        "losses": losses,
        "specs": specs,
        "bytes_device0": held,
        "bytes_total": total,
        "bytes_replicated": replicated,
        "batch_spec": str(rows_sharding.spec),
    }


def divisibility_error() -> str:
    mesh = make_mesh(C.MeshConfig(data=1, fsdp=1, tensor=8))
    model = Transformer(model_config("llama"))  # 2 kv heads cannot split 8 ways
    try:
        create_train_state(
            model,
            build_optimizer(C.OptimizerConfig(), 10),
            jnp.zeros((1, LENGTH), jnp.int32),
            mesh,
            logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES),
            0,
        )
    except C.ConfigError as e:
        return str(e)
    return ""


def sharded_generation() -> dict:
    """Greedy and beam generation with parameters and KV cache sharded on (2, 2, 2) vs one device."""
    from flaxgpt.generate import DecodeConfig, completions, generate

    cfg = model_config("llama")
    model, rules = Transformer(cfg), logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    out = {}
    for name, mesh_cfg, devices in (
        ("1dev", C.MeshConfig(), jax.devices()[:1]),
        ("d2f2t2", C.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()),
    ):
        mesh = make_mesh(mesh_cfg, devices)
        state, _ = create_train_state(
            model, build_optimizer(C.OptimizerConfig(), 10), jnp.zeros((1, LENGTH), jnp.int32), mesh, rules, 0
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for label, decode in (
                ("greedy", DecodeConfig(max_new_tokens=8, temperature=0.0)),
                ("beam", DecodeConfig(max_new_tokens=6, num_beams=2)),
            ):
                for batch in (4, 3):  # 3 rows do not divide the 4-way batch sharding
                    gen = generate(model, state.params, prompts[:batch], decode, jax.random.PRNGKey(0), pad_id=0)
                    out[f"{name}/{label}/{batch}"] = completions(gen)
        out[f"{name}/embedding_devices"] = len(state.params["token_embed"]["embedding"].sharding.device_set)
    return out


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    args = sys.argv[1:] or ["gpt2", "llama", "extras"]
    out = {recipe: {name: run(recipe, kw) for name, kw in MESHES.items()} for recipe in args if recipe != "extras"}
    if "extras" in args:
        out["divisibility_error"] = divisibility_error()
        out["generation"] = sharded_generation()
    print(json.dumps(out))
