"""Why RL on the chat demo's reward model moves the greedy model little or the wrong way: how the RM
rates the answers each policy gives on the held-out world questions, judged by the labeler.

    python benchmarks/rm_probe.py --sft runs/chat_demo/sft --rm runs/chat_demo/rm \
        [--policies runs/chat_demo/rl,runs/chat_demo_ppo/ppo] [--samples 8]

For each policy (the SFT model first): the labeler's grades of its greedy and sampled (T=1) answers,
the RM's mean score per grade, how often the RM ranks a correct sample above a wrong answer of the
right kind to the same question (also on the sums alone, where the small models' errors are), and
the greedy answers it lost. For the SFT model, the ceiling of
RL on this reward: the accuracy of argmax_y [log pi_SFT(y) + r(y) / beta] over the distinct answers
among the samples and the greedy one (the KL-regularised optimum's mode), with r the RM, and with
the labeler for comparison. Appends the tables to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402
from flaxgpt.data.world import is_arithmetic  # noqa: E402

BETAS = (0.1, 0.3, 1.0, 3.0, 1e9)


def answers(run, params, reward_params, key: int, temperature: float):
    """(answers, labeler grades, RM scores, SFT log-probabilities or None, ended) on the held-out questions."""
    import jax

    from flaxgpt.rlhf import PPOState, responses, rollout, scores, sequences

    held = run.prompts[1]
    state = PPOState(0, {"policy": params}, None, {"reward": reward_params}, 0.0, None, 0)
    tokens, mask, gen = rollout(run, params, held, jax.random.PRNGKey(key), temperature)
    texts = responses(run, gen)
    grades = np.asarray([run.labeler(pr.text, a) for pr, a in zip(held, texts)])
    full, full_mask, _, ended = sequences(run, tokens, mask, gen)
    return texts, grades, np.asarray(scores(run, state, held, tokens, mask, gen)), (full, full_mask), ended


def describe(run, params, reward_params, samples: int) -> dict:
    """Grades, RM scores per grade and the RM's within-question ordering, greedy and sampled."""
    greedy = answers(run, params, reward_params, 0, 0.0)
    sampled = [answers(run, params, reward_params, 1 + i, 1.0) for i in range(samples)]
    grades, rms = np.stack([s[1] for s in sampled]), np.stack([s[2] for s in sampled])  # [samples, questions]
    sums = np.asarray([is_arithmetic(pr.text) for pr in run.prompts[1]])
    wins, total = np.zeros(2), np.zeros(2)  # [facts, sums]
    for q in range(grades.shape[1]):
        right, wrong = rms[grades[:, q] == 1.0, q], rms[grades[:, q] == 0.2, q]
        kind = int(sums[q])
        wins[kind] += (right[:, None] > wrong[None, :]).sum()
        total[kind] += right.size * wrong.size
    by_grade = lambda g, r: {k: float(r[g == k].mean()) for k in sorted(set(g.ravel().tolist()))}
    return {
        "greedy": greedy,
        "greedy_accuracy": float(np.mean(greedy[1] == 1.0)),
        "greedy_sums_right": f"{int(np.sum(greedy[1][sums] == 1.0))}/{int(sums.sum())}",
        "sampled_accuracy": float(np.mean(grades == 1.0)),
        "rm_by_grade_greedy": by_grade(greedy[1], greedy[2]),
        "rm_by_grade_sampled": by_grade(grades, rms),
        "rm_by_grade_sums": by_grade(grades[:, sums], rms[:, sums]),
        "rm_orders_right_first": wins.sum() / max(total.sum(), 1),
        "rm_orders_right_first_sums": wins[1] / max(total[1], 1),
        "rm_pick_accuracy": float(np.mean(grades[np.argmax(rms, 0), np.arange(grades.shape[1])] == 1.0)),
        "sampled": sampled,
    }


def ceiling(run, sft_params, figures: dict) -> dict[str, float]:
    """Accuracy of the KL-regularised optimum's mode over the distinct answers seen, per beta."""
    import jax

    from flaxgpt import generate
    from flaxgpt.rlhf import response_logprobs

    m = run.models

    @jax.jit
    def logp(tokens, mask):
        positions, segments = generate.mask_positions(mask), mask.astype("int32")
        picked = response_logprobs(m.policy, sft_params, tokens, positions, segments, m.query_width, 1.0)[0]
        return (picked * mask[:, m.query_width :]).sum(1)

    candidates = [dict() for _ in run.prompts[1]]  # answer -> (grade, rm, log pi_SFT)
    for texts, grades, rms, (full, full_mask), ended in [figures["greedy"], *figures["sampled"]]:
        logps = np.asarray(logp(full, full_mask))
        for i, text in enumerate(texts):
            if ended[i]:
                candidates[i].setdefault(text, (grades[i], rms[i], logps[i]))
    out = {}
    for reward in ("rm", "labeler"):
        for beta in BETAS:
            picks = []
            for c in candidates:
                values = list(c.values())
                r = [v[1] if reward == "rm" else 10.0 * v[0] for v in values]
                picks.append(values[int(np.argmax([v[2] + x / beta for v, x in zip(values, r)]))][0] == 1.0)
            out[f"{reward}, beta {beta:g}"] = float(np.mean(picks))
    return out


def table(names: list[str], described: list[dict], top: dict, args: argparse.Namespace, load: float) -> str:
    lines = [
        f"## rm_probe — {datetime.date.today()} — load average {load:.1f} at the start",
        f"command: `python benchmarks/rm_probe.py --sft {args.sft} --rm {args.rm} --policies {args.policies} "
        f"--samples {args.samples}`",
        "",
        f"{len(described[0]['greedy'][0])} held-out world questions, {args.samples} samples (T=1) each; grades: "
        "the labeler's (1 exact, 0.5 sloppy, 0.2 wrong of the right kind, 0 other); RM: mean RM score per grade.",
        "",
        "| policy | greedy acc. (sums right) | sampled acc. | RM on greedy answers by grade | RM on samples by grade "
        "(sums only) | RM ranks right above wrong-kind, same question (sums only) "
        "| accuracy of the RM's pick of the samples |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda d: ", ".join(f"{k:g}: {v:+.2f}" for k, v in d.items())
    for name, f in zip(names, described):
        lines.append(
            f"| {name} | {f['greedy_accuracy']:.3f} ({f['greedy_sums_right']}) | {f['sampled_accuracy']:.3f} "
            f"| {fmt(f['rm_by_grade_greedy'])} | {fmt(f['rm_by_grade_sampled'])} ({fmt(f['rm_by_grade_sums'])}) "
            f"| {f['rm_orders_right_first']:.3f} ({f['rm_orders_right_first_sums']:.3f}) "
            f"| {f['rm_pick_accuracy']:.3f} |"
        )
    lines += ["", "Mode of the KL-regularised optimum pi_SFT exp(r / beta) over the answers seen (SFT model's):", ""]
    lines += ["| reward | " + " | ".join(f"beta {b:g}" for b in BETAS) + " |", "|---|" + "---|" * len(BETAS)]
    for reward in ("rm", "labeler"):
        lines.append(f"| {reward} | " + " | ".join(f"{top[f'{reward}, beta {b:g}']:.3f}" for b in BETAS) + " |")
    for name, f in zip(names[1:], described[1:]):
        base, now = described[0]["greedy"], f["greedy"]
        moves = collections.Counter(
            (f"{a:g}", f"{b:g}") for a, b in zip(base[1], now[1]) if a != b
        )  # grade before -> after
        lost = [f"{x} -> {y}" for x, y, a, b in zip(base[0], now[0], base[1], now[1]) if a == 1.0 and b != 1.0]
        lines.append(f"\n{name}: greedy grade changes {dict(moves)}; lost: {'; '.join(lost[:12])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", default="runs/chat_demo/sft")
    parser.add_argument("--rm", default="runs/chat_demo/rm")
    parser.add_argument("--policies", default="", help="comma-separated run directories to compare with the SFT model")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    from flaxgpt import runs
    from flaxgpt.train import load_experiment
    from flaxgpt.trainers import grpo

    load = os.getloadavg()[0]
    settings = [
        f"train.init_from={args.sft}",
        f"ppo.reward_from={args.rm}",
        "ppo.reward_function=",
        "train.batch_size=128",
    ]
    run = grpo.setup(load_experiment("rloo_rm_world", settings), os.path.join(REPO, "runs", "rm_probe"))
    reward_params, sft_params = runs.load(args.rm).params, runs.load(args.sft).params
    names = [args.sft, *[p for p in args.policies.split(",") if p]]
    described = [describe(run, runs.load(n).params, reward_params, args.samples) for n in names]
    text = table(names, described, ceiling(run, sft_params, described[0]), args, load)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
