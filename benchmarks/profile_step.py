"""Where a train step's device time goes: the jitted step of `train_throughput.py` under
`jax.profiler`, its device events summed by XLA op (fusions, matmuls, custom calls).

    python benchmarks/profile_step.py --only gpt2_124m --dtype bfloat16        # on a GPU
    python benchmarks/profile_step.py --only shakespeare_char --top 15         # on a CPU
    python benchmarks/profile_step.py --only llama_1b --dtype bfloat16 --steps 3  # on a GPU

Prints, per device (its CUDA streams, or XLA:CPU's worker threads, added together), the
busy time by category (matmuls, fused attention, copies and transposes, reductions,
elementwise fusions, the runtime's own scheduling and waiting), then the ops with the largest
share (self time: what an event's nested events do not cover; milliseconds per step, share,
launches per step). The trace stays in --trace-dir for TensorBoard / XProf when given.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import CONFIGS, FlaxgptTrainer, shape_for  # noqa: E402

from flaxgpt import host_allocator  # noqa: E402

# Lines of a device plane that restate the streams' events at a coarser grain (GPU traces).
_SUMMARY_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "Launch Stats", "XLA TraceMe")


def category(op: str) -> str:
    """A coarse class of an XLA op from its name, for the table of where the time goes."""
    name = op.lower()
    if name.startswith(("threadpool", "slinkythreadpool", "thunkexecutor", "end: ")) or "::" in name:
        return "runtime: scheduling and waiting"
    if any(k in name for k in ("ynn", "xnn", "onednn", "gemm", "cublas", "dot", "matmul", "cutlass", "sm90", "sm80")):
        return "matmuls (library kernels)"
    if any(k in name for k in ("cudnn", "flash", "attention", "knob_")):
        return "fused attention"
    if name.startswith(("copy", "transpose")) or "transpose" in name:
        return "copies and transposes"
    if "reduce" in name or "reduction" in name:
        return "reductions (fused)"
    if "fusion" in name:
        return "elementwise fusions"
    return "other"


def self_times(line) -> dict[str, list[float]]:
    """Per event name: [time not covered by events nested inside it (ns), occurrences].

    Why self time: on a CPU the executor's event encloses every op it runs, so raw durations
    count the step twice; what is left of it after its children is the runtime's own time."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    stack: list[list] = []  # [end_ns, name, self_ns]

    def close(until: float) -> None:
        while stack and stack[-1][0] <= until:
            _, name, own = stack.pop()
            totals[name][0] += own

    for event in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
        close(event.start_ns)
        if stack:
            stack[-1][2] -= event.duration_ns
        stack.append([event.start_ns + event.duration_ns, event.name, float(event.duration_ns)])
        totals[event.name][1] += 1
    close(float("inf"))
    return totals


def summarize(trace_dir: str, steps: int, top: int) -> str:
    """Per device (each GPU, or the CPU's XLA threads): time by category, then the top ops.

    The lines of one device (CUDA streams, XLA:CPU worker threads) are added together, so a
    figure is device time (busy time of all its streams or threads), not wall time."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    out = []
    for plane in data.planes:
        if not (plane.name.startswith("/device:") or plane.name == "/host:CPU"):
            continue
        totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        lines = 0
        for line in plane.lines:
            if line.name in _SUMMARY_LINES:
                continue
            if plane.name == "/host:CPU" and "Eigen" not in line.name:  # XLA:CPU's intra-op workers
                continue
            lines += 1
            for name, (ns, count) in self_times(line).items():
                totals[name][0] += ns
                totals[name][1] += count
        busy = sum(t for t, _ in totals.values())
        if not busy:
            continue
        by_category: dict[str, float] = collections.defaultdict(float)
        for name, (ns, _) in totals.items():
            by_category[category(name)] += ns
        out += [
            f"\n{plane.name}: {busy / steps / 1e6:.2f} ms of busy time per step over {lines} lines "
            f"(streams or threads)",
            "| category | ms/step | share |",
            "|---|---|---|",
        ]
        out += [
            f"| {name} | {ns / steps / 1e6:.3f} | {ns / busy:.1%} |"
            for name, ns in sorted(by_category.items(), key=lambda kv: -kv[1])
        ]
        out += ["", "| op | category | ms/step | share | launches/step |", "|---|---|---|---|---|"]
        for name, (ns, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
            out.append(
                f"| {name[:90]} | {category(name)} | {ns / steps / 1e6:.3f} | {ns / busy:.1%} | {count / steps:g} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), default="gpt2_124m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--tiny", action="store_true", help="train_throughput.py's few-second shape of the recipe")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir")
    parser.add_argument("--hlo", help="also write the compiled step's HLO text here (op names -> what they compute)")
    args = parser.parse_args()
    host_allocator.tune_host_allocator()  # as the CLIs do: else page faults swell the elementwise ops
    on_cpu = jax.devices()[0].platform == "cpu"
    shape = shape_for(args.only, on_cpu, args.tiny, args.batch)
    trainer = FlaxgptTrainer(shape, args.dtype, attention=args.attention, remat=args.remat)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(trainer.step.lower(trainer.state, trainer.batches[0]).compile().as_text())
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="flaxgpt-profile-")
    with jax.profiler.trace(trace_dir):
        seconds = trainer.time(args.steps)
    print(
        f"{args.only} {shape['batch']}x{shape['block']} {args.dtype}, attention {args.attention}: "
        f"{seconds / args.steps * 1e3:.2f} ms per step under the profiler"
    )
    print(summarize(trace_dir, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
