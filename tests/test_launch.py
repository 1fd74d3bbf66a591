"""launch/tpu.py: the Cloud TPU job script, through its --dry-run output. (The Colab notebook is
executed top to bottom in test_pipeline.py, where it runs the tiny chat demo.)"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from tests.conftest import REPO


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join("launch", "tpu.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _remote(command: str) -> str:
    """What an ssh command runs on the workers."""
    return shlex.split(command)[-1].removeprefix("--command=")


def test_dry_run_single_host_prints_create_setup_train():
    out = _launch(
        "up",
        "--name",
        "fg",
        "--zone",
        "us-central2-b",
        "--accelerator-type",
        "v4-8",
        "--spot",
        "--workdir",
        "gs://bucket/runs/world",
        "--experiment",
        "world",
        "--set",
        "train.max_steps=100",
        "--dry-run",
    )
    assert out.returncode == 0, out.stderr
    assert "# v4-8: 1 host(s)" in out.stdout
    cmds = _commands(out.stdout)
    assert cmds[0] == ("gcloud compute tpus tpu-vm describe fg --zone=us-central2-b '--format=value(state)'")
    assert cmds[1] == (
        "gcloud compute tpus tpu-vm create fg --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base --spot"
    )
    # this checkout's HEAD goes to every worker
    assert cmds[2].startswith("git -C ") and cmds[2].endswith("archive --format=tar.gz -o /tmp/flaxgpt-src.tar.gz HEAD")
    assert cmds[3] == (
        "gcloud compute tpus tpu-vm scp /tmp/flaxgpt-src.tar.gz 'fg:~/flaxgpt-src.tar.gz' --worker=all "
        "--zone=us-central2-b"
    )
    assert cmds[4].startswith("gcloud compute tpus tpu-vm ssh fg --zone=us-central2-b --worker=all '--command=")
    assert "pip install -q 'jax[tpu]>=0.10.2,<0.11'" in _remote(cmds[4]) and "tar -xzf" in _remote(cmds[4])
    assert cmds[5].startswith("gcloud compute tpus tpu-vm ssh fg --zone=us-central2-b --worker=all")
    assert "-m flaxgpt.train --experiment world --workdir gs://bucket/runs/world --set train.max_steps=100" in _remote(
        cmds[5]
    )
    assert len(cmds) == 6  # nothing runs after a finished job unless --delete-when-done


def test_dry_run_multi_host_slice_and_the_other_steps():
    out = _launch(
        "up",
        "--name",
        "pod",
        "--zone",
        "us-east5-a",
        "--project",
        "p1",
        "--accelerator-type",
        "v5litepod-16",
        "--preemptible",
        "--workdir",
        "gs://b/chat",
        "--experiment",
        "chat_demo",
        "--delete-when-done",
        "--repo",
        "https://example.org/flaxgpt.git",
        "--ref",
        "v1",
        "--dry-run",
    )
    assert out.returncode == 0, out.stderr
    assert "# v5litepod-16: 4 host(s)" in out.stdout
    cmds = _commands(out.stdout)
    assert "--project=p1" in cmds[1] and cmds[1].endswith("--version=tpu-ubuntu2204-base --preemptible")
    assert all("--worker=all" in c for c in cmds[2:4])
    assert "git clone https://example.org/flaxgpt.git flaxgpt" in _remote(cmds[2]) and "checkout -q v1" in _remote(
        cmds[2]
    )
    assert cmds[-1] == "gcloud compute tpus tpu-vm delete pod --zone=us-east5-a --project=p1 --quiet"

    local = _launch(
        "up", "--name", "pod", "--zone", "z", "--accelerator-type", "v4-32", "--workdir", "runs/x", "--dry-run"
    )
    assert local.returncode != 0 and "multi-host slice needs a gs:// --workdir" in local.stderr
    logs = _launch("logs", "--name", "pod", "--zone", "z", "--follow", "--dry-run")
    assert _commands(logs.stdout) == [
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=0 '--command=tail -f -n 200 ~/flaxgpt-run.log'"
    ]
    back = _launch(
        "copy-back", "--name", "pod", "--zone", "z", "--workdir", "gs://b/chat", "--local", "out", "--dry-run"
    )
    assert _commands(back.stdout) == ["gsutil -m rsync -r gs://b/chat out"]


def test_run_files_of_a_bucket_workdir_go_through_epath(tmp_path, monkeypatch):
    """A gs:// workdir's config, metrics, tokenizer and summaries are written through epath (here a
    local stand-in for the bucket): metrics are rewritten whole, since a bucket cannot append."""
    import pathlib

    from flaxgpt import fileio
    from flaxgpt.config import LoggingConfig
    from flaxgpt.data.tokenizers import CharTokenizer, load_tokenizer
    from flaxgpt.logging import MetricsLogger, read_metrics
    from flaxgpt.pipeline import _write_json

    seen: list[str] = []

    def bucket(path: str) -> pathlib.Path:
        seen.append(path)
        return tmp_path / "bucket" / path.removeprefix("gs://")

    monkeypatch.setattr(fileio, "_remote", bucket)
    workdir = "gs://my-bucket/run"
    fileio.makedirs(workdir)
    logger = MetricsLogger(workdir, LoggingConfig(progress="none", tensorboard=True), 10, 0, {})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    logger.close()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
    assert (tmp_path / "bucket" / "my-bucket" / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "bucket" / "my-bucket" / "run" / "tb").exists()  # event files stay on the host

    CharTokenizer("abc").save(workdir)
    assert load_tokenizer(workdir).encode("cab") == CharTokenizer("abc").encode("cab")
    _write_json(workdir + "/summary.json", {"ok": 1})
    assert json.loads((tmp_path / "bucket" / "my-bucket" / "run" / "summary.json").read_text()) == {"ok": 1}
    assert all(p.startswith("gs://my-bucket/run") for p in seen)


def test_user_values_reach_the_remote_shell_quoted():
    hostile = "tfds]' ; rm -rf ~ ; echo '["  # closes the quotes the old script put around it
    out = _launch(
        "setup",
        *("--name", "fg", "--zone", "z", "--extras", hostile, "--repo", "https://h/r.git; echo pwned"),
        *("--ref", "main && touch owned", "--dry-run"),
    )
    assert out.returncode == 0, out.stderr
    words = shlex.split(_remote(_commands(out.stdout)[-1]))  # as the workers' shell splits it
    assert f".[{hostile}]" in words and "https://h/r.git; echo pwned" in words and "main && touch owned" in words
    assert "rm" not in words and "touch" not in words and "echo" not in words
    assert "pip extras to install with flaxgpt (default: tfds,gcs)" in " ".join(_launch("--help").stdout.split())
    bad = _launch("status", "--name", "fg", "--zone", "z", "--accelerator-type", "v4-x; ls", "--dry-run")
    assert bad.returncode == 2 and "expected TYPE-SIZE" in bad.stderr and "Traceback" not in bad.stderr
