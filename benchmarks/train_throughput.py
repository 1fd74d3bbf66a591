"""Training throughput and MFU: flaxgpt's jitted train step against the same model and step in
PyTorch eager (benchmarks/torch_reference.py), side by side in one process.

    python benchmarks/train_throughput.py                    # shakespeare_char and GPT-2 124M
    python benchmarks/train_throughput.py --only shakespeare_char --rounds 10
    python benchmarks/train_throughput.py --only gpt2_124m --dtype bfloat16 --batch 16   # a GPU

On a GPU or TPU the MFU column uses the datasheet peak and the next column a bf16/f32 matmul
measured in the same process; the PyTorch reference runs in a process of its own on the same
GPU (bfloat16 autocast, flash attention, fused AdamW) and not at all on a TPU.

Both steps are built first, then timed in alternating rounds of `steps` steps; each side's
figure is its best round (a shared machine's noise only ever slows a round down). Each row:
tokens/s, MFU against a matmul peak measured here on the same device and dtype (the datasheet
peak on known accelerators), and the ratio flaxgpt / PyTorch. The process runs with flaxgpt's
host-allocator tuning (`perf.tune_host_allocator`, as the CLIs do), which the in-process PyTorch
reference then shares; a last column runs PyTorch as shipped, in a fresh process with the
default allocator. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

# The PyTorch reference may run beside this process on the same GPU: let it have the memory
# that JAX would otherwise reserve up front (no effect on a CPU).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from flaxgpt import config as C  # noqa: E402
from flaxgpt import perf  # noqa: E402
from flaxgpt.model import Transformer  # noqa: E402
from flaxgpt.optim import build_optimizer, learning_rate_schedule  # noqa: E402
from flaxgpt.sharding import logical_rules, make_mesh  # noqa: E402
from flaxgpt.state import create_train_state  # noqa: E402
from flaxgpt.trainers.step import make_train_step  # noqa: E402

# (vocab, block, layers, heads, d_model, batch, steps per round, rounds): shakespeare_char is
# nanoGPT's CPU configuration; GPT-2 124M at sequence 1024 takes seconds per step on a CPU.
# On an accelerator: `accel` replaces batch, steps and rounds.
CONFIGS = {
    "shakespeare_char": dict(
        vocab=65,
        block=64,
        n_layer=4,
        n_head=4,
        d_model=128,
        batch=12,
        steps=50,
        rounds=6,
        accel=dict(batch=12, steps=100, rounds=5),
    ),
    "gpt2_124m": dict(
        vocab=50304,
        block=1024,
        n_layer=12,
        n_head=12,
        d_model=768,
        batch=1,
        steps=2,
        rounds=2,
        accel=dict(batch=16, steps=20, rounds=5),
    ),
}


class FlaxgptTrainer:
    """The trainers' own `make_train_step`, jitted with the state donated; `time(steps)` runs it."""

    def __init__(self, shape: dict, dtype: str, warmup: int = 2, attention: str = "auto", remat: str = "none"):
        cfg = C.ModelConfig(
            recipe="gpt2",
            vocab_size=shape["vocab"],
            block_size=shape["block"],
            n_layer=shape["n_layer"],
            n_head=shape["n_head"],
            d_model=shape["d_model"],
            use_bias=False,
            dtype=dtype,
            attention=attention,
            remat=remat,
        ).resolved()
        opt_cfg = C.OptimizerConfig(lr=1e-3, warmup_steps=10, b2=0.99, weight_decay=0.1, no_decay=("bias", "scale"))
        model, optimizer = Transformer(cfg), build_optimizer(opt_cfg, 1000)
        mesh, rules = make_mesh(C.MeshConfig(), jax.devices()[:1]), logical_rules(C.DEFAULT_LOGICAL_AXIS_RULES)
        self.state, _ = create_train_state(model, optimizer, jnp.zeros((1, cfg.block_size), jnp.int32), mesh, rules, 0)
        self.step = jax.jit(
            make_train_step(
                model, optimizer, learning_rate_schedule(opt_cfg, 1000), C.TrainConfig(batch_size=shape["batch"])
            ),
            donate_argnums=0,
        )
        rng = np.random.default_rng(0)
        b, t = shape["batch"], shape["block"]

        def batch() -> dict:
            tokens = rng.integers(0, shape["vocab"], size=(b, t + 1)).astype(np.int32)
            return {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "loss_weights": np.ones((b, t), np.float32),
                "segment_ids": np.ones((b, t), np.int32),
                "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            }

        self.batches = [jax.device_put(batch()) for _ in range(min(shape["steps"], 20))]
        self.calls = 0
        self.timed_steps, self.page_faults = 0, 0  # over `time` calls: not compilation or warm-up
        self.compile_s = self._run(1)
        self._run(warmup)
        self.tokens_per_step = b * t
        self.n_params = sum(int(x.size) for x in jax.tree.leaves(self.state.params))
        self.flops_per_token = perf.flops_per_token(cfg, self.n_params)

    def _run(self, steps: int) -> float:
        """Seconds for `steps` steps, up to the last step's metrics being ready."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batches[self.calls % len(self.batches)])
            self.calls += 1
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def time(self, steps: int) -> float:
        """`_run`, with the process's minor page faults added to `page_faults`."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = self._run(steps)
        self.timed_steps += steps
        self.page_faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return seconds


def pytorch_as_shipped(shape: dict, steps: int, rounds: int, device: str, dtype: str) -> dict | None:
    """The PyTorch reference in a fresh process, untouched by flaxgpt's allocator tuning."""
    args = [
        f"--vocab={shape['vocab']}",
        f"--block_size={shape['block']}",
        f"--n_layer={shape['n_layer']}",
        f"--n_head={shape['n_head']}",
        f"--d_model={shape['d_model']}",
        f"--batch={shape['batch']}",
        f"--steps={steps}",
        f"--rounds={rounds}",
        f"--device={device}",
        f"--dtype={dtype}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "FLAXGPT_HOST_ALLOCATOR"}
    done = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "benchmarks", "torch_reference.py"), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        print(f"PyTorch as shipped failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: per configuration)")
    parser.add_argument("--rounds", type=int, help="alternating timed rounds (default: per configuration)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: per configuration)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"), help="model.attention")
    parser.add_argument(
        "--remat",
        default="none",
        choices=("none", "full", "dots", "dots_no_batch", "save_attention_out"),
        help="model.remat",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference (no torch installed)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    allocator = perf.host_allocator_setting() if perf.tune_host_allocator() else "default"
    peak, peak_source = perf.peak_flops(args.dtype)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    measured = perf.measured_peak(args.dtype) if on_cpu else perf.measured_peak(args.dtype, 8192)
    torch_device = "cpu" if on_cpu else "cuda" if "nvidia" in device.device_kind.lower() else None
    with_torch = not args.no_torch and torch_device is not None
    rows = []
    for name in args.only or list(CONFIGS):
        shape = dict(CONFIGS[name]) if on_cpu else dict(CONFIGS[name], **CONFIGS[name]["accel"])
        shape["batch"] = args.batch or shape["batch"]
        steps, rounds = args.steps or shape["steps"], args.rounds or shape["rounds"]
        ours = FlaxgptTrainer(shape, args.dtype, attention=args.attention, remat=args.remat)
        theirs = None
        if with_torch and on_cpu:  # on a GPU, two frameworks' allocators in one process would contend
            from benchmarks.torch_reference import Trainer

            theirs = Trainer(
                shape["vocab"], shape["block"], shape["n_layer"], shape["n_head"], shape["d_model"], shape["batch"]
            )
        ours_s, theirs_s = [], []
        for _ in range(rounds):  # alternate, so both sides see the same machine
            ours_s.append(ours.time(steps))
            if theirs:
                theirs_s.append(theirs.time(steps))
        shipped = pytorch_as_shipped(shape, steps, rounds, torch_device, args.dtype) if with_torch else None
        rate = lambda seconds: steps * ours.tokens_per_step / min(seconds)
        row = {
            "name": name,
            "shape": shape,
            "steps": steps,
            "rounds": rounds,
            "params": ours.n_params,
            "compile_s": ours.compile_s,
            "faults": ours.page_faults / ours.timed_steps,
            "ours": rate(ours_s),
            "torch": rate(theirs_s) if theirs else None,
            "shipped": shipped["tokens_per_sec"] if shipped else None,
            "torch_version": shipped["version"] if shipped else None,
        }
        row["mfu"] = row["ours"] * ours.flops_per_token / peak
        row["mfu_measured"] = row["ours"] * ours.flops_per_token / measured
        row["torch_mfu"] = row["torch"] * ours.flops_per_token / peak if theirs else None
        rows.append(row)
        print(
            f"{name}: flaxgpt {row['ours']:,.0f} tok/s (MFU {row['mfu']:.1%})"
            + (f", PyTorch {row['torch']:,.0f} tok/s, ratio {row['ours'] / row['torch']:.2f}x" if theirs else "")
            + (f", PyTorch as shipped {row['shipped']:,.0f} tok/s" if shipped else ""),
            flush=True,
        )

    torch_version = next((r["torch_version"] for r in rows if r["torch_version"]), "not run")
    command = " ".join(["python benchmarks/train_throughput.py", *sys.argv[1:]])
    header = (
        f"## train_throughput — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cpus, "
        f"{device.platform} ({device.device_kind}), jax {jax.__version__}, torch {torch_version}, {args.dtype}\n"
        f"command: `{command}`; peak {peak / 1e9:,.0f} GFLOP/s ({peak_source}), measured matmul peak "
        f"{measured / 1e9:,.0f} GFLOP/s; attention {args.attention}, remat {args.remat}; host allocator "
        f"{allocator}; best of alternating rounds\n"
    )
    table = [
        "| model | batch x seq | params | steps x rounds | flaxgpt tok/s | MFU | MFU of measured peak | compile s "
        "| page faults/step | PyTorch tok/s "
        "| PyTorch MFU | flaxgpt / PyTorch | PyTorch as shipped tok/s | flaxgpt / as shipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, spec: format(x, spec) if x is not None else "—"
    ratio = lambda ours, theirs: f"{ours / theirs:.2f}x" if theirs else "—"
    for r in rows:
        table.append(
            f"| {r['name']} | {r['shape']['batch']} x {r['shape']['block']} | {r['params'] / 1e6:.2f}M | "
            f"{r['steps']} x {r['rounds']} | {r['ours']:,.0f} | {r['mfu']:.1%} | {r['mfu_measured']:.1%} | "
            f"{r['compile_s']:.1f} | "
            f"{r['faults']:,.0f} | "
            f"{fmt(r['torch'], ',.0f')} | {fmt(r['torch_mfu'], '.1%')} | "
            f"{ratio(r['ours'], r['torch'])} | {fmt(r['shipped'], ',.0f')} | {ratio(r['ours'], r['shipped'])} |"
        )
    text = header + "\n" + "\n".join(table) + "\n"
    print("\n" + text)
    if not args.no_record:
        with open(os.path.join(_ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
