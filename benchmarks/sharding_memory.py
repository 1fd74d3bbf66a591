"""Per-device memory of a ~1B-parameter train step under different meshes, and compile time
versus depth with scan over layers, measured *without running* the step: the jitted step is
lowered on abstract inputs (ShapeDtypeStructs carrying shardings) and compiled, and XLA's
`memory_analysis()` reports the buffers each device would hold.

    python benchmarks/sharding_memory.py            # 8 simulated CPU devices unless XLA_FLAGS says otherwise

Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt.model import Transformer  # noqa: E402
from flaxgpt.optim import build_optimizer, learning_rate_schedule  # noqa: E402
from flaxgpt.sharding import batch_sharding, logical_rules, make_mesh  # noqa: E402
from flaxgpt.state import abstract_train_state  # noqa: E402
from flaxgpt.trainers.step import make_train_step  # noqa: E402

GIB = 1024**3
# LLaMA-style ~1B: 18 layers, d_model 2048, 16 heads / 8 KV heads, SwiGLU 5632, vocab 32000.
ONE_B = C.ModelConfig(
    recipe="llama",
    vocab_size=32000,
    block_size=2048,
    n_layer=18,
    n_head=16,
    n_kv_heads=8,
    d_model=2048,
    d_ff=5632,
    scan_layers=True,
    remat="full",
)
BATCH = 8  # global sequences per step


def compile_step(model_cfg: C.ModelConfig, mesh_cfg: C.MeshConfig, batch: int) -> tuple[object, float, int]:
    """(compiled step, seconds to lower + compile, parameter count) for abstract inputs."""
    model_cfg = model_cfg.resolved()
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg.rules)
    model, opt_cfg = Transformer(model_cfg), C.OptimizerConfig()
    optimizer = build_optimizer(opt_cfg, 1000)
    example = jnp.zeros((1, model_cfg.block_size), jnp.int32)
    abstract_state, shardings = abstract_train_state(model, optimizer, example, mesh, rules)
    rows = batch_sharding(mesh, rules)
    tokens = jax.ShapeDtypeStruct((batch, model_cfg.block_size), jnp.int32, sharding=rows)
    abstract_batch = {
        "inputs": tokens,
        "targets": tokens,
        "segment_ids": tokens,
        "positions": tokens,
        "loss_weights": jax.ShapeDtypeStruct(tokens.shape, jnp.float32, sharding=rows),
    }
    step = make_train_step(model, optimizer, learning_rate_schedule(opt_cfg, 1000), C.TrainConfig(batch_size=batch))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = (
            jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, None), donate_argnums=0)
            .lower(abstract_state, abstract_batch)
            .compile()
        )
    seconds = time.perf_counter() - start
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    return compiled, seconds, n_params


def main() -> None:
    n = jax.device_count()
    lines = [
        f"## sharding_memory — {datetime.date.today()} — {platform.processor() or platform.machine()}, "
        f"{n} {jax.devices()[0].platform} devices, jax {jax.__version__}",
        "command: `python benchmarks/sharding_memory.py`",
        "",
    ]
    lines += [
        "| model | mesh (data, fsdp, tensor) | params | state/device (params + Adam) | "
        "temporaries/device | total/device | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mesh_cfg in (C.MeshConfig(data=1, fsdp=n), C.MeshConfig(data=1, fsdp=n // 2, tensor=2)):
        compiled, seconds, n_params = compile_step(ONE_B, mesh_cfg, BATCH)
        mem = compiled.memory_analysis()
        lines.append(
            f"| 1B llama, seq {ONE_B.block_size}, batch {BATCH}, remat full | "
            f"({mesh_cfg.data}, {mesh_cfg.fsdp}, {mesh_cfg.tensor}) | {n_params / 1e9:.2f}B | "
            f"{mem.argument_size_in_bytes / GIB:.2f} GiB | {mem.temp_size_in_bytes / GIB:.2f} GiB | "
            f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GIB:.2f} GiB | {seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", "| layers (d_model 512, fsdp) | scan_layers | compile s |", "|---|---|---|"]
    small = dataclasses.replace(ONE_B, d_model=512, n_head=8, n_kv_heads=4, d_ff=1408, block_size=512)
    for layers, scan in ((4, True), (32, True), (32, False)):
        cfg = dataclasses.replace(small, n_layer=layers, scan_layers=scan)
        _, seconds, _ = compile_step(cfg, C.MeshConfig(data=1, fsdp=n), BATCH)
        lines.append(f"| {layers} | {scan} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    record("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
