"""DPO, KTO and ORPO runs end to end on tiny JSONL data: they learn held-out preferences,
resume, and name bad records."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_run_config

from flaxgpt import runs
from flaxgpt.config import ConfigError
from flaxgpt.data.jsonl import DataError
from flaxgpt.train import load_experiment, run_trainer
from flaxgpt.trainers import dpo, grpo, kto, orpo, sft

RNG = np.random.default_rng(0)


def _word(with_x: bool) -> str:
    letters = list("abcdefg")
    word = list(RNG.choice(letters, size=RNG.integers(2, 4)))
    if with_x:
        word[RNG.integers(len(word))] = "x"
    return "".join(word)


def _write(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An SFT policy that says short words (some with an x), and preference data preferring x."""
    base = tmp_path_factory.mktemp("pref")
    chats = [
        {"messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": _word(i % 2 == 0)}]}
        for i in range(80)
    ]
    paths = {"chats": _write(base / "chats.jsonl", chats)}
    pairs = [{"prompt": "say", "chosen": _word(True), "rejected": _word(False)} for _ in range(72)]
    paths["pairs"] = _write(base / "pairs.jsonl", pairs)
    feedback = [{"prompt": "say", "response": _word(i % 2 == 0), "label": i % 2 == 0} for i in range(72)]
    paths["feedback"] = _write(base / "feedback.jsonl", feedback)
    cfg = tiny_run_config(
        train={"trainer": "sft", "max_steps": 30},
        data={"source": "jsonl", "path": paths["chats"], "packing": "pad"},
        sft={"eval_examples": 0},
        eval={"interval": 30, "iters": 1, "sample_tokens": 0},
    )
    paths["prompts"] = _write(base / "prompts.jsonl", [{"prompt": "say"}] * 40)
    paths["policy"] = str(base / "sft")
    sft.run(cfg, paths["policy"])
    return paths


def _config(trainer: str, data: dict, path: str, max_steps: int = 24):
    return tiny_run_config(
        train={"trainer": trainer, "init_from": data["policy"], "max_steps": max_steps, "batch_size": 8},
        data={"source": "jsonl", "path": path, "train_fraction": 0.75},
        optimizer={"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "decay": "constant", "weight_decay": 0.0},
        eval={"interval": 1000, "iters": 3},
        checkpoint={"every_steps": 12},
    )


def test_dpo_learns_held_out_preferences_and_resumes(data, tmp_path):
    workdir = str(tmp_path / "dpo")
    cfg = _config("dpo", data, data["pairs"], max_steps=12)
    dpo.run(cfg, workdir)
    cfg.train.max_steps = 24
    result = dpo.run(cfg, workdir)  # resumes from step 12
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    assert result["val_reward_accuracy"] >= 0.8, result
    assert result["val_reward_margin"] > 0 and result["val_chosen_logp"] < 0
    assert result["val_loss"] < np.log(2)  # below the start, where policy == reference


def test_kto_and_orpo_learn_held_out_preferences(data, tmp_path):
    result = kto.run(_config("kto", data, data["feedback"]), str(tmp_path / "kto"))
    assert result["val_chosen_reward"] > result["val_rejected_reward"] + 0.15, result  # both 0 at the start
    assert result["val_loss"] < 0.5  # 1 - sigmoid(0) at the start
    result = orpo.run(_config("orpo", data, data["pairs"]), str(tmp_path / "orpo"))
    assert result["val_reward_accuracy"] >= 0.7, result  # the SFT start says x-words half of the time


def test_preference_runs_name_bad_records_and_settings(data, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "say", "chosen": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing key\(s\) \['rejected'\]"):
        dpo.run(_config("dpo", data, bad), str(tmp_path / "bad"))
    cfg = _config("dpo", data, data["pairs"])
    cfg.train.init_from = ""
    with pytest.raises(ConfigError, match="train.trainer='dpo' starts from a policy"):
        cfg.validate()
    cfg = _config("kto", data, data["feedback"])
    cfg.kto.beta = 0.0
    with pytest.raises(ConfigError, match="kto.beta=0.0: expected"):
        cfg.validate()


def reward_letter_x(prompt: str, response: str) -> float:
    return float("x" in response)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_a_reward_function(data, tmp_path, advantage):
    cfg = _config("grpo", data, data["prompts"], max_steps=10)
    cfg.ppo.reward_function = "test_preference_trainers:reward_letter_x"
    cfg.ppo.prompts_path, cfg.ppo.max_new_tokens, cfg.ppo.eval_prompts = data["prompts"], 6, 8
    cfg.grpo.advantage, cfg.grpo.group_size, cfg.grpo.epochs = advantage, 4, 2
    workdir = str(tmp_path / advantage)
    grpo.run(cfg, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"reward_mean"' in line]
    first, last = np.mean([r["reward_mean"] for r in rows[:3]]), np.mean([r["reward_mean"] for r in rows[-3:]])
    assert last > first + 0.2, (first, last)
    assert all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    # the trained policy loads like any model (chat, serve, sample)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(runs.load(workdir).params))


def test_grpo_refuses_a_reward_from_that_is_not_a_reward_model_before_making_the_workdir(data, tmp_path):
    cfg = _config("grpo", data, data["prompts"])
    cfg.ppo.reward_from, cfg.ppo.prompts_path = data["policy"], data["prompts"]  # an SFT run: logits, no score
    with pytest.raises(
        ConfigError, match=r"ppo.reward_from=.* is not a reward model for this policy \(output 'logits'"
    ):
        grpo.run(cfg, str(tmp_path / "grpo"))
    cfg.ppo.reward_from, cfg.ppo.reward_function = "", "math:pi"
    with pytest.raises(ConfigError, match="is a float, not a function"):
        grpo.run(cfg, str(tmp_path / "pi"))
    assert not os.path.exists(tmp_path / "pi")


@pytest.mark.parametrize(
    "name, records, extra",
    [
        ("kto_jsonl", "feedback", []),
        ("orpo_jsonl", "pairs", []),
        ("grpo_jsonl", "prompts", ["ppo.reward_function=test_preference_trainers:reward_letter_x"]),
    ],
)
def test_jsonl_experiments_train_on_user_files(data, tmp_path, name, records, extra):
    """Each *_jsonl experiment, pointed at a user's file and SFT run, parses and trains a couple of steps."""
    where = "ppo.prompts_path" if records == "prompts" else "data.path"
    settings = [f"{where}={data[records]}", f"train.init_from={data['policy']}", "train.max_steps=2"]
    settings += ["train.batch_size=8", "eval.interval=1000", "eval.iters=1", "logging.progress=none"]
    settings += ["ppo.max_new_tokens=6", "ppo.eval_prompts=4", "grpo.group_size=2", *extra]
    cfg = load_experiment(name, settings)
    result = run_trainer(cfg, str(tmp_path / name))
    assert result["step"] == 2 and np.isfinite(result["loss"]), result
