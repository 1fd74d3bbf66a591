"""Where a pipeline's time goes: each stage's wall time and CPU seconds, from one fresh run.

    python benchmarks/pipeline_time.py [-e chat_demo] --workdir DIR [--set KEY=VALUE ...]

Runs `python -m flaxgpt.train -e EXPERIMENT --workdir DIR` in its own process (DIR must be new or
empty: a stage finished or resumed there would report only part of its time; the run's output
goes to DIR.log), then reads DIR/summary.json, where the pipeline records each stage's wall
seconds and CPU seconds (user + system, all threads), beside the stage's key figures. The CPU
seconds are the figure to compare across machines that other work shares: the load inflates
wall time many times over, CPU time much less. The load average at the start and the end goes
into the header. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402

TIMES = ("wall_seconds", "cpu_seconds")


def run(args: argparse.Namespace) -> tuple[float, float]:
    """The pipeline in a child process; (its wall seconds, its CPU seconds)."""
    command = [sys.executable, "-m", "flaxgpt.train", "-e", args.experiment, "--workdir", args.workdir]
    command += ["--set", *args.overrides] if args.overrides else []
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(args.workdir.rstrip("/") + ".log", "w") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{args.experiment} failed (exit {code}): see {log.name}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time() - start, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def table(summary: dict, total: tuple[float, float], loads: tuple[float, float], args: argparse.Namespace) -> str:
    """A markdown section: one row per stage (wall s, CPU s, its key figures), then the whole run."""
    sets = f" --set {' '.join(args.overrides)}" if args.overrides else ""
    lines = [
        f"## pipeline_time {args.experiment} — {datetime.date.today()} — {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end",
        f"command: `python benchmarks/pipeline_time.py -e {args.experiment} --workdir {args.workdir}{sets}`",
        "",
        "Wall s is what a user waits (compiles, evaluations, data generation and saves included); CPU s "
        "is user + system time over all threads (on an idle 2-core machine wall s lies between CPU s / 2 "
        "and CPU s). The process total includes start-up and imports.",
        "",
        "| stage | wall s | CPU s | figures |",
        "|---|---|---|---|",
    ]
    for name, figures in summary.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if k not in TIMES and isinstance(v, float))
        lines.append(f"| {name} | {figures['wall_seconds']:.0f} | {figures.get('cpu_seconds') or 0:.0f} | {shown} |")
    lines.append(f"| whole process | {total[0]:.0f} | {total[1]:.0f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-e", "--experiment", default="chat_demo", help="a pipeline experiment")
    parser.add_argument("--workdir", required=True, help="a new directory for the run")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    if os.path.isdir(args.workdir) and os.listdir(args.workdir):
        raise SystemExit(f"--workdir {args.workdir} is not empty: give a new directory")
    loads = [os.getloadavg()[0]]
    total = run(args)
    loads.append(os.getloadavg()[0])
    with open(os.path.join(args.workdir, "summary.json")) as f:
        text = table(json.load(f), total, tuple(loads), args)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
