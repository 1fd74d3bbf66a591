"""The run scaffold under faults: SIGTERM / SIGINT save at the current step and a resume is
bit-exact (pretraining through the CLI, PPO in process); a non-finite stop leaves the last
checkpoint complete and says so in one line; eval.iters=0 and an SFT answer length that
leaves no room for a prompt never lose a run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, tiny_run_config
from test_checkpoint_resume import KILLED_RUN
from test_ppo import policy_run, ppo_config  # noqa: F401  (policy_run is a fixture)

from flaxgpt.checkpoint import CheckpointMismatch
from flaxgpt.config import ConfigError
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.trainers import ppo, pretrain, sft
from flaxgpt.trainers.scaffold import Interrupted, NonFiniteLoss

TIMING = ("tokens_per_sec", "mfu", "rollout_seconds", "update_seconds")

TINY = [
    "model.recipe=llama",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_kv_heads=1",
    "model.d_model=32",
    "model.block_size=32",
    "data.world_documents=300",
    "train.batch_size=8",
    "train.max_steps=12",
    "train.log_interval=1",
    "eval.interval=6",
    "eval.iters=1",
    "eval.sample_tokens=0",
    "checkpoint.every_steps=5",
    "logging.progress=plain",
]


def _rows(workdir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


def _steps(workdir: str) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_the_resume_is_bit_exact(tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    args = ["--experiment", "world", "--set", *TINY]
    done = run_cli(*args, "--workdir", straight)
    assert done.returncode == 0, done.stderr[-3000:]

    died = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *args, "--workdir", stopped],
        cwd=REPO,
        env={**os.environ, "KILL_AT": "7", "KILL_SIGNAL": "SIGTERM"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode == 143, died.stderr[-3000:]
    assert "Traceback" not in died.stderr
    assert died.stderr.strip().splitlines()[-1] == (
        "stopped: SIGTERM at step 7: checkpoint saved at step 7; run the same command to resume"
    )
    assert _steps(stopped) == [5, 7]  # 7 is between two checkpoints

    resumed = run_cli(*args, "--workdir", stopped)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 7" in resumed.stdout
    assert _rows(stopped) == _rows(straight)
    assert [r["step"] for r in _rows(stopped)] == list(range(1, 13))


def _signal_after(monkeypatch, step: int, sig: int) -> None:
    original = MetricsLogger.log

    def log_then_signal(self, at, metrics):
        original(self, at, metrics)
        if at == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)


def test_ppo_sigint_saves_and_the_resume_is_bit_exact(policy_run, tmp_path, monkeypatch):  # noqa: F811
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    config = lambda: ppo_config(policy_run, "test_ppo:reward_letter_x", 4, value_model="separate", eval_prompts=0)
    # the handler the process had (a background shell's worker inherits SIG_IGN, a terminal's the default)
    before = signal.getsignal(signal.SIGINT)
    ppo.run(config(), straight)
    with monkeypatch.context() as m:
        _signal_after(m, 3, signal.SIGINT)
        with pytest.raises(Interrupted, match="SIGINT at step 3: checkpoint saved at step 3") as stop:
            ppo.run(config(), stopped)
    assert stop.value.code == 130
    assert _steps(stopped) == [2, 3]
    ppo.run(config(), stopped)
    assert _rows(stopped) == _rows(straight)
    assert signal.getsignal(signal.SIGINT) is before  # the scaffold put it back


def test_non_finite_stop_keeps_the_last_checkpoint_complete(tmp_path):
    workdir = str(tmp_path / "nan")
    cfg = tiny_run_config(
        optimizer={"lr": 1e6, "min_lr": 1e6, "warmup_steps": 0},
        train={"max_steps": 30, "max_skipped_steps": 0, "log_interval": 100},
        eval={"interval": 100, "sample_tokens": 0},
        checkpoint={"every_steps": 1},
    )
    with pytest.raises(NonFiniteLoss) as stop:
        pretrain.run(cfg, workdir)
    message = str(stop.value)
    assert "\n" not in message and "Lower optimizer.lr (now 1e+06)" in message
    saved = _steps(workdir)
    assert saved and f"the last checkpoint is step {saved[-1]}" in message
    # nothing half-written: every directory is a finished checkpoint, and no log step was needed
    # to notice (max_skipped_steps is checked at every step, not only on log steps)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(s) for s in saved]
    assert saved[-1] < 29


def test_eval_iters_zero_then_a_refused_and_a_damaged_resume(tmp_path, capsys):
    """eval.iters=0 trains and saves; a resume refused for another model shape leaves config.json
    as it was; an unreadable latest checkpoint resumes from the one before, saying so."""
    workdir = str(tmp_path / "noeval")
    cfg = lambda steps: tiny_run_config(
        train={"max_steps": steps}, eval={"interval": 2, "iters": 0, "sample_tokens": 0}, checkpoint={"every_steps": 2}
    )
    result = pretrain.run(cfg(4), workdir)
    assert "val_loss" not in result and "loss" in result and _steps(workdir) == [2, 4]

    config_file = os.path.join(workdir, "config.json")
    before = open(config_file).read()
    other = cfg(6)
    other.model.d_model = 64
    with pytest.raises(CheckpointMismatch):
        pretrain.run(other, workdir)
    assert open(config_file).read() == before

    latest = os.path.join(workdir, "checkpoints", "4")
    shutil.rmtree(latest)
    os.makedirs(latest)  # an empty step directory, as a deleted or never-finished copy leaves
    capsys.readouterr()
    pretrain.run(cfg(6), workdir)
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "4" in out.split("resumed from step 2")[0]
    assert _steps(workdir)[-1] == 6 and [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


def test_sft_answer_length_without_room_is_refused_before_training(tmp_path):
    cfg = tiny_run_config(train={"trainer": "sft", "max_steps": 2}, sft={"max_new_tokens": 64, "eval_examples": 4})
    cfg.data.world_conversations, cfg.model.block_size = 20, 64
    with pytest.raises(ConfigError, match="sft.max_new_tokens=64 leaves no room"):
        sft.run(cfg, str(tmp_path / "sft"))
    assert not os.path.exists(os.path.join(tmp_path, "sft", "checkpoints"))


def test_a_run_holds_its_workdir_lock(tmp_path):
    from flaxgpt.train import run_trainer
    from flaxgpt.workdir import WorkdirBusy, WorkdirLock

    workdir = str(tmp_path / "held")
    with WorkdirLock(workdir), pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
        run_trainer(tiny_run_config(train={"max_steps": 1}), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_ppo_killed_before_its_first_checkpoint_logs_its_step_0_row_once(policy_run, tmp_path, monkeypatch):  # noqa: F811
    workdir = str(tmp_path / "early")
    original = MetricsLogger.log

    def die_at_step_1(self, at, metrics):
        original(self, at, metrics)
        if at == 1:
            raise KeyboardInterrupt  # as a kill: nothing saved, the step-0 row already logged

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(MetricsLogger, "log", die_at_step_1)
        ppo.run(ppo_config(policy_run, "test_ppo:reward_letter_x", 2), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))
    result = ppo.run(ppo_config(policy_run, "test_ppo:reward_letter_x", 2), workdir)
    assert [r["step"] for r in read_metrics(workdir)] == [0, 1, 2]
    assert "start_eval_reward" in result
