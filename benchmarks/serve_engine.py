"""The serving engine alone (no HTTP): 32 short requests one at a time against 16 at once.

    python benchmarks/serve_engine.py --workdir RUN [--rounds 3] [--prompt 46] [--tokens 4]

Each request is a --prompt-token prompt (random ids) answered greedily with exactly --tokens
tokens, the shape of the chat demo's world questions. The two schedules alternate within each
round, so that load from other jobs falls on both; the time spent in the engine's prefill and
decode calls is taken apart. Compilation is excluded (the workload runs once before timing).
Prints the table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import threading
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import record  # noqa: E402
from flaxgpt import generate, runs  # noqa: E402
from flaxgpt.serve.engine import Request, SlotEngine  # noqa: E402

SPENT = {"slot_prefill": [0.0, 0], "slot_step": [0.0, 0]}


def _timed(name):
    """Wrap generate's slot function `name` so its calls are counted and timed to completion."""
    fn = getattr(generate, name)

    def call(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        SPENT[name][0] += time.perf_counter() - start
        SPENT[name][1] += 1
        return out

    setattr(generate, name, call)


def _run(engine: SlotEngine, prompts, group: int, tokens: int) -> float:
    """Wall seconds to serve `prompts`, `group` submitted at a time (each group waited for)."""
    done = threading.Semaphore(0)
    sink = lambda kind, payload: done.release() if kind == "done" else None
    start = time.perf_counter()
    for i in range(0, len(prompts), group):
        chunk = prompts[i : i + group]
        for p in chunk:
            engine.submit(Request(p, tokens, sink, temperature=0.0))
        for _ in chunk:
            done.acquire()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=46)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()
    loaded = runs.load(args.workdir)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, loaded.model.cfg.vocab_size, args.prompt))) for _ in range(args.requests)]
    engine = SlotEngine(loaded.model, loaded.params, pad_id=loaded.tokenizer.pad_id, slots=16)
    engine.context = lambda: runs.logical_context(loaded)
    engine.start()
    for name in SPENT:
        _timed(name)
    for group in (1, 16):
        _run(engine, prompts, group, args.tokens)  # compile
    rows, loads = {1: [], 16: []}, []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for group in (1, 16):
            for v in SPENT.values():
                v[:] = [0.0, 0]
            wall = _run(engine, prompts, group, args.tokens)
            rows[group].append((args.requests * args.tokens / wall, *SPENT["slot_prefill"], *SPENT["slot_step"]))
    engine.stop()
    record(_report(args, rows, loads))


def _report(args, rows, loads) -> str:
    lines = [
        f"## serve engine alone ({datetime.date.today()}, {platform.node()}, {len(os.sched_getaffinity(0))} cores, "
        f"{args.workdir}, 16 slots)",
        "",
        f"`python benchmarks/serve_engine.py {shlex.join(sys.argv[1:])}`: {args.requests} requests of {args.prompt} "
        f"prompt tokens, {args.tokens} greedy tokens each, {args.rounds} rounds alternating the schedules; load "
        f"average {min(loads):.1f}-{max(loads):.1f} on the shared machine (ratios within a round matter).",
        "",
        "| submitted at a time | generated tokens/s (per round) | prefill s / calls | decode s / calls |",
        "|---|---|---|---|",
    ]
    for group, got in rows.items():
        per_round = ", ".join(f"{r[0]:.0f}" for r in got)
        prefill = ", ".join(f"{r[1]:.3f}/{r[2]}" for r in got)
        decode = ", ".join(f"{r[3]:.3f}/{r[4]}" for r in got)
        lines.append(f"| {group} | {np.median([r[0] for r in got]):.0f} ({per_round}) | {prefill} | {decode} |")
    ratios = [b[0] / a[0] for a, b in zip(rows[1], rows[16])]
    lines += ["", f"16 at once: {np.median(ratios):.1f}x (rounds {min(ratios):.1f}-{max(ratios):.1f}x) one at a time."]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
