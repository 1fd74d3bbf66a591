"""Bytes on disk of a LoRA run's checkpoint: adapter-only (the default) against the whole tree
(`checkpoint.adapters_only=false`), from the same base, same steps.

    python benchmarks/lora_checkpoint.py --init-from runs/world     # LoRA SFT of the world model
    python benchmarks/lora_checkpoint.py --init-from runs/world --bigger 8x512

`--bigger LxD` adds a base of L layers of width D made here (one pretraining step from random
weights: its values do not matter to the sizes) and a LoRA continued pretraining on it. Each run
takes 2 steps and saves its last one; the figure is that step directory's size (state and record).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import record  # noqa: E402
from flaxgpt import fileio  # noqa: E402

QUIET = ["logging.progress=none", "logging.report=false", "logging.tensorboard=false", "eval.iters=1"]


def train(workdir: str, experiment: str, settings: list[str]) -> None:
    command = [sys.executable, "-m", "flaxgpt.train", "-e", experiment, "--workdir", workdir, "--set", *settings]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def sizes(base: str, experiment: str, rank: int, extra: list[str], root: str) -> dict[str, int]:
    """Checkpoint bytes of the LoRA run on `base`, adapter-only and whole."""
    out = {}
    for kind, flag in (("adapters", "true"), ("whole", "false")):
        workdir = os.path.join(root, f"{os.path.basename(base)}-{kind}")
        settings = [f"train.init_from={base}", f"model.lora_rank={rank}", "train.max_steps=2"]
        train(workdir, experiment, settings + [f"checkpoint.adapters_only={flag}", *QUIET, *extra])
        out[kind] = fileio.tree_size(os.path.join(workdir, "checkpoints", "2"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", required=True, help="the world model's pretraining run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bigger", default="", help="LxD: also a base of L layers, width D")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        sft = ["sft.eval_examples=4", "sft.max_new_tokens=4", "eval.interval=2"]
        world = sizes(os.path.abspath(args.init_from), "sft_world", args.rank, sft, root)
        rows.append(("LoRA SFT of the world model", world))
        if args.bigger:
            layers, width = (int(x) for x in args.bigger.split("x"))
            shape = [f"model.n_layer={layers}", f"model.d_model={width}", f"model.n_head={width // 64}"]
            base = os.path.join(root, f"base{args.bigger}")
            small = ["train.batch_size=2", "model.block_size=128", "eval.interval=1", "data.world_documents=200"]
            train(base, "world", shape + small + ["train.max_steps=1", *QUIET])
            rows.append(
                (f"LoRA continued pretraining, {layers} layers x {width}", sizes(base, "world", args.rank, small, root))
            )
    lines = [
        f"## LoRA checkpoint size, adapter-only vs whole ({datetime.date.today()}, {platform.node()})",
        "",
        f"`python benchmarks/lora_checkpoint.py {' '.join(sys.argv[1:])}` (rank {args.rank}; bytes of the saved step's "
        "directory: train state + record; the same run with checkpoint.adapters_only=false is the whole one)",
        "",
        "| run | adapter-only | whole | ratio |",
        "|---|---|---|---|",
    ]
    for name, s in rows:
        lines.append(f"| {name} | {s['adapters']:,} B | {s['whole']:,} B | {s['whole'] / s['adapters']:.1f}x |")
    print("\n".join(lines))
    print(json.dumps(dict(rows)))
    record("\n".join(lines))


if __name__ == "__main__":
    main()
