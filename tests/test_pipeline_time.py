"""benchmarks/pipeline_time.py on a one-stage pipeline of two tiny steps (the timing itself is a
benchmark, never a test): the child's CPU seconds are counted and each stage gets its row."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
from conftest import REPO

PIPELINE = """
from flaxgpt import config as C
from flaxgpt.pipeline import Stage


def stages():
    return [Stage("pretrain", C.Config(
        name="tiny",
        model=C.ModelConfig(recipe="gpt2", n_layer=1, n_head=2, d_model=32, block_size=32),
        data=C.DataConfig(source="world", world_documents=100),
        train=C.TrainConfig(batch_size=4, max_steps=2, log_interval=1),
        eval=C.EvalConfig(interval=2, iters=1, sample_tokens=0),
        logging=C.LoggingConfig(progress="none", report=False),
    ), summary={"val_loss": "val_loss"})]
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pipeline_time", os.path.join(REPO, "benchmarks", "pipeline_time.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_row_with_wall_and_cpu_seconds(bench, tmp_path):
    experiment = tmp_path / "tiny_pipeline.py"
    experiment.write_text(PIPELINE)
    args = argparse.Namespace(experiment=str(experiment), workdir=str(tmp_path / "run"), overrides=[])
    wall, cpu = bench.run(args)
    assert cpu > 0.5 and wall > 0.5  # an interpreter that imported JAX and compiled a step
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    text = bench.table(summary, (wall, cpu), (1.0, 2.0), args)
    stage = summary["pretrain"]
    assert 0 < stage["cpu_seconds"] <= cpu
    assert f"| pretrain | {stage['wall_seconds']:.0f} | {stage['cpu_seconds']:.0f} | val_loss " in text
    assert f"| whole process | {wall:.0f} | {cpu:.0f} |" in text and "load average 1.0 at the start" in text


def test_a_used_workdir_is_refused(bench, tmp_path, monkeypatch):
    """A stage finished or resumed there would report only part of its time."""
    (tmp_path / "pretrain").mkdir()
    monkeypatch.setattr("sys.argv", ["pipeline_time.py", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not empty"):
        bench.main()
