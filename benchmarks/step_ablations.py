"""Where a CPU train step's time goes, measured by taking parts away rather than under a profiler.

    python benchmarks/step_ablations.py                       # shakespeare_char, 12 rounds of 30 steps
    python benchmarks/step_ablations.py --matmuls             # also each of the step's matmuls alone
    taskset -c 0 python benchmarks/step_ablations.py --matmuls-only         # the matmuls on one core

Why not `profile_step.py` alone: on a CPU the profiler slows the step by half and cannot see
work that a kernel hands to other threads, so its shares mislead (it put ~20 % of
shakespeare_char's step in elementwise fusions; taking GELU, LayerNorm and the softmax away
saves ~5 %). Here the step of `train_throughput.py` is built once as shipped and once per
ablation, each with one part of the model replaced by a stand-in of the same shapes that costs
next to nothing (the attention core by a pass-through of the values, GELU by the identity, ...),
and all are timed in alternating rounds in one process; a part's cost is the step as shipped
minus the step without it. The stand-ins change the numbers the step computes, not the shapes
or the rest of its work; a row whose step skipped updates (a non-finite loss) is marked.

`--matmuls` times each matmul of the step alone, jitted (forward, input gradient, weight
gradient, and the attention's batched products in the model's layout and head-major), against
PyTorch's on the same shapes when torch is installed. Appends the tables to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput  # noqa: E402
from train_throughput import CONFIGS, FlaxgptTrainer  # noqa: E402

from benchmarks._results import record  # noqa: E402
from flaxgpt import host_allocator  # noqa: E402
from flaxgpt import model as model_lib  # noqa: E402


def _values_only(q, k, v, mask, dropout):
    """The attention core as a pass-through of the values (q still feeds the output, at zero weight)."""
    return jnp.repeat(v, q.shape[2] // v.shape[2], axis=2) + 0 * q


def _no_softmax(q, k, v, mask, dropout):
    """Scores straight into the values: both batched matmuls kept, mask and softmax gone."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    scores = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k) / (d * k.shape[1])
    return jnp.einsum("bkgts,bskd->btkgd", scores, v).reshape(b, t, h, d)


class _ScaleOnly(nn.Module):
    """Norm without its statistics: the learned scale alone."""

    cfg: object

    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones_init(), (x.shape[-1],))


def _sgd(opt_cfg, total_steps):
    return optax.sgd(opt_cfg.lr)


# name -> (module, attribute, stand-in): each ablation swaps one attribute while its step is traced.
ABLATIONS: dict[str, tuple[object, str, object]] = {
    "attention core (scores, mask, softmax, values) -> values": (model_lib, "_einsum_attention", _values_only),
    "mask and softmax -> none (both attention matmuls kept)": (model_lib, "_einsum_attention", _no_softmax),
    "GELU -> identity": (model_lib, "gelu", lambda x: x),
    "LayerNorm statistics -> none (scale kept)": (model_lib, "Norm", _ScaleOnly),
    "AdamW + clipping -> SGD": (train_throughput, "build_optimizer", _sgd),
}


@contextlib.contextmanager
def swapped(module: object, attribute: str, stand_in: object) -> Iterator[None]:
    """`module.attribute` is `stand_in` inside the block, and the original again after it."""
    original = getattr(module, attribute)
    setattr(module, attribute, stand_in)
    try:
        yield
    finally:
        setattr(module, attribute, original)


def step_table(shape: dict, rounds: int, steps: int) -> list[str]:
    """The step as shipped and once per ablation, timed in alternating rounds (best round each)."""
    trainers = {"as shipped": FlaxgptTrainer({**shape, "steps": steps}, "float32")}
    for name, (module, attribute, stand_in) in ABLATIONS.items():
        with swapped(module, attribute, stand_in):  # the step is traced and compiled in here
            trainers[name] = FlaxgptTrainer({**shape, "steps": steps}, "float32")
    best = {name: float("inf") for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            best[name] = min(best[name], trainer.time(steps) / steps)
    shipped = best["as shipped"]
    rows = ["| step | ms/step | saved, ms | share of the step |", "|---|---|---|---|"]
    for name, seconds in best.items():
        skipped = int(trainers[name].state.skipped)
        note = f" ({skipped} steps skipped: not comparable)" if skipped else ""
        saved = "" if name == "as shipped" else f"{(shipped - seconds) * 1e3:.2f}"
        share = "" if name == "as shipped" else f"{(shipped - seconds) / shipped:.1%}"
        rows.append(f"| {name}{note} | {seconds * 1e3:.2f} | {saved} | {share} |")
    return rows


MATMUL_CALLS, MATMUL_REPEATS = 50, 7


def _best_seconds(run: Callable[[], object], calls: int, repeats: int) -> float:
    """Best over `repeats` of the mean time of `calls` back-to-back calls (dispatch overlaps compute)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = run()
        if isinstance(out, jax.Array):  # PyTorch's CPU ops return when done
            jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def matmul_table(shape: dict, calls: int = MATMUL_CALLS, repeats: int = MATMUL_REPEATS) -> list[str]:
    """GFLOP/s of each matmul of the step alone: XLA (jitted) and, when installed, PyTorch."""
    try:
        import torch
    except ImportError:
        torch = None
    rows, d, vocab = shape["batch"] * shape["block"], shape["d_model"], shape["vocab"]
    b, t, h = shape["batch"], shape["block"], shape["n_head"]
    hd = d // h
    # (what, einsum, lhs shape, rhs shape, FLOPs, the same product in PyTorch or None)
    cases = []
    for what, (m, k, n) in {
        "q, k, v, attention out": (rows, d, d),
        "MLP up": (rows, d, 4 * d),
        "MLP down": (rows, 4 * d, d),
        "output head": (rows, d, vocab),
    }.items():
        flops = 2 * m * k * n
        cases += [
            (f"{what} {m}x{k}x{n}: forward", "mk,kn->mn", (m, k), (k, n), flops, lambda x, y: x @ y),
            (f"{what}: input gradient", "mn,kn->mk", (m, n), (k, n), flops, lambda x, y: x @ y.T),
            (f"{what}: weight gradient", "mk,mn->kn", (m, k), (m, n), flops, lambda x, y: x.T @ y),
        ]
    flops = 2 * b * h * t * t * hd
    cases += [
        (
            f"attention scores, {b * h} x {t}x{hd}x{t}, model's [b, t, h, d] layout",
            "bthd,bshd->bhts",
            (b, t, h, hd),
            (b, t, h, hd),
            flops,
            None,
        ),
        (
            "attention scores, head-major [b, h, t, d]",
            "bhtd,bhsd->bhts",
            (b, h, t, hd),
            (b, h, t, hd),
            flops,
            lambda x, y: torch.matmul(x, y.transpose(-1, -2)),
        ),
        (
            f"attention values, {b * h} x {t}x{t}x{hd}, head-major",
            "bhts,bhsd->bhtd",
            (b, h, t, t),
            (b, h, t, hd),
            flops,
            lambda x, y: torch.matmul(x, y),
        ),
    ]
    rng = np.random.default_rng(0)
    out = ["| matmul | XLA GFLOP/s | PyTorch GFLOP/s |", "|---|---|---|"]
    for what, spec, lhs_shape, rhs_shape, flops, torch_form in cases:
        lhs = rng.standard_normal(lhs_shape, dtype=np.float32)
        rhs = rng.standard_normal(rhs_shape, dtype=np.float32)
        x, y, product = (
            jax.device_put(lhs),
            jax.device_put(rhs),
            jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y)),
        )
        ours = flops / _best_seconds(lambda: product(x, y), calls, repeats) / 1e9
        theirs = ""
        if torch is not None and torch_form is not None:
            tx, ty = torch.from_numpy(lhs), torch.from_numpy(rhs)
            theirs = f"{flops / _best_seconds(lambda: torch_form(tx, ty), calls, repeats) / 1e9:.0f}"
        out.append(f"| {what} | {ours:.0f} | {theirs} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), default="shakespeare_char")
    parser.add_argument("--rounds", type=int, default=12, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--matmuls", action="store_true", help="also time each of the step's matmuls alone")
    parser.add_argument("--matmuls-only", action="store_true", help="time the matmuls alone, not the steps")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    allocator = host_allocator.host_allocator_setting() if host_allocator.tune_host_allocator() else "default"
    shape = CONFIGS[args.only]
    sections = [] if args.matmuls_only else step_table(shape, args.rounds, args.steps) + [""]
    timed_matmuls = args.matmuls or args.matmuls_only
    if timed_matmuls:
        sections += matmul_table(shape)
    timing = ([] if args.matmuls_only else [f"steps: best of {args.rounds} alternating rounds of {args.steps}"]) + (
        [f"matmuls: best of {MATMUL_REPEATS} repeats of {MATMUL_CALLS} calls"] if timed_matmuls else []
    )
    device = jax.devices()[0]
    cpus = len(os.sched_getaffinity(0))
    command = " ".join(["python benchmarks/step_ablations.py", *sys.argv[1:]])
    text = (
        f"## step_ablations — {datetime.date.today()} — {platform.machine()}, {cpus} of {os.cpu_count()} cpus, "
        f"{device.platform} ({device.device_kind}), jax {jax.__version__}, float32\n"
        + "; ".join(
            [
                f"command: `{command}`",
                f"{args.only} {shape['batch']} x {shape['block']}",
                f"host allocator {allocator}",
                *timing,
            ]
        )
        + "\n\n"
        + "\n".join(sections).strip()
        + "\n"
    )
    print("\n" + text)
    if not args.no_record:
        record(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
