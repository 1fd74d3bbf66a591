"""A run killed with SIGKILL and started again logs exactly what an uninterrupted run logs."""

import os
import subprocess
import sys

import pytest

from flaxgpt.logging import read_metrics
from tests.conftest import REPO, run_cli

TINY = [
    "model.recipe=llama",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_kv_heads=1",
    "model.d_model=32",
    "model.block_size=32",
    "model.dropout=0.1",
    "data.world_documents=400",
    "train.batch_size=8",
    "train.grad_accum_steps=2",
    "train.max_steps=30",
    "train.log_interval=1",
    "eval.interval=10",
    "eval.iters=2",
    "eval.sample_tokens=5",
    "checkpoint.every_steps=10",
    "logging.progress=plain",
    # Synchronous saves make the restore point certain (step 10); an async save still in flight
    # at the kill is left as a *.orbax-checkpoint-tmp directory that a restart ignores and removes.
    "checkpoint.async_save=false",
]

# Runs the real CLI in-process, but sends itself KILL_SIGNAL (default SIGKILL) right after
# logging step KILL_AT.
KILLED_RUN = r"""
import os, signal, sys
from flaxgpt import logging as flog
KILL_AT = int(os.environ["KILL_AT"])
SIGNAL = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
original = flog.MetricsLogger.log
def log_then_die(self, step, metrics):
    original(self, step, metrics)
    if step == KILL_AT:
        os.kill(os.getpid(), SIGNAL)
flog.MetricsLogger.log = log_then_die
from flaxgpt.train import main
sys.exit(main(sys.argv[1:]))
"""

COMPARED = ("loss", "lr", "grad_norm", "val_loss", "val_ppl")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    args = ["--experiment", "world", "--set", *TINY]
    done = run_cli(*args, "--workdir", straight)
    assert done.returncode == 0, done.stderr[-3000:]

    died = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *args, "--workdir", killed],
        cwd=REPO,
        env={**os.environ, "KILL_AT": "17"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode == -9, died.stderr[-3000:]
    assert max(r["step"] for r in read_metrics(killed)) == 17
    assert os.listdir(os.path.join(killed, "checkpoints")) == ["10"]

    resumed = run_cli(*args, "--workdir", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 10" in resumed.stdout
    assert sorted(os.listdir(os.path.join(killed, "checkpoints"))) == ["10", "20", "30"]

    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in a] == list(range(1, 31)) == [r["step"] for r in b]
    for row_a, row_b in zip(a, b):
        for key in COMPARED:
            assert row_a.get(key) == row_b.get(key), f"step {row_a['step']}: {key} {row_a.get(key)} != {row_b.get(key)}"

    # A finished run started again does no more work and keeps its log.
    again = run_cli(*args, "--workdir", killed)
    assert again.returncode == 0 and read_metrics(killed) == b

    # A checkpoint restored into a different model is refused with the field named.
    for override, field in (("model.d_model=48", "model.d_model"), ("model.vocab_size=99", "model.vocab_size")):
        wrong = run_cli(*args, override, "train.max_steps=40", "--workdir", killed)
        assert wrong.returncode == 2
        assert field in wrong.stderr and "does not fit this model" in wrong.stderr
