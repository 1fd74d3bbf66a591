"""Training throughput and MFU: flaxgpt's jitted train step against the same model and step in
PyTorch eager (benchmarks/torch_reference.py), side by side in one process.

    python benchmarks/train_throughput.py                    # shakespeare_char and GPT-2 124M
    python benchmarks/train_throughput.py --only shakespeare_char --rounds 10
    python benchmarks/train_throughput.py --only gpt2_124m --dtype bfloat16 --batch 16   # a GPU
    python benchmarks/train_throughput.py --only gpt2_124m --dtype bfloat16 --torch-compile --profile-dir DIR
    python benchmarks/train_throughput.py --only llama_1b --dtype bfloat16 --no-torch   # a GPU: MFU only
    python benchmarks/train_throughput.py --tiny --only llama_1b --no-record           # seconds, any machine

On a GPU or TPU the MFU column uses the datasheet peak and the next column a bf16/f32 matmul
measured in the same process; the PyTorch reference runs in a process of its own on the same
GPU (bfloat16 autocast, flash attention, fused AdamW) and not at all on a TPU.

Both steps are built first, then timed in alternating rounds of `steps` steps; each side's
figure is its best round (a shared machine's noise only ever slows a round down). Each row:
tokens/s, MFU against a matmul peak measured here on the same device and dtype (the datasheet
peak on known accelerators), and the ratio flaxgpt / PyTorch. The process runs with flaxgpt's
host-allocator tuning (`host_allocator.tune_host_allocator`, as the CLIs do), which the in-process PyTorch
reference then shares; a last column runs PyTorch as shipped, in a fresh process with the
default allocator, and `--torch-compile` adds one more fresh process with the model under
`torch.compile` (nanoGPT's --compile). `--profile-dir` profiles a few more steps of the same
jitted step (profile_step.py's tables, no second compilation) into DIR/profile_NAME.md; `--json`
writes the rows for benchmarks/gpu_session.py. `llama_1b` (a Llama-3.2-1B-shaped model: GQA,
SwiGLU, RoPE, tied 128256 vocabulary, sequence 2048) runs only when named, and only in flaxgpt
(the PyTorch reference is GPT-2-shaped). `--tiny` shrinks every configuration to a few-second
shape of the same recipe, to check the script itself. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
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

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt import host_allocator, mfu  # noqa: E402
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
    # Llama-3.2-1B's shape (1.24B parameters): 16 layers of 2048, 32 query / 8 KV heads, SwiGLU 8192,
    # tied 128256 vocabulary, sequence 2048. Accelerators only (minutes per step on a CPU):
    # `accel_only` keeps it out of the default list. `model` holds ModelConfig fields beyond the shape.
    "llama_1b": dict(
        vocab=128256,
        block=2048,
        n_layer=16,
        n_head=32,
        d_model=2048,
        batch=1,
        steps=1,
        rounds=1,
        accel=dict(batch=8, steps=10, rounds=3),
        accel_only=True,
        model=dict(recipe="llama", n_kv_heads=8, d_ff=8192, tie_embeddings=True),
    ),
}

# --tiny: each configuration's recipe at a shape that builds, runs and profiles in seconds anywhere.
TINY = dict(vocab=256, block=64, n_layer=2, n_head=4, d_model=64, batch=2, steps=2, rounds=2)


def shape_for(name: str, on_cpu: bool, tiny: bool = False, batch: int | None = None) -> dict:
    """The configuration's shape on this platform: CPU figures, `accel` on a GPU/TPU, or --tiny."""
    shape = dict(CONFIGS[name])
    if tiny:
        shape.update(TINY)
        model = dict(shape.get("model", {}))
        if model.get("n_kv_heads"):
            model["n_kv_heads"] = 2
        model.pop("d_ff", None)
        shape["model"] = model
    elif not on_cpu:
        shape.update(shape["accel"])
    shape["batch"] = batch or shape["batch"]
    return shape


class FlaxgptTrainer:
    """The trainers' own `make_train_step`, jitted with the state donated; `time(steps)` runs it."""

    def __init__(self, shape: dict, dtype: str, warmup: int = 2, attention: str = "auto", remat: str = "none"):
        fields = dict(
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
        )
        cfg = C.ModelConfig(**{**fields, **shape.get("model", {})}).resolved()
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
        self.cfg = cfg
        self.flops_per_token = mfu.flops_per_token(cfg, self.n_params)

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


def pytorch_as_shipped(
    shape: dict,
    steps: int,
    rounds: int,
    device: str,
    dtype: str,
    compile_backend: str | None = None,
    timeout: float | None = None,
) -> dict | None:
    """The PyTorch reference in a fresh process, untouched by flaxgpt's allocator tuning;
    with `compile_backend`, its model under `torch.compile` with that backend. None if it
    fails or outlasts `timeout` seconds (said on stderr): the flaxgpt row stands without it."""
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
    if compile_backend:
        args += ["--compile", f"--compile-backend={compile_backend}"]
    what = f"PyTorch {'compiled (' + compile_backend + ')' if compile_backend else 'as shipped'}"
    env = {k: v for k, v in os.environ.items() if k != "FLAXGPT_HOST_ALLOCATOR"}
    try:
        done = subprocess.run(
            [sys.executable, os.path.join(_ROOT, "benchmarks", "torch_reference.py"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"{what} did not finish in {timeout:.0f} s: left out", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"{what} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(
    trainer: FlaxgptTrainer, name: str, shape: dict, dtype: str, steps: int, out_dir: str, trace_dir: str | None
) -> None:
    """profile_step.py's tables for `steps` more steps of the same jitted step, into
    out_dir/profile_NAME.md (and printed); the trace stays in trace_dir when given."""
    import tempfile

    from benchmarks.profile_step import summarize

    trace_dir = trace_dir or tempfile.mkdtemp(prefix="flaxgpt-profile-")
    with jax.profiler.trace(trace_dir):
        seconds = trainer._run(steps)
    text = (
        f"# profile — {name} {shape['batch']}x{shape['block']} {dtype}, attention {trainer.cfg.attention}, "
        f"remat {trainer.cfg.remat}, {jax.devices()[0].device_kind}, jax {jax.__version__}: "
        f"{seconds / steps * 1e3:.2f} ms per step under the profiler ({steps} steps)\n"
        + summarize(trace_dir, steps, 25)
        + "\n"
    )
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_{name}.md"), "w") as f:
        f.write(text)


def out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


def build_trainer(shape: dict, dtype: str, attention: str, remat: str, remat_on_oom: str | None) -> FlaxgptTrainer:
    """FlaxgptTrainer, built (compiled, warmed up) again with `remat_on_oom` if it runs out of memory."""
    try:
        return FlaxgptTrainer(shape, dtype, attention=attention, remat=remat)
    except Exception as e:  # noqa: BLE001 - XLA's errors have no narrower common class across versions
        if not (remat_on_oom and out_of_memory(e)):
            raise
        print(f"out of device memory with remat {remat} ({str(e).splitlines()[0][:200]}): remat {remat_on_oom}")
    gc.collect()  # the first attempt's buffers, now unreferenced
    return FlaxgptTrainer(shape, dtype, attention=attention, remat=remat_on_oom)


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
    parser.add_argument(
        "--remat-on-oom",
        choices=("full", "dots", "dots_no_batch", "save_attention_out"),
        help="when the step runs out of device memory, build it again with this model.remat",
    )
    parser.add_argument("--tiny", action="store_true", help="a few-second shape of each recipe (checks the script)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference (no torch installed)")
    parser.add_argument("--torch-compile", action="store_true", help="also time PyTorch under torch.compile")
    parser.add_argument("--torch-compile-backend", default="inductor", help="torch.compile backend (eager: quick)")
    parser.add_argument("--torch-timeout", type=float, default=600, help="seconds for each PyTorch subprocess")
    parser.add_argument("--profile-dir", help="profile --profile-steps more steps into DIR/profile_NAME.md")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--trace-dir", help="keep each profile's trace in TRACE_DIR/NAME (TensorBoard / XProf)")
    parser.add_argument("--json", help="write the rows and the run's conditions to this JSON file")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    allocator = host_allocator.host_allocator_setting() if host_allocator.tune_host_allocator() else "default"
    peak, peak_source = mfu.peak_flops(args.dtype)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    measured = mfu.measured_peak(args.dtype) if on_cpu else mfu.measured_peak(args.dtype, 8192)
    torch_device = "cpu" if on_cpu else "cuda" if "nvidia" in device.device_kind.lower() else None
    with_torch = not args.no_torch and torch_device is not None
    names = args.only or [name for name in CONFIGS if not CONFIGS[name].get("accel_only")]
    rows = []
    command = " ".join(["python benchmarks/train_throughput.py", *sys.argv[1:]])

    def dump(rows: list[dict], table: str | None = None) -> None:
        """--json: the rows so far (written as each row is measured: a killed run keeps them)."""
        if not args.json:
            return
        conditions = {
            "device_kind": device.device_kind,
            "platform": device.platform,
            "jax": jax.__version__,
            "torch": next((r["torch_version"] for r in rows if r.get("torch_version")), None),
            "dtype": args.dtype,
            "peak": peak,
            "peak_source": peak_source,
            "measured_peak": measured,
            "attention": args.attention,
            "remat": args.remat,
            "command": command,
        }
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "rows": rows, "table": table}, f, indent=1)

    for name in names:
        shape = shape_for(name, on_cpu, args.tiny, args.batch)
        steps, rounds = args.steps or shape["steps"], args.rounds or shape["rounds"]
        ours = build_trainer(shape, args.dtype, args.attention, args.remat, args.remat_on_oom)
        # the reference is GPT-2-shaped (learned positions, LayerNorm, GELU): no Llama twin
        torch_here = with_torch and ours.cfg.recipe == "gpt2"
        if with_torch and not torch_here:
            print(f"{name}: no PyTorch reference for recipe {ours.cfg.recipe!r}: flaxgpt only", flush=True)
        theirs = None
        if torch_here and on_cpu:  # on a GPU, two frameworks' allocators in one process would contend
            from benchmarks.torch_reference import Trainer

            theirs = Trainer(
                shape["vocab"], shape["block"], shape["n_layer"], shape["n_head"], shape["d_model"], shape["batch"]
            )
        ours_s, theirs_s = [], []
        for _ in range(rounds):  # alternate, so both sides see the same machine
            ours_s.append(ours.time(steps))
            if theirs:
                theirs_s.append(theirs.time(steps))
        tokens_per_round = steps * ours.tokens_per_step
        rate = lambda seconds: tokens_per_round / min(seconds)
        row = {
            "name": name,
            "shape": shape,
            "steps": steps,
            "rounds": rounds,
            "params": ours.n_params,
            "flops_per_token": ours.flops_per_token,
            "remat": ours.cfg.remat,
            "compile_s": ours.compile_s,
            "faults": ours.page_faults / ours.timed_steps,
            "ours": rate(ours_s),
            "torch": rate(theirs_s) if theirs else None,
        }
        row["mfu"] = row["ours"] * ours.flops_per_token / peak
        row["mfu_measured"] = row["ours"] * ours.flops_per_token / measured
        row["torch_mfu"] = row["torch"] * ours.flops_per_token / peak if theirs else None
        print(f"{name}: flaxgpt {row['ours']:,.0f} tok/s (MFU {row['mfu']:.1%})", flush=True)
        dump([*rows, row])
        if args.profile_dir:  # before PyTorch's processes, so a stuck compile there cannot lose it
            trace = os.path.join(args.trace_dir, name) if args.trace_dir else None
            try:
                profile(ours, name, shape, args.dtype, args.profile_steps, args.profile_dir, trace)
            except Exception as e:  # noqa: BLE001 - the figures stand without their profile
                print(f"{name}: profile failed: {type(e).__name__}: {e}", file=sys.stderr)
        del ours  # its state and batches: let the PyTorch processes have the memory
        shipped = compiled = None
        if torch_here:
            shipped = pytorch_as_shipped(shape, steps, rounds, torch_device, args.dtype, timeout=args.torch_timeout)
        if torch_here and args.torch_compile:
            compiled = pytorch_as_shipped(
                shape,
                steps,
                rounds,
                torch_device,
                args.dtype,
                compile_backend=args.torch_compile_backend,
                timeout=args.torch_timeout,
            )
        row["shipped"] = shipped["tokens_per_sec"] if shipped else None
        row["compiled"] = compiled["tokens_per_sec"] if compiled else None
        row["compiled_warmup_s"] = compiled["warmup_s"] if compiled else None
        row["torch_version"] = (shipped or compiled or {}).get("version")
        rows.append(row)
        if torch_here:
            print(
                f"{name}: flaxgpt {row['ours']:,.0f} tok/s (MFU {row['mfu']:.1%})"
                + (f", PyTorch {row['torch']:,.0f} tok/s, ratio {row['ours'] / row['torch']:.2f}x" if theirs else "")
                + (f", PyTorch as shipped {row['shipped']:,.0f} tok/s" if shipped else "")
                + (f", PyTorch compiled {row['compiled']:,.0f} tok/s" if compiled else ""),
                flush=True,
            )

    torch_version = next((r["torch_version"] for r in rows if r["torch_version"]), "not run")
    compiled_note = f"; torch.compile backend {args.torch_compile_backend}" if args.torch_compile else ""
    header = (
        f"## train_throughput — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cpus, "
        f"{device.platform} ({device.device_kind}), jax {jax.__version__}, torch {torch_version}, {args.dtype}\n"
        f"command: `{command}`; peak {peak / 1e9:,.0f} GFLOP/s ({peak_source}), measured matmul peak "
        f"{measured / 1e9:,.0f} GFLOP/s; attention {args.attention}, remat {args.remat}; host allocator "
        f"{allocator}; best of alternating rounds{compiled_note}\n"
    )
    table = [
        "| model | batch x seq | params | steps x rounds | flaxgpt tok/s | MFU | MFU of measured peak | compile s "
        "| page faults/step | PyTorch tok/s "
        "| PyTorch MFU | flaxgpt / PyTorch | PyTorch as shipped tok/s | flaxgpt / as shipped "
        "| PyTorch compiled tok/s | flaxgpt / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, spec: format(x, spec) if x is not None else "—"
    ratio = lambda ours, theirs: f"{ours / theirs:.2f}x" if theirs else "—"
    for r in rows:
        table.append(
            f"| {r['name']}{'' if r['remat'] == args.remat else ' (remat ' + r['remat'] + ')'} | "
            f"{r['shape']['batch']} x {r['shape']['block']} | {r['params'] / 1e6:.2f}M | "
            f"{r['steps']} x {r['rounds']} | {r['ours']:,.0f} | {r['mfu']:.1%} | {r['mfu_measured']:.1%} | "
            f"{r['compile_s']:.1f} | "
            f"{r['faults']:,.0f} | "
            f"{fmt(r['torch'], ',.0f')} | {fmt(r['torch_mfu'], '.1%')} | "
            f"{ratio(r['ours'], r['torch'])} | {fmt(r['shipped'], ',.0f')} | {ratio(r['ours'], r['shipped'])} | "
            f"{fmt(r['compiled'], ',.0f')} | {ratio(r['ours'], r['compiled'])} |"
        )
    text = header + "\n" + "\n".join(table) + "\n"
    print("\n" + text)
    dump(rows, text)
    if not args.no_record:
        record(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
