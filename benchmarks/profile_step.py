"""Where a train step's device time goes: the jitted step of `train_throughput.py` under
`jax.profiler`, its device events summed by XLA op (fusions, matmuls, custom calls).

    python benchmarks/profile_step.py --only gpt2_124m --dtype bfloat16        # on a GPU
    python benchmarks/profile_step.py --only shakespeare_char --top 15         # on a CPU

Prints, per device line of the trace, the ops with the largest share of the step's time
(milliseconds per step, percent of the line's busy time, launches per step). The trace stays
in --trace-dir for TensorBoard / XProf when given.
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

from train_throughput import CONFIGS, FlaxgptTrainer  # noqa: E402


def summarize(trace_dir: str, steps: int, top: int) -> str:
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    out = []
    for plane in data.planes:
        if not (plane.name.startswith("/device:") or plane.name == "/host:CPU"):
            continue
        for line in plane.lines:
            totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
            for event in line.events:
                totals[event.name][0] += event.duration_ns
                totals[event.name][1] += 1
            busy = sum(t for t, _ in totals.values())
            if not busy or (plane.name == "/host:CPU" and "XLA" not in line.name and "Eigen" not in line.name):
                continue
            out += [f"\n{plane.name} / {line.name}: {busy / steps / 1e6:.2f} ms busy per step",
                    "| op | ms/step | share | launches/step |", "|---|---|---|---|"]
            for name, (ns, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
                out.append(f"| {name[:90]} | {ns / steps / 1e6:.3f} | {ns / busy:.1%} | {count / steps:g} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), default="gpt2_124m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir")
    parser.add_argument("--hlo", help="also write the compiled step's HLO text here (op names -> what they compute)")
    args = parser.parse_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    shape = dict(CONFIGS[args.only]) if on_cpu else dict(CONFIGS[args.only], **CONFIGS[args.only]["accel"])
    shape["batch"] = args.batch or shape["batch"]
    trainer = FlaxgptTrainer(shape, args.dtype, attention=args.attention, remat=args.remat)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(trainer.step.lower(trainer.state, trainer.batches[0]).compile().as_text())
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="flaxgpt-profile-")
    with jax.profiler.trace(trace_dir):
        seconds = trainer.time(args.steps)
    print(f"{args.only} {shape['batch']}x{shape['block']} {args.dtype}, attention {args.attention}: "
          f"{seconds / args.steps * 1e3:.2f} ms per step under the profiler")
    print(summarize(trace_dir, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
