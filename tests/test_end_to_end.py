"""Whole runs: the embedded world (fast), wandb offline, and nanoGPT's shakespeare_char figure."""

import json
import os
import sys

import pytest

from flaxgpt import host_allocator
from flaxgpt.logging import read_metrics
from flaxgpt.trainers import pretrain
from tests.conftest import run_cli, tiny_run_config


def test_short_world_run_learns_and_writes_its_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = tiny_run_config(train={"max_steps": 60}, eval={"interval": 20})
    result = pretrain.run(cfg, workdir)
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in rows)
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [20, 40, 60]
    assert evaluated[-1]["val_loss"] < 0.85 * evaluated[0]["val_loss"]
    assert rows[-1]["loss"] < 0.65 * rows[0]["loss"]  # from ln(vocab) ~ 4.2
    assert all(0.0 < r["mfu"] < 1.0 for r in rows)  # against the matmul peak measured on this CPU
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert evaluated[-1]["val_ppl"] < 0.5 * saved["model"]["vocab_size"]  # well below a uniform guess
    assert saved["model"]["vocab_size"] > 0 and saved["model"]["norm"] == "layernorm"  # resolved
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [20, 30, 40, 50, 60]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    assert result["val_loss"] == evaluated[-1]["val_loss"] and result["loss"] == rows[-1]["loss"]  # the last row
    assert len(result["sample"]) > 0  # eval.sample_tokens=10 of text after the prompt


def test_sentencepiece_tokenizer_is_trained_into_the_workdir(tmp_path):
    workdir = str(tmp_path / "spm")
    cfg = tiny_run_config(
        data={"tokenizer": "sentencepiece", "spm_vocab_size": 400},
        train={"max_steps": 4},
        eval={"interval": 4, "sample_tokens": 0},
    )
    pretrain.run(cfg, workdir)
    assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["vocab_size"] == 400


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_training_loop_logs_the_allocator_advice_before_its_first_step(tmp_path, monkeypatch, capsys):
    """The loop's wiring of host_allocator.host_allocator_advice (whose threshold logic has its own test):
    with the thread-arena limit lowered to zero, even the tiny step's buffers are over it."""
    monkeypatch.setenv("FLAXGPT_HOST_ALLOCATOR", "tuned")
    monkeypatch.setattr(host_allocator, "THREAD_ARENA_LIMIT_BYTES", 0)
    monkeypatch.setattr(host_allocator, "ADVICE_MIN_BYTES", 0)
    cfg = tiny_run_config(train={"max_steps": 2}, eval={"interval": 2, "sample_tokens": 0})
    pretrain.run(cfg, str(tmp_path / "advised"))
    assert capsys.readouterr().out.count("FLAXGPT_HOST_ALLOCATOR=one-arena") == 1  # once, before step 1


def test_wandb_offline_logging(tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'flaxgpt[wandb]'")
    workdir = str(tmp_path / "wb")
    cfg = tiny_run_config(
        train={"max_steps": 3},
        eval={"interval": 3, "sample_tokens": 0},
        logging={"wandb": True, "wandb_mode": "offline", "progress": "none"},
    )
    os.environ.setdefault("WANDB_SILENT", "true")
    pretrain.run(cfg, workdir)
    runs = [d for d in os.listdir(os.path.join(workdir, "wandb")) if d.startswith("offline-run-")]
    assert runs, os.listdir(os.path.join(workdir, "wandb"))


@pytest.mark.slow
def test_shakespeare_char_reaches_nanogpt_val_loss(tmp_path, shakespeare_path):
    """nanoGPT reports 1.88 for this configuration; the issue asks for <= 1.90 at 2000 steps."""
    workdir = str(tmp_path / "shakespeare")
    # evaluated once, at the end: evaluation changes nothing in training, so the figure is the
    # same as with the experiment's every-250-steps evaluation, and the suite saves half a minute
    result = run_cli(
        "--experiment",
        "shakespeare_char",
        "--workdir",
        workdir,
        "--set",
        f"data.path={shakespeare_path}",
        "logging.progress=plain",
        "eval.interval=2000",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(workdir)[-1]
    assert final["step"] == 2000
    assert final["val_loss"] <= 1.90, final
    assert "--- sample ---" in result.stdout
