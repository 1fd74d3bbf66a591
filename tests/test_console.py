"""What a run shows on the console: the trainer's figures, the closing block, the report at the end."""

import json
import os

from conftest import tiny_run_config

from flaxgpt import config as C
from flaxgpt.logging import MetricsLogger
from flaxgpt.trainers import pretrain, reward


def test_bar_shows_the_logged_steps_figures_and_leaves_the_final_line(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), C.LoggingConfig(progress="bar", tensorboard=False), 2, 0, {})
    logger.shown = ("loss", "val_accuracy")
    logger.log(1, {"loss": 3.0})
    logger.log(2, {"loss": 2.5, "val_accuracy": 0.75, "other": 1.0})
    assert "loss=2.5" in str(logger._bar) and "val_accuracy=0.75" in str(logger._bar)
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "step 2/2 | loss 2.5 | val_accuracy 0.75"


def test_pretrain_closes_with_figures_report_and_says_finished_when_rerun(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    cfg = tiny_run_config(train={"max_steps": 4, "log_interval": 2}, eval={"interval": 4, "sample_tokens": 0})
    cfg.logging.report = True
    pretrain.run(cfg, workdir)
    out = capsys.readouterr().out
    block = out[out.index("done: step 4") :]
    assert "| loss " in block.splitlines()[0] and "| val_loss " in block.splitlines()[0]
    assert f"workdir: {workdir}" in block and "python -m flaxgpt.sample --workdir " + workdir in block
    assert "-e sft_world --set train.init_from=" + workdir in block
    page = os.path.join(workdir, "report", "report.html")
    assert f"report:  {page}" in block and os.path.getsize(page) > 1000

    cfg.logging.report = False
    pretrain.run(cfg, workdir)
    out = capsys.readouterr().out
    assert "finished earlier at step 4" in out and "finished earlier: step 4 | val_loss " in out
    assert f"workdir: {workdir}" in out and "report:" not in out


def test_reward_model_closing_block_shows_pairwise_accuracy_and_margin(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "aeiou", "rejected": "bcdfg"} for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run_config(
        train={"trainer": "reward", "max_steps": 3, "batch_size": 8, "log_interval": 3},
        data={"source": "jsonl", "path": str(path), "val_path": str(path)},
        eval={"interval": 3, "iters": 1, "sample_tokens": 0},
    )
    workdir = str(tmp_path / "rm")
    result = reward.run(cfg, workdir)
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done: step 3"))
    assert f"val_accuracy {result['val_accuracy']:.4g}" in done
    assert f"val_reward_margin {result['val_reward_margin']:.4g}" in done
