"""Compile the real-scale recipes for their TPU topologies on this machine (no TPU needed) and
print the table: topology, parameters, per-chip GiB, compile seconds, roofline MFU bound, with the
command beside each row; appends the table to benchmarks/RESULTS.md.

    JAX_PLATFORMS=cpu python benchmarks/compile_recipes.py [--only NAME ...] [--all-programs] [--no-append]

Each recipe runs `python -m flaxgpt.compile ... --json` in a fresh process, by default for the
step that trains only (train_step, or ppo_update: `--programs`), since every program of the big
runs takes tens of minutes on 2 cores; `--all-programs` compiles them all (then GiB is the largest
total of any program of the run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402

RECIPES = [  # (experiment, topology, extra --set overrides)
    ("llama3_70b_pretrain_v5p512", "v5p:8x8x8", []),
    ("gpt2_124m_v5e8", "v5e:2x4", []),
    ("llama3_8b_sft_v5p64", "v5p:4x4x4", []),
    ("llama3_8b_lora_v5e16", "v5e:4x4", []),
    ("ppo_8b_v5p128", "v5p:4x4x8", []),
    # the Colab notebook's pipeline (launch/colab/flaxgpt_demo.ipynb, FAST = False) on Colab's TPUs:
    # a v5e-1 and the older v2-8 (2x2 chips, 8 cores); 65: the vocabulary its character tokenizer
    # finds in the embedded world (runs/chat_demo/pretrain/config.json)
    ("chat_demo", "v5e:1x1", ["model.vocab_size=65"]),
    ("chat_demo", "v2:2x2", ["model.vocab_size=65"]),
]


STEP_ONLY = False  # set by main
MAIN = {"ppo": "ppo_update", "grpo": "grpo_update"}  # the step that trains, by the recipe's first word


def command(name: str, topology: str, overrides: list[str]) -> list[str]:
    cmd = ["python", "-m", "flaxgpt.compile", "-e", name, "--topology", topology]
    if STEP_ONLY and name != "chat_demo":
        cmd += ["--programs", MAIN.get(name.split("_")[0], "train_step")]
    return cmd + (["--set", *overrides] if overrides else [])


def run(name: str, topology: str, overrides: list[str]) -> tuple[list[dict], float, str]:
    cmd = command(name, topology, overrides)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd[1:], "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    err = done.stderr.strip().splitlines()
    try:
        return json.loads(done.stdout), wall, (err[-1] if done.returncode else "")
    except json.JSONDecodeError:
        return [], wall, err[-1] if err else f"exit {done.returncode}"


def _size(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"


def rows(name, topology, overrides, runs, wall, error) -> list[str]:
    cmd = " ".join(command(name, topology, overrides))
    if not runs:
        return [f"| {name} | {topology} | | | | | | {error} | `{cmd}` |"]
    out = []
    for r in runs:
        main = next((p for p in r["reports"] if p["program"] in ("train_step", *MAIN.values())), r["reports"][0])
        worst = max(r["reports"], key=lambda p: p["total_gib"])
        fits = "yes" if r["fits"] else f"no: {error}"
        out.append(
            f"| {r['name']} | {topology} ({r['devices']} x {r['chip']['kind']}) | {_size(r['params'])} "
            f"| {worst['total_gib']:.2f} of {worst['capacity_gib']:.0f} ({worst['program']}) "
            f"| {main['compile_s']:.0f} ({main.get('compile_cpu_s', 0):.0f} CPU s; "
            f"{r['compile_s']:.0f} all, {wall:.0f} wall) "
            f"| {main['mfu_bound']:.0%} ({main['program']}) | {fits} | `{cmd}` |"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", help="experiment names to compile")
    parser.add_argument("--all-programs", action="store_true", help="every program of each run, not the step only")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    global STEP_ONLY
    STEP_ONLY = not args.all_programs
    header = [
        "| run | topology | parameters | GiB per chip (largest program) | compile s: step (its CPU s; all, wall) "
        "| MFU bound | fits | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    table = list(header)
    for name, topology, overrides in RECIPES:
        if args.only and name not in args.only:
            continue
        for line in rows(name, topology, overrides, *run(name, topology, overrides)):
            print(line, flush=True)
            table.append(line)
    if not args.no_append:
        today = datetime.date.today().isoformat()
        cores = os.cpu_count()
        load = os.getloadavg()[0]
        record(
            f"## Ahead-of-time TPU compiles of the real-scale recipes ({today}, {cores} CPU cores, load "
            f"average {load:.0f} at the end, jax 0.10.2, libtpu 0.0.42.1)\n\n"
            "`JAX_PLATFORMS=cpu python benchmarks/compile_recipes.py`: "
            "compile s is the training step's own compile (the run's programs and FLOP calibration in "
            "brackets); MFU bound = model FLOPs (6N + attention per trained token, 4N + 2N_trained with LoRA; "
            "remat not credited) / (peak x roofline time), the roofline taking hardware FLOPs (XLA's count, "
            "remat's recompute included, never below model FLOPs + recompute).\n\n" + "\n".join(table)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
