"""The alignment comparison: SFT, PPO, GRPO, RLOO, DPO, KTO and ORPO from the same SFT start on
the embedded world, each given the same wall-time budget, judged on the same held-out questions.

    python benchmarks/alignment_table.py [--sft runs/chat_demo/sft] [--rm runs/chat_demo/rm] \
        [--budget 150] [--workdir runs/alignment_table] [--methods ppo,rloo_rm,grpo,rloo,dpo,kto,orpo] [--seeds 0,1]

Each method is its world experiment (ppo_world, rloo_rm_world, grpo_world, rloo_world, dpo_world,
kto_world, orpo_world) started from --sft (PPO's and RLOO_RM's reward model: --rm; GRPO and RLOO
learn from the labeler itself) in its own process, once per --seeds; after --budget
seconds of wall time (start-up and compilation included, as a user waits for them) it gets
SIGTERM, saves its checkpoint and stops, unless it finished its experiment's steps first; a run
stopped before its first checkpoint is judged as its start (0 steps). Then every final policy
answers the same held-out world questions (the PPO evaluation set): labeler task accuracy of
greedy answers and of answers sampled at temperature 1, and the sampled answers' mean KL to the
SFT model. Appends the table to benchmarks/RESULTS.md; runs are kept in --workdir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402

# rloo_rm: RLOO on the reward model, the chat demo's RL stage; grpo and rloo learn from the labeler
EXPERIMENTS = {m: f"{m}_world" for m in ("ppo", "rloo_rm", "grpo", "rloo", "dpo", "kto", "orpo")}
ON_THE_RM = ("ppo", "rloo_rm")
# in-run evaluation off: the budget goes to training, and every method is judged the same way afterwards
NO_EVAL = {
    "ppo": ["ppo.eval_prompts=0"],
    "grpo": ["ppo.eval_prompts=0"],
    "rloo": ["ppo.eval_prompts=0"],
    "rloo_rm": ["ppo.eval_prompts=0"],
    **{m: ["eval.interval=100000", "sft.eval_examples=0"] for m in ("dpo", "kto", "orpo")},
}


def train(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Run one method's experiment (train.seed=seed: prompt order and sampling) for at most
    args.budget seconds; its wall time and steps."""
    workdir = os.path.join(args.workdir, f"{method}_seed{seed}")
    settings = [f"train.init_from={args.sft}", "logging.progress=none", "logging.report=false", *NO_EVAL[method]]
    settings.append(f"train.seed={seed}")
    if method in ON_THE_RM:
        settings.append(f"ppo.reward_from={args.rm}")
    command = [sys.executable, "-m", "flaxgpt.train", "-e", EXPERIMENTS[method], "--workdir", workdir, "--set"]
    start = time.time()
    with open(f"{workdir}.log", "w") as log:
        proc = subprocess.Popen(command + settings, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # saves a checkpoint first, then exits 143
            proc.wait()
    wall = time.time() - start
    # -15: SIGTERM came before the run began training (still loading): it trained nothing
    if proc.returncode not in (0, 143, -signal.SIGTERM):
        raise SystemExit(f"{method} failed (exit {proc.returncode}): see {log.name}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    steps = [json.loads(line).get("step", 0) for line in open(metrics)] if os.path.exists(metrics) else []
    saved = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    return {"wall_seconds": wall, "steps": max(steps, default=0), "policy": workdir if saved else args.sft}


def judge(policies: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Each run's final policy on the held-out world questions: accuracy (sampled, greedy), KL to SFT."""
    from flaxgpt import runs
    from flaxgpt.rlhf import PPOState, evaluate
    from flaxgpt.train import load_experiment
    from flaxgpt.trainers import grpo

    settings = [f"train.init_from={args.sft}", f"ppo.eval_prompts={args.eval_prompts}", "train.batch_size=64"]
    judge_run = grpo.setup(load_experiment("grpo_world", settings), os.path.join(args.workdir, "judge"))
    sft = runs.load(args.sft).params
    figures = {}
    for name, workdir in policies.items():
        params = runs.load(workdir).params
        state = PPOState(0, {"policy": params}, None, {"reference": sft}, 0.0, None, 0)
        figures[name] = evaluate(judge_run, state)
        print(name, figures[name], flush=True)
    return figures


def table(trained: dict, judged: dict, args: argparse.Namespace, load: float) -> str:
    lines = [
        f"## alignment_table — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the start (shared machine: wall times are inflated by other work)",
        f"command: `python benchmarks/alignment_table.py --sft {args.sft} --rm {args.rm} --budget {args.budget:g} "
        f"--methods {args.methods} --seeds {args.seeds}`",
        "",
        f"Same SFT start, at most {args.budget:g} s of wall time each (compilation included), "
        f"{args.eval_prompts} held-out world questions; KL: the sampled answers' mean sum over tokens of "
        "log pi - log pi_SFT.",
        "",
        "| method | task accuracy, greedy | task accuracy, sampled (T=1) | KL to SFT (nats) | steps | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in judged.items():
        t = trained.get(name, {"steps": 0, "wall_seconds": 0.0})
        label = (
            "SFT (start)" if name == "sft" else name.upper().replace("_RM", " on the RM").replace("_SEED", ", seed ")
        )
        lines.append(
            f"| {label} | {f['val_task_accuracy_greedy']:.3f} | "
            f"{f['val_task_accuracy']:.3f} | {f['val_kl']:.2f} | {t['steps']} | {t['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", default="runs/chat_demo/sft")
    parser.add_argument("--rm", default="runs/chat_demo/rm")
    parser.add_argument("--budget", type=float, default=150.0, help="wall seconds per method")
    parser.add_argument("--workdir", default="runs/alignment_table")
    parser.add_argument("--methods", default="ppo,rloo_rm,grpo,rloo,dpo,kto,orpo")
    parser.add_argument("--seeds", default="0", help="train.seed of each method's runs, e.g. 0,1")
    parser.add_argument("--eval-prompts", type=int, default=128)
    args = parser.parse_args()
    args.sft, args.rm, args.workdir = (os.path.abspath(p) for p in (args.sft, args.rm, args.workdir))
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in EXPERIMENTS]:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {','.join(EXPERIMENTS)}")
    os.makedirs(args.workdir, exist_ok=True)
    load = os.getloadavg()[0]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    # one after another: they share the cores
    trained = {f"{m}_seed{s}": train(m, s, args) for m in methods for s in seeds}
    judged = judge({"sft": args.sft, **{name: t["policy"] for name, t in trained.items()}}, args)
    text = table(trained, judged, args, load)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
