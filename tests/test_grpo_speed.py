"""benchmarks/grpo_speed.py's flaxgpt side and what it hands TRL's side, on a 1-layer model
(the timed comparison itself is a benchmark, never a test)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from unittest import mock

import pytest
from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("grpo_speed")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    return bench.random_run(str(tmp_path_factory.mktemp("grpo_speed") / "run"), tiny=True)


ARGS = argparse.Namespace(batch=4, group=2, new_tokens=8, epochs=1, steps=1, warmup=1)


def test_trl_is_set_to_flaxgpt_algorithm(bench, tiny_run, tmp_path):
    pytest.importorskip("trl")
    ref = _load("trl_grpo_reference")
    for settings in ({}, {"beta": 0.0, "normalization": "constant", "clip_high": 0.28, "scale_rewards": False}):
        cfg = bench.grpo_config(ARGS, tiny_run)
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, **settings))
        with mock.patch.object(bench, "grpo_config", lambda *_: cfg):
            argv = bench.trl_args(ARGS, 1, tiny_run, "hf", "prompts.json")
        trl_config = ref.grpo_config(ref.parse(argv), str(tmp_path))
        assert ref.algorithm(trl_config) == bench.algorithm(cfg)
        assert trl_config.num_iterations == ARGS.epochs and trl_config.num_generations == ARGS.group


def test_flax_side_runs_the_trainer_step(bench, tiny_run):
    result = bench.flax_side(ARGS, tiny_run)
    assert len(result["step_s"]) == 1 and result["step_s"][0] > 0
    assert 1 <= result["generated_tokens"][0] <= ARGS.batch * ARGS.group * ARGS.new_tokens
    steps_per_s, tokens_per_s = bench.summary(result)
    assert tokens_per_s == pytest.approx(result["generated_tokens"][0] * steps_per_s)


def test_profile_splits_the_step(bench, tiny_run):
    profile = bench.flax_profile(ARGS, tiny_run)
    seconds = profile["seconds"]
    # timed directly (the update proper is the whole update less the reference log-probs, each
    # timed apart: on a tiny model under load their difference is noise)
    pieces = ("generation", "host", "scoring", "reference log-probs")
    assert all(seconds[k] > 0 for k in pieces)
    assert seconds["update"] + seconds["reference log-probs"] > 0
    # the update ran on the packed batch: 4 groups of prompts under 64 tokens and 2 answers of at
    # most 8 fit one row of the narrowest width, the rows rounded up to 2
    assert profile["update_shape"] == (2, 160)
    # the pieces timed inside the step (not its compiling warm-up) fit in the step's time
    assert seconds["generation"] + seconds["host"] + seconds["scoring"] < seconds["total"]


def test_trl_gets_flaxgpt_prompt_ids_and_reward(bench, tiny_run, tmp_path):
    pytest.importorskip("transformers")
    hf_dir = str(tmp_path / "hf")
    bench.export_for_trl(tiny_run, hf_dir)
    path = os.path.join(hf_dir, "prompts.json")
    bench.trl_prompts(ARGS, tiny_run, path)  # exits if the exported tokenizer changes an id
    with open(path) as f:
        records = json.load(f)
    assert records[0]["prompt"].startswith("<|system|>Answer briefly.<|end|><|user|>")
    assert records[0]["prompt"].endswith("<|assistant|>")

    from flaxgpt.data.world import WorldTask, answer

    task = WorldTask(0, "Answer briefly.")
    question = records[0]["question"]
    good = answer(task.world, question)
    counts: list[int] = []
    world_reward = _load("trl_grpo_reference").reward(task, {6}, 1.0, counts)
    scores = world_reward([""] * 2, [good, good], [[1, 6], [1, 2, 3]], [question, question])
    assert scores == [1.0, 0.0]  # exact; exact but never ended (missing-EOS penalty 1)
    assert counts == [5]
