#!/usr/bin/env python3
"""Run a flaxgpt experiment on a Cloud TPU VM or pod slice, and resume it after preemption.

    python launch/tpu.py up --name flaxgpt-1 --zone us-central2-b --accelerator-type v4-32 --spot \\
        --workdir gs://my-bucket/runs/chat_demo --experiment chat_demo [--set mesh.fsdp=-1 ...]

`up` creates the VM (unless it exists), installs flaxgpt on every worker (this checkout's HEAD,
copied over, or `--repo URL --ref REF`), runs
`python -m flaxgpt.train` on all workers at once (`--worker=all`; each becomes one JAX process,
`jax.distributed` initialises itself on a multi-host slice), and waits. If the job ends
because the VM was preempted (a spot VM reclaimed), `up` deletes it, creates it again and
relaunches the same command, which resumes from the last checkpoint in the gs:// workdir; it
gives up after --max-restarts. The other subcommands are the single steps:

    create | setup | run | logs | status | copy-back | delete

Every gcloud / gsutil command is printed before it runs; `--dry-run` only prints them.
Needs the Google Cloud SDK (`gcloud`) where it runs; nothing here talks to Google otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ARCHIVE = "/tmp/flaxgpt-src.tar.gz"
LOG_FILE = "flaxgpt-run.log"


@dataclass
class Target:
    name: str
    zone: str
    project: str | None
    accelerator_type: str
    runtime_version: str
    spot: bool
    preemptible: bool

    def scope(self) -> list[str]:
        return [self.name, f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def hosts(self) -> int:
        """Workers of the slice. v2/v3/v4/v5p names count TensorCores (8 per host); v5e
        (v5litepod) and v6e names count chips: up to 8 on one host, 4 per host beyond."""
        kind, _, size = self.accelerator_type.rpartition("-")
        n = int(size)
        if kind in ("v5litepod", "v5e", "v6e"):
            return 1 if n <= 8 else n // 4
        return max(1, n // 8)


def gcloud_tpu(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *args]


def create_command(t: Target) -> list[str]:
    cmd = gcloud_tpu("create", *t.scope(), f"--accelerator-type={t.accelerator_type}", f"--version={t.runtime_version}")
    if t.spot:
        cmd.append("--spot")
    elif t.preemptible:
        cmd.append("--preemptible")
    return cmd


def ssh_command(t: Target, remote: str, worker: str = "all") -> list[str]:
    return gcloud_tpu("ssh", *t.scope(), f"--worker={worker}", f"--command={remote}")


def source_commands(t: Target, repo: str | None) -> list[list[str]]:
    """Without --repo: this checkout's HEAD, archived and copied to every worker."""
    if repo:
        return []
    return [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", "-o", SOURCE_ARCHIVE, "HEAD"],
        gcloud_tpu("scp", SOURCE_ARCHIVE, f"{t.name}:~/flaxgpt-src.tar.gz", "--worker=all", *t.scope()[1:]),
    ]


def setup_script(repo: str | None, ref: str, extras: str) -> str:
    """What every worker runs: a venv with jax[tpu] and flaxgpt (from --repo at `ref`, or the
    archive `source_commands` copied)."""
    if repo:
        fetch = [
            f"(test -d flaxgpt || git clone {shlex.quote(repo)} flaxgpt)",
            f"cd flaxgpt && git fetch -q origin && git checkout -q {shlex.quote(ref)}",
        ]
    else:
        fetch = ["rm -rf flaxgpt && mkdir flaxgpt && tar -xzf ~/flaxgpt-src.tar.gz -C flaxgpt", "cd flaxgpt"]
    return " && ".join(
        [
            "set -e",
            "sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv git",
            *fetch,
            "python3 -m venv ~/flaxgpt-venv",
            "~/flaxgpt-venv/bin/pip install -q -U pip",
            "~/flaxgpt-venv/bin/pip install -q 'jax[tpu]>=0.10.2,<0.11'",
            f"~/flaxgpt-venv/bin/pip install -q -e {shlex.quote(f'.[{extras}]')}",
        ]
    )


def train_script(experiment: str, workdir: str, overrides: Sequence[str]) -> str:
    """The one training command, identical on every worker; output goes to a log on each."""
    train = [
        "~/flaxgpt-venv/bin/python",
        "-m",
        "flaxgpt.train",
        "--experiment",
        shlex.quote(experiment),
        "--workdir",
        shlex.quote(workdir),
    ]
    if overrides:
        train += ["--set", *(shlex.quote(o) for o in overrides)]
    return f"cd flaxgpt && {' '.join(train)} 2>&1 | tee ~/{LOG_FILE}; exit ${{PIPESTATUS[0]}}"


def logs_command(t: Target, follow: bool) -> list[str]:
    return ssh_command(t, f"tail {'-f ' if follow else ''}-n 200 ~/{LOG_FILE}", worker="0")


def copy_back_command(workdir: str, local: str) -> list[str]:
    if workdir.startswith("gs://"):
        return ["gsutil", "-m", "rsync", "-r", workdir, local]
    raise SystemExit("copy-back reads a gs:// workdir (a worker's local disk goes with the VM)")


def state_command(t: Target) -> list[str]:
    return gcloud_tpu("describe", *t.scope(), "--format=value(state)")


class Runner:
    """Prints each command; runs it unless dry-run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "" if capture else None, None)
        result = subprocess.run(cmd, text=True, capture_output=capture)
        if check and result.returncode:
            raise SystemExit(f"command failed ({result.returncode}): {shlex.join(cmd)}")
        return result


def vm_state(run: Runner, t: Target) -> str:
    """READY, PREEMPTED, ... or "" when the VM does not exist."""
    result = run(state_command(t), check=False, capture=True)
    return (result.stdout or "").strip() if result.returncode == 0 else ""


def up(run: Runner, t: Target, args: argparse.Namespace) -> int:
    """Create (if needed), set up, train; on preemption recreate and resume, up to max_restarts."""
    for attempt in range(args.max_restarts + 1):
        state = vm_state(run, t)
        if state not in ("READY", ""):
            print(f"VM {t.name} is {state}: deleting it to start afresh", flush=True)
            run(gcloud_tpu("delete", *t.scope(), "--quiet"))
            state = ""
        if not state:
            run(create_command(t))
        for cmd in source_commands(t, args.repo):
            run(cmd)
        run(ssh_command(t, setup_script(args.repo, args.ref, args.extras)))
        result = run(ssh_command(t, train_script(args.experiment, args.workdir, args.set)), check=False)
        if result.returncode == 0:
            print(f"training finished; results in {args.workdir}", flush=True)
            if args.delete_when_done:
                run(gcloud_tpu("delete", *t.scope(), "--quiet"))
            return 0
        after = vm_state(run, t)
        if after == "READY" and not args.dry_run:
            print("training failed on a healthy VM (not a preemption); see `logs`", file=sys.stderr)
            return result.returncode
        print(
            f"attempt {attempt + 1}: VM is {after or 'gone'} (preempted); relaunching to resume from the "
            f"last checkpoint in {args.workdir}",
            flush=True,
        )
        if not args.dry_run:
            time.sleep(args.retry_wait)
    print(f"gave up after {args.max_restarts} restarts", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("up", "create", "setup", "run", "logs", "status", "copy-back", "delete"))
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    parser.add_argument(
        "--accelerator-type", default="v4-8", help="e.g. v4-8 (one host), v4-32, v5litepod-16 (default: %(default)s)"
    )
    parser.add_argument(
        "--runtime-version", default=DEFAULT_RUNTIME, help="TPU VM software version (default: %(default)s)"
    )
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted)")
    capacity.add_argument("--preemptible", action="store_true")
    parser.add_argument("--repo", help="git URL the workers clone flaxgpt from (default: copy this checkout's HEAD)")
    parser.add_argument(
        "--ref", default="main", help="with --repo: branch, tag or commit to check out (default: %(default)s)"
    )
    parser.add_argument(
        "--extras", default="tfds,gcs", help="pip extras to install with flaxgpt (default: %(default)s)"
    )
    parser.add_argument(
        "--experiment",
        "-e",
        default="world",
        help="experiment name or file, as for flaxgpt.train (default: %(default)s)",
    )
    parser.add_argument("--workdir", help="run directory; gs://bucket/path so checkpoints outlive the VM")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--local", default="runs/from_tpu", help="copy-back destination (default: %(default)s)")
    parser.add_argument("--follow", action="store_true", help="logs: keep streaming")
    parser.add_argument(
        "--max-restarts", type=int, default=5, help="relaunches after preemption (default: %(default)s)"
    )
    parser.add_argument(
        "--retry-wait", type=float, default=60.0, help="seconds between preemption retries (default: %(default)s)"
    )
    parser.add_argument("--delete-when-done", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9]+-[0-9]+", args.accelerator_type):
        parser.error(f"--accelerator-type {args.accelerator_type!r}: expected TYPE-SIZE, e.g. v4-8 or v5litepod-16")
    t = Target(
        args.name, args.zone, args.project, args.accelerator_type, args.runtime_version, args.spot, args.preemptible
    )
    run = Runner(args.dry_run)
    if args.command in ("up", "run") and not args.workdir:
        parser.error(f"{args.command} needs --workdir (gs://... so a preempted run can resume)")
    if args.command in ("up", "run") and t.hosts() > 1 and not args.workdir.startswith("gs://"):
        parser.error(
            "a multi-host slice needs a gs:// --workdir: every worker saves its shards of the checkpoint there"
        )
    print(f"# {t.accelerator_type}: {t.hosts()} host(s)", flush=True)
    if args.command == "up":
        return up(run, t, args)
    if args.command == "create":
        run(create_command(t))
    elif args.command == "setup":
        for cmd in source_commands(t, args.repo):
            run(cmd)
        run(ssh_command(t, setup_script(args.repo, args.ref, args.extras)))
    elif args.command == "run":
        return run(ssh_command(t, train_script(args.experiment, args.workdir, args.set)), check=False).returncode
    elif args.command == "logs":
        run(logs_command(t, args.follow))
    elif args.command == "status":
        print(vm_state(run, t) or "absent")
    elif args.command == "copy-back":
        run(copy_back_command(args.workdir or "", args.local))
    elif args.command == "delete":
        run(gcloud_tpu("delete", *t.scope(), "--quiet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
