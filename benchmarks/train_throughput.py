"""Training throughput and MFU: flaxgpt's jitted train step against the same model and step in
PyTorch eager (benchmarks/torch_reference.py), side by side in one process.

    python benchmarks/train_throughput.py                    # shakespeare_char and GPT-2 124M
    python benchmarks/train_throughput.py --only shakespeare_char --steps 200

Each row: tokens/s (steps after compilation and warm-up, timed to the last step's result),
MFU against a matmul peak measured here on the same device and dtype (the datasheet peak on
known accelerators), and the ratio flaxgpt / PyTorch. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxgpt import config as C  # noqa: E402
from flaxgpt import perf  # noqa: E402
from flaxgpt.model import Transformer  # noqa: E402
from flaxgpt.optim import build_optimizer, learning_rate_schedule  # noqa: E402
from flaxgpt.sharding import logical_rules, make_mesh  # noqa: E402
from flaxgpt.state import create_train_state  # noqa: E402
from flaxgpt.trainers.lm import make_train_step  # noqa: E402

# (vocab, block, layers, heads, d_model, batch, steps): shakespeare_char is nanoGPT's CPU
# configuration; GPT-2 124M at sequence 1024 takes seconds per step on a CPU, so few steps.
CONFIGS = {
    "shakespeare_char": dict(vocab=65, block=64, n_layer=4, n_head=4, d_model=128, batch=12, steps=100),
    "gpt2_124m": dict(vocab=50304, block=1024, n_layer=12, n_head=12, d_model=768, batch=1, steps=3),
}


def flaxgpt_throughput(shape: dict, steps: int, dtype: str) -> dict:
    cfg = C.ModelConfig(recipe="gpt2", vocab_size=shape["vocab"], block_size=shape["block"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"], use_bias=False,
                        dtype=dtype).resolved()
    model = Transformer(cfg)
    opt_cfg = C.OptimizerConfig(lr=1e-3, warmup_steps=10, b2=0.99, weight_decay=0.1, no_decay=("bias", "scale"))
    optimizer = build_optimizer(opt_cfg, 1000)
    mesh, rules = make_mesh(C.MeshConfig(), jax.devices()[:1]), logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
    state, _ = create_train_state(model, optimizer, jnp.zeros((1, cfg.block_size), jnp.int32), mesh, rules, 0)
    step = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(opt_cfg, 1000),
                                   C.TrainConfig(batch_size=shape["batch"])), donate_argnums=0)
    rng = np.random.default_rng(0)
    b, t = shape["batch"], shape["block"]

    def batch():
        tokens = rng.integers(0, shape["vocab"], size=(b, t + 1)).astype(np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": np.ones((b, t), np.float32),
                "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}

    batches = [batch() for _ in range(min(steps, 20))]
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(2):  # warm-up
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    return {"tokens_per_sec": steps * b * t / seconds, "step_ms": 1000 * seconds / steps, "compile_s": compile_s,
            "params": n_params, "flops_per_token": perf.flops_per_token(cfg, n_params)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--steps", type=int, help="timed steps (default: per configuration)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference (no torch installed)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    peak, peak_source = perf.peak_flops(args.dtype)
    device = jax.devices()[0]
    rows = []
    for name in args.only or list(CONFIGS):
        shape = CONFIGS[name]
        steps = args.steps or shape["steps"]
        ours = flaxgpt_throughput(shape, steps, args.dtype)
        theirs = None
        if not args.no_torch and device.platform == "cpu":
            from benchmarks.torch_reference import measure

            theirs = measure(shape["vocab"], shape["block"], shape["n_layer"], shape["n_head"], shape["d_model"],
                             shape["batch"], steps)
        mfu = ours["tokens_per_sec"] * ours["flops_per_token"] / peak
        torch_mfu = theirs["tokens_per_sec"] * ours["flops_per_token"] / peak if theirs else None
        rows.append((name, shape, steps, ours, theirs, mfu, torch_mfu))
        print(f"{name}: flaxgpt {ours['tokens_per_sec']:,.0f} tok/s (MFU {mfu:.1%})"
              + (f", PyTorch {theirs['tokens_per_sec']:,.0f} tok/s, ratio {ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}x"
                 if theirs else ""), flush=True)

    torch_version = next((r[4]["version"] for r in rows if r[4]), "not run")
    header = (f"## train_throughput — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cpus, "
              f"{device.platform} ({device.device_kind}), jax {jax.__version__}, torch {torch_version}, {args.dtype}\n"
              f"command: `python benchmarks/train_throughput.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`; "
              f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})\n")
    table = ["| model | batch x seq | params | timed steps | flaxgpt tok/s | MFU | compile s | PyTorch tok/s "
             "| PyTorch MFU | flaxgpt / PyTorch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, shape, steps, ours, theirs, mfu, torch_mfu in rows:
        table.append(f"| {name} | {shape['batch']} x {shape['block']} | {ours['params'] / 1e6:.2f}M | {steps} | "
                     f"{ours['tokens_per_sec']:,.0f} | {mfu:.1%} | {ours['compile_s']:.1f} | "
                     + (f"{theirs['tokens_per_sec']:,.0f} | {torch_mfu:.1%} | "
                        f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}x |" if theirs else "— | — | — |"))
    text = header + "\n" + "\n".join(table) + "\n"
    print("\n" + text)
    if not args.no_record:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
