"""Adapter-only LoRA checkpoints: a LoRA run from another run saves its adapters, their optimizer
state and a record of the base, never the frozen base; every reader (runs.load, export, a resume)
gets the same model as from a whole checkpoint, and a base that changed or went missing is one
line naming it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from flaxgpt import fileio, lora, runs
from flaxgpt.checkpoint import CheckpointMismatch
from flaxgpt.convert import export_hf
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.trainers import pretrain
from flaxgpt.trainers.scaffold import Interrupted
from tests.conftest import REPO, tiny_run_config

TIMING = ("tokens_per_sec", "mfu")


def base_config(seed: int = 0):
    return tiny_run_config(
        train={"max_steps": 4, "seed": seed},
        eval={"interval": 4, "iters": 1, "sample_tokens": 0},
        checkpoint={"every_steps": 4, "async_save": False},
    )


def lora_config(base: str, max_steps: int = 6, **checkpoint):
    return tiny_run_config(
        model={"lora_rank": 4, "lora_targets": ("query", "value", "up")},
        train={"init_from": base, "max_steps": max_steps},
        eval={"interval": 3, "iters": 1, "sample_tokens": 0},
        checkpoint={"every_steps": 2, "async_save": False, **checkpoint},
    )


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("base"))
    pretrain.run(base_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def lora_runs(base_run, tmp_path_factory) -> dict[str, str]:
    """The same LoRA run saved adapter-only (the default) and whole (checkpoint.adapters_only=false)."""
    root = tmp_path_factory.mktemp("lora")
    out = {"adapters": str(root / "adapters"), "whole": str(root / "whole")}
    pretrain.run(lora_config(base_run), out["adapters"])
    pretrain.run(lora_config(base_run, adapters_only=False), out["whole"])
    return out


def stored(step_dir: str) -> list[str]:
    """The paths of the arrays a checkpoint's state stores (from orbax's metadata; an optimizer
    state's frozen entries are stored as empty nodes)."""
    tree = json.load(open(os.path.join(step_dir, "state", "_METADATA")))["tree_metadata"]
    return [k for k, v in tree.items() if v["value_metadata"]["value_type"] != "None"]


def stored_base(step_dir: str) -> list[str]:
    """The base parameters (and Adam moments of them) a checkpoint stores."""
    return [k for k in stored(step_dir) if "lora_" not in k and ("'params'" in k or "'mu'" in k or "'nu'" in k)]


def record(workdir: str, step: int) -> dict:
    return json.load(open(os.path.join(workdir, "checkpoints", str(step), "record", "metadata")))


def test_adapter_only_checkpoint_holds_no_base_and_reads_as_the_whole_one(base_run, lora_runs, tmp_path):
    adapters, whole = lora_runs["adapters"], lora_runs["whole"]
    step_dir = lambda w: os.path.join(w, "checkpoints", "6")
    assert any("lora_a" in p for p in stored(step_dir(adapters)))
    assert stored_base(step_dir(adapters)) == []  # no embedding, kernel, norm or bias
    assert "('params', 'layers_0', 'attn', 'query', 'kernel')" in stored_base(step_dir(whole))
    ours, theirs = runs.load(adapters), runs.load(whole)
    # what the whole checkpoint has more is the frozen base (float32; orbax's files cost the same)
    frozen_bytes = 4 * (sum(x.size for x in jax.tree.leaves(theirs.params)) - lora.count_trained(theirs.params))
    size = lambda w: fileio.tree_size(step_dir(w))
    assert size(whole) - size(adapters) > frozen_bytes / 2, (size(adapters), size(whole), frozen_bytes)
    base = record(adapters, 6)[lora.BASE_RECORD]
    assert (base["init_from"], base["step"]) == (os.path.abspath(base_run), 4)
    assert lora.BASE_RECORD not in record(whole, 6)
    assert ours.step == theirs.step == 6
    jax.tree.map(np.testing.assert_array_equal, ours.params, theirs.params)
    assert np.asarray(ours.params["layers_0"]["attn"]["query"]["lora_b"]).any()
    # the merged Hugging Face export of the adapter-only run is the whole run's, tensor for tensor
    export_hf(adapters, str(tmp_path / "a"))
    export_hf(whole, str(tmp_path / "w"))
    a, w = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "w" / "model.safetensors"))
    assert a.keys() == w.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], w[name], err_msg=name)


def test_interrupted_adapter_only_run_resumes_as_if_never_stopped(base_run, lora_runs, tmp_path, monkeypatch):
    stopped = str(tmp_path / "stopped")
    original = MetricsLogger.log

    def log_then_signal(self, at, metrics):
        original(self, at, metrics)
        if at == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(MetricsLogger, "log", log_then_signal)
        with pytest.raises(Interrupted, match="SIGINT at step 3: checkpoint saved at step 3"):
            pretrain.run(lora_config(base_run), stopped)
    assert stored_base(os.path.join(stopped, "checkpoints", "3")) == []
    pretrain.run(lora_config(base_run), stopped)
    rows = lambda w: [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(w)]
    assert rows(stopped) == rows(lora_runs["adapters"])
    jax.tree.map(np.testing.assert_array_equal, runs.load(stopped).params, runs.load(lora_runs["adapters"]).params)


def test_a_base_that_changed_or_went_missing_is_one_line_exit_2(base_run, lora_runs, tmp_path):
    source, run = str(tmp_path / "source"), str(tmp_path / "run")
    shutil.copytree(base_run, source)
    pretrain.run(lora_config(source, max_steps=2), run)
    shutil.rmtree(source)
    shutil.copytree(lora_runs["whole"], source)  # another model at the same path, with a step 4
    with pytest.raises(CheckpointMismatch, match=f"trained on the run {source} step 4 .* changed since"):
        runs.load(run)
    with pytest.raises(CheckpointMismatch, match="changed since"):  # and a resume refuses it too
        pretrain.run(lora_config(source, max_steps=4), run)
    shutil.rmtree(os.path.join(source, "checkpoints", "4"))
    sample = [sys.executable, "-m", "flaxgpt.sample", "--workdir", run, "--prompt", "Q", "--max-new-tokens", "2"]
    done = subprocess.run(sample, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: checkpoint {run}/checkpoints step 2 holds LoRA adapters only, and its base, the run {source} "
        f"step 4, cannot be read ({source} has no checkpoint at step 4; it has [2, 6]): put that base back "
        "there (or train with checkpoint.adapters_only=false for checkpoints that stand alone)"
    ]
