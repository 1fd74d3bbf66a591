"""Online learning from simulated users' thumbs: greedy task accuracy, measured through the API on
held-out questions, against the number of feedback events, with 10 % and 30 % noisy clicks.

    python benchmarks/online_learning.py --sft runs/chat_demo/sft [--noise 0.1,0.3] [--minutes 10]
                                         [--rate QUESTIONS_PER_SECOND] [--eval 128]
                                         [--out runs/online_bench] [--plot PNG]
                                         [--set KEY=VALUE ...]

For each noise level, in a fresh learner workdir: the online learner (`python -m flaxgpt.train
-e online_feedback`, starting from --sft, --set passed on), the server on it (`python -m
flaxgpt.serve --reload-every 2`), and one simulated user (`flaxgpt.simuser`, sampling at
temperature 1, regenerating or correcting some wrong answers) asking for --minutes, at most
--rate questions a second (default: without pause; the learner trains on each rating once, in
order, so a user far faster than it only makes it lag, and takes cores from it). At the start,
whenever the server's step changes (a promotion) and at the end, the
--eval held-out questions (the SFT stage's validation questions, never asked by the user nor
used by the guard) are asked through /v1/chat/completions at temperature 0 and judged by the
world's labeler. Prints a table per noise level and appends them to benchmarks/RESULTS.md
(unless --no-record; with the load and the CPU seconds of the learner and server), writes the
series to OUT/online_learning.json and, where matplotlib is installed, plots accuracy against
feedback events to --plot (a PNG).

Events per point of accuracy: the ratings in the database when the served model first reached
its best accuracy, divided by that gain over the start in points (none when nothing was gained).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what}: not ready (exit {proc.poll()})")
        time.sleep(0.5)


def ratings(db: str) -> int:
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]


def one_level(args, noise: float) -> tuple[list[str], dict]:
    """Learner + server + user at one noise level; (table lines, summary)."""
    import httpx

    from flaxgpt import online
    from flaxgpt.data.world import WorldTask
    from flaxgpt.simuser import Behaviour, SimUser, api_accuracy

    cpu_at_start = cpu_seconds()
    workdir = os.path.abspath(os.path.join(args.out, f"noise{round(noise * 100)}"))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    sets = [f"train.init_from={args.sft}", "logging.progress=plain", "logging.report=false", *args.set]
    learn = [sys.executable, "-m", "flaxgpt.train", "-e", "online_feedback", "--workdir", workdir, "--set", *sets]
    learner = start(learn, workdir + ".learner.log")
    port = free_port()
    server = None
    try:
        wait(lambda: online.promoted_step(workdir) == 0, learner, 900, "the learner's step 0")
        serve = [sys.executable, "-m", "flaxgpt.serve", "--workdir", workdir, "--port", str(port)]
        server = start(serve + ["--reload-every", "2", "--slots", "4"], workdir + ".server.log")
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)

        def healthy() -> bool:
            try:
                return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait(healthy, server, 300, "the server")
        task = WorldTask(0, "Answer briefly.")
        held = task.demonstrations("sft_val", args.eval, 0.0)
        model = http.get("/v1/models").json()["data"][0]["id"]
        db, began, rows = os.path.join(workdir, "feedback.sqlite"), time.time(), []

        def measure() -> None:
            step, events = http.get("/health").json()["step"], ratings(db)
            accuracy = api_accuracy(http, model, held, task)
            rows.append((time.time() - began, events, step, accuracy))
            print(f"noise {noise:.0%}: {rows[-1][0] / 60:.1f} min, {events} events, step {step}: {accuracy:.3f}")

        measure()
        stop = threading.Event()
        user = SimUser(http, task, Behaviour(noise=noise), seed=round(noise * 100))

        def ask() -> None:
            pace = 1.0 / args.rate if args.rate else 0.0
            due = time.time()
            while not stop.is_set():
                user.ask()
                due = max(due + pace, time.time() - 1.0)  # a slow answer is not made up by a burst
                stop.wait(max(due - time.time(), 0.0))

        asking = threading.Thread(target=ask)
        asking.start()
        end, served = began + args.minutes * 60, rows[-1][2]
        while time.time() < end:
            time.sleep(2)
            step = http.get("/health").json()["step"]
            if step != served:
                served = step
                measure()
        stop.set()
        asking.join()
        measure()  # the end: the curve reaches the last event
    finally:
        for proc in (learner, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=120)
    decisions = online.decisions(workdir)
    guard = [round(d["score"]["accuracy"], 4) for d in decisions if "accuracy" in d["score"]]
    t = user.tally
    summary = {
        "noise": noise,
        "updates": sum(d["step"] > 0 for d in decisions),
        "promoted": sum(d["step"] > 0 and d["promoted"] for d in decisions),
        "events": ratings(db),
        "questions": t.questions,
        "first_answer_accuracy": t.correct / max(t.questions, 1),
        "start": rows[0][3],
        "end": rows[-1][3],
        "best": max(r[3] for r in rows),
        "events_per_point": events_per_point(rows),
        "cpu_seconds": [round(b - a) for a, b in zip(cpu_at_start, cpu_seconds())],
        "guard_accuracy": guard,  # each checkpoint's (step 0 first) on the learner's guard questions
        "series": [[round(m, 1), e, s, a] for m, e, s, a in rows],
    }
    lines = [
        f"\nnoise {noise:.0%}: {summary['updates']} updates, {summary['promoted']} promoted; "
        f"{t.questions} questions, {summary['events']} ratings ({t.flipped} flipped), "
        f"{t.regenerations} regenerations, {t.follow_ups} follow-ups",
        "",
        "| minutes | feedback events | served step | greedy accuracy (API, held-out) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m / 60:.1f} | {e} | {s} | {a:.3f} |" for m, e, s, a in rows]
    per = summary["events_per_point"]
    gain = f"{summary['start']:.3f} -> {summary['best']:.3f} ({(summary['best'] - summary['start']) * 100:+.1f} points)"
    lines += ["", f"best {gain}; " + (f"{per:.0f} events per point" if per else "no gain: no cost per point")]
    if guard:
        lines.append(
            f"learner's candidates, greedy accuracy on its {decisions[0]['guard_questions']} guard questions: "
            f"step 0 {guard[0]:.3f}, best {max(guard):.3f}, last {guard[-1]:.3f} (all: OUT/online_learning.json)"
        )
    cpu = summary["cpu_seconds"]
    lines.append(f"CPU seconds: learner + server {cpu[0]}, simulated user + measurements {cpu[1]}")
    return lines, summary


def events_per_point(rows: list[tuple]) -> float | None:
    """Ratings up to the first measurement at the best accuracy, per point gained over the start."""
    best = max(r[3] for r in rows)
    first = next(r for r in rows if r[3] == best)
    gain = (best - rows[0][3]) * 100
    return first[1] / gain if gain > 0 else None


def cpu_seconds() -> tuple[float, float]:
    """(user + system CPU seconds of the reaped children: learner and server, of this process:
    simulated user and measurements) so far."""
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime, own.ru_utime + own.ru_stime


def plot(summaries: list[dict], path: str) -> bool:
    """Accuracy against feedback events, one line per noise level; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    for s in summaries:
        series = s["series"]
        xs, ys = [r[1] for r in series], [r[3] for r in series]
        ax.plot(xs, ys, marker="o", drawstyle="steps-post", label=f"{s['noise']:.0%} noisy clicks")
    ax.set_xlabel("feedback events (ratings)")
    ax.set_ylabel("greedy accuracy (API, held-out)")
    ax.set_title("Online learning from simulated thumbs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="the SFT run to start from (a copy: it is only read)")
    parser.add_argument("--noise", default="0.1,0.3")
    parser.add_argument("--minutes", type=float, default=10.0, help="per noise level")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="questions a second the simulated user asks at most (0: no pause)"
    )
    parser.add_argument("--eval", type=int, default=128, help="held-out questions per measurement")
    parser.add_argument("--out", default="runs/online_bench")
    parser.add_argument("--plot", help="PNG of accuracy against events (default: OUT/online_learning.png)")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--set", nargs="+", default=[], help="learner config overrides, KEY=VALUE")
    args = parser.parse_args()
    args.sft = os.path.abspath(args.sft)
    load = os.getloadavg()
    lines = [
        f"## Online learning from simulated feedback ({platform.node()}, {os.cpu_count()} cores, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {load[0]:.1f} at start)",
        "",
        "    python benchmarks/online_learning.py " + " ".join(sys.argv[1:]),
        "",
        "Learner, server and simulated user share the machine's cores with other work (the load above);",
        "the accuracy is that of the served model's greedy answers to held-out questions, through the API.",
    ]
    summaries = []
    for noise in (float(n) for n in args.noise.split(",")):
        table, summary = one_level(args, noise)
        lines += table
        summaries.append(summary)
        print("\n".join(table), flush=True)
    lines.append(f"\nload at the end: {os.getloadavg()[0]:.1f}")
    with open(os.path.join(args.out, "online_learning.json"), "w") as f:
        json.dump(summaries, f)
    png = args.plot or os.path.join(args.out, "online_learning.png")
    lines.append(f"\nplot: {png}" if plot(summaries, png) else "\nno plot: matplotlib is not installed")
    lines.append(
        "\n    "
        + json.dumps([{k: v for k, v in s.items() if k not in ("series", "guard_accuracy")} for s in summaries])
    )
    print(lines[-2], flush=True)
    if not args.no_record:
        record("\n".join(lines))


if __name__ == "__main__":
    main()
