"""What a resume must not do: overwrite the workdir's tokenizer when it is refused, forget where
a finished run stopped, or lose a stop signal that came during the last step."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import tiny_run_config

from flaxgpt.checkpoint import CheckpointMismatch
from flaxgpt.data.tokenizers import load_tokenizer
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.trainers import pretrain
from flaxgpt.trainers.scaffold import STOPPED


def tiny(steps: int = 2, docs: int = 400, **train):
    return tiny_run_config(
        data={"world_documents": docs},
        train={"max_steps": steps, **train},
        eval={"interval": 2, "iters": 1, "sample_tokens": 0},
        checkpoint={"every_steps": 2},
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two finished 2-step runs whose character sets differ (400 and 20 world documents)."""
    root = tmp_path_factory.mktemp("sources")
    a, b = str(root / "a"), str(root / "b")
    pretrain.run(tiny(), a)
    pretrain.run(tiny(docs=20), b)
    assert load_tokenizer(a).vocab_size != load_tokenizer(b).vocab_size
    return a, b


def test_a_refused_resume_keeps_the_workdirs_tokenizer_and_config(sources, tmp_path):
    a, b = sources
    workdir = str(tmp_path / "ft")
    pretrain.run(tiny(init_from=a), workdir)
    kept = {f: open(os.path.join(workdir, f), "rb").read() for f in os.listdir(workdir) if f.endswith(".json")}
    with pytest.raises(CheckpointMismatch, match="vocab_size"):
        pretrain.run(tiny(4, init_from=b), workdir)
    assert {f: open(os.path.join(workdir, f), "rb").read() for f in kept} == kept
    assert load_tokenizer(workdir).vocab_size == load_tokenizer(a).vocab_size


def test_a_finished_run_asked_for_fewer_steps_reports_its_real_step_and_keeps_its_config(sources, capsys):
    a, _ = sources
    config = open(os.path.join(a, "config.json")).read()
    capsys.readouterr()
    result = pretrain.run(tiny(1), a)
    out = capsys.readouterr().out
    assert result["step"] == 2 and "finished earlier: step 2 |" in out
    assert result["loss"] == read_metrics(a)[-1]["loss"]  # the last training row's figures too
    assert open(os.path.join(a, "config.json")).read() == config


def test_a_stop_signal_during_the_last_step_finishes_and_says_so(tmp_path, monkeypatch):
    original = MetricsLogger.log

    def log_then_signal(self, at, metrics):
        original(self, at, metrics)
        if at == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    workdir = str(tmp_path / "last")
    result = pretrain.run(tiny(), workdir)
    assert result[STOPPED] == "SIGTERM" and result["step"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert "stopped_by" not in pretrain.run(tiny(), workdir)  # a run asked again without a signal


def test_an_open_ended_run_shows_no_total_and_no_eta(tmp_path, capsys):
    from flaxgpt.config import LoggingConfig

    logger = MetricsLogger(str(tmp_path), LoggingConfig(progress="plain", tensorboard=False), 0, 0, {})
    logger.log(2, {"loss": 1.5})
    logger.close()
    assert capsys.readouterr().out.strip() == "step 2 | loss 1.5"


def test_a_resume_refuses_a_changed_meaning_field_and_names_a_changed_optimizer_key(sources):
    from flaxgpt.checkpoint import StateMismatch

    a, _ = sources
    changed = tiny(4)
    changed.model.logit_softcap = 30.0
    with pytest.raises(CheckpointMismatch, match="model.logit_softcap: checkpoint has 0.0, config has 30.0"):
        pretrain.run(changed, a)
    no_clip = tiny(4)
    no_clip.optimizer.grad_clip = 0.0
    with pytest.raises(StateMismatch, match=r"optimizer.grad_clip=1.0 in config.json, 0.0 here") as refused:
        pretrain.run(no_clip, a)
    assert "Move them out" not in str(refused.value) and os.listdir(os.path.join(a, "checkpoints")) == ["2"]


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("seed", 1)])
def test_a_resume_with_another_batch_size_or_seed_is_refused_naming_it(sources, key, value):
    a, _ = sources
    with pytest.raises(CheckpointMismatch, match=f"train.{key}=.* there, {value} here"):
        pretrain.run(tiny(4, **{key: value}), a)
    assert os.listdir(os.path.join(a, "checkpoints")) == ["2"]


def test_a_restarted_online_learner_keeps_its_metrics_up_to_its_newest_checkpoint(sources, tmp_path):
    import json

    import jax.numpy as jnp

    from flaxgpt.checkpoint import Checkpointer
    from flaxgpt.trainers.online import Learner

    a, _ = sources
    cfg = tiny(2, trainer="online", init_from=a)
    workdir = str(tmp_path / "learner")
    Learner(cfg, workdir).close()
    saved = Checkpointer(workdir, cfg.checkpoint)  # stands in for the learner's step-0 and first update
    saved.save(2, {"x": jnp.zeros(2)}, {"step": 2}, force=True)
    saved.close()
    rows = [{"step": 0, "accuracy": 0.5}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.9}]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    Learner(cfg, workdir).close()
    assert read_metrics(workdir) == rows[:2]  # what a kill left past step 2 goes, nothing before it
