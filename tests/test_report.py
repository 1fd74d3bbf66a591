"""flaxgpt.report on hand-written run and pipeline directories (no training): the PNGs, the page,
--compare, and the one-line errors."""

import json
import os
import re

import pytest

pytest.importorskip("matplotlib", reason="flaxgpt.report draws with matplotlib")
from matplotlib import image  # noqa: E402

from flaxgpt import cli, report  # noqa: E402

LM_GROUPS = ("loss", "evaluation", "optimisation", "throughput")


def _lm_rows(steps: int = 20, lr: float = 1e-3, with_time: bool = False) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 3.0 / step**0.5, "lr": lr * min(step / 5, 1), "grad_norm": 1.0 + 0.1 * step}
        row.update(tokens_per_sec=3200.0, mfu=0.01 + step / 1e4)
        if step % 10 == 0:
            row.update(val_loss=3.1 / step**0.5, val_ppl=20.0 / step, val_task_accuracy=step / steps)
        if with_time:
            row["time"] = 1_700_000_000.0 + 2.0 * step
        rows.append(row)
    rows[4]["loss"] = "nan"  # how the logger writes a non-finite figure
    return rows


def _rl_rows() -> list[dict]:
    rows = [{"step": 0, "val_eval_reward": 0.1, "val_task_accuracy": 0.2, "val_task_accuracy_greedy": 0.3}]
    for step in range(1, 7):
        rows.append(
            {
                "step": step,
                "reward_mean": 0.1 * step,
                "kl": 0.01 * step,
                "entropy": 2.0 - 0.1 * step,
                "clip_fraction": 0.05,
                "policy_loss": -0.1,
                "rollout_seconds": 1.5,
                "update_seconds": 0.5,
            }
        )
    rows[-1].update(val_eval_reward=0.6, val_task_accuracy=0.5, val_task_accuracy_greedy=0.55)
    return rows


def _run(path, rows, config=None, result=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    config = config or {
        "name": "tiny",
        "model": {"block_size": 8},
        "train": {"batch_size": 4, "seed": 0},
        "eval": {"sample_prompt": "Question:"},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if result is not None:
        with open(os.path.join(path, "result.json"), "w") as f:
            json.dump(result, f)
    return str(path)


@pytest.fixture
def pipeline(tmp_path):
    root = tmp_path / "demo"
    _run(root / "pretrain", _lm_rows(), result={"val_loss": 0.7, "sample": " where is the owl?"})
    _run(root / "ppo", _rl_rows(), result={"reward_end": 0.6})
    summary = {"pretrain": {"val_loss": 0.7, "wall_seconds": 12.0}, "ppo": {"reward_end": 0.6, "kl_end": 0.06}}
    (root / "summary.json").write_text(json.dumps(summary))
    return str(root)


def _page_and_pngs(out_dir) -> tuple[str, set[str]]:
    page = open(os.path.join(out_dir, "report.html"), encoding="utf-8").read()
    pngs = {f for f in os.listdir(out_dir) if f.endswith(".png")}
    assert set(re.findall(r'<img src="([^"]+)"', page)) == pngs  # every plot on the page, nothing missing
    assert "http://" not in page and "https://" not in page  # opens offline
    for name in pngs:
        assert os.path.getsize(os.path.join(out_dir, name)) > 10_000
        pixels = image.imread(os.path.join(out_dir, name))
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0.05  # drawn on, not a blank canvas
    return page, pngs


def test_run_report_plots_every_series_against_step_and_time(tmp_path):
    run = _run(tmp_path / "run", _lm_rows(), result={"sample": "The owl <sees> & flies"})
    written = report.write(run)
    out = os.path.join(run, "report")
    page, pngs = _page_and_pngs(out)
    assert pngs == {f"{g}_{axis}.png" for g in LM_GROUPS for axis in ("step", "time")}
    drawn = {label for labels in written.plots.values() for label in labels}
    assert drawn == {"loss", "val_loss", "val_ppl", "val_task_accuracy", "lr", "grad_norm", "tokens_per_sec", "mfu"}
    assert written.plots["loss_step.png"] == ["loss", "val_loss", "val_ppl"]
    assert "The owl &lt;sees&gt; &amp; flies" in page  # the sample, escaped
    assert "&quot;batch_size&quot;: 4" in page  # the config
    assert "<td>val_task_accuracy</td><td>1</td>" in page  # a final figure


def test_time_axis_is_the_logged_time_or_rebuilt_from_throughput(tmp_path):
    timed = report.load_run(_run(tmp_path / "timed", _lm_rows(with_time=True)))
    assert report.elapsed(timed) == ([2.0 * i for i in range(20)], "wall time (s)")
    # 4 rows x 8 tokens per step at 3200 tokens/s: 0.01 s a step
    untimed = report.load_run(_run(tmp_path / "untimed", _lm_rows()))
    times, label = report.elapsed(untimed)
    assert times == pytest.approx([0.01 * s for s in range(1, 21)]) and "throughput" in label
    rl = report.load_run(_run(tmp_path / "rl", _rl_rows()))
    assert report.elapsed(rl)[0] == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
    bare = report.load_run(_run(tmp_path / "bare", [{"step": 5, "loss": 1.0}]))
    assert report.elapsed(bare) is None


def test_pipeline_gets_one_page_across_its_stages(pipeline):
    written = report.write(pipeline)
    page, pngs = _page_and_pngs(os.path.join(pipeline, "report"))
    assert {f"pretrain_{g}_step.png" for g in LM_GROUPS} <= pngs
    assert {"ppo_rl_step.png", "ppo_rl_time.png", "ppo_evaluation_step.png", "ppo_loss_step.png"} <= pngs
    rl = set(written.plots["ppo_rl_step.png"])
    assert {"reward_mean", "kl", "entropy", "clip_fraction", "val_eval_reward"} <= rl
    accuracy = set(written.plots["ppo_evaluation_step.png"])
    assert accuracy == {"val_task_accuracy", "val_task_accuracy_greedy"}
    assert "<td>ppo</td><td>kl_end</td><td>0.06</td>" in page  # summary.json
    assert page.index('id="pretrain_"') < page.index('id="ppo_"')
    assert "Question: where is the owl?" in page and '<a href="#ppo_">ppo</a>' in page


def test_cli_compare_overlays_runs_and_lists_config_differences(tmp_path, capsys):
    a = _run(tmp_path / "a", _lm_rows(lr=1e-3))
    b = _run(tmp_path / "b", _lm_rows(lr=3e-3), {"name": "tiny", "model": {"block_size": 8}, "train": {"seed": 1}})
    out = str(tmp_path / "out")
    assert report.main([a, "--compare", b, "--out", out]) == 0
    assert "report.html" in capsys.readouterr().out
    page, pngs = _page_and_pngs(out)
    assert pngs == {f"{g}_{axis}.png" for g in LM_GROUPS for axis in ("step", "time")}
    assert "<td>train.seed</td><td>0</td><td>1</td>" in page and "<th>b</th>" in page


def test_compare_pipelines_stage_by_stage(pipeline, tmp_path):
    other = str(tmp_path / "other")
    _run(os.path.join(other, "pretrain"), _lm_rows(lr=3e-3))
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"pretrain": {"val_loss": 0.8}}))
    written = report.write(pipeline, str(tmp_path / "out"), [other])
    assert {"demo: loss", "other: loss"} <= set(written.plots["pretrain_loss_step.png"])  # overlaid
    assert {"demo: lr", "other: lr"} <= set(written.plots["pretrain_optimisation_time.png"])
    assert all(not label.startswith("other") for label in written.plots["ppo_rl_step.png"])
    _page_and_pngs(str(tmp_path / "out"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d, r"^error: .*: not a flaxgpt run or pipeline directory"),
        (lambda d: _run(d / "run", []), r"^error: .*metrics.jsonl: no metrics rows to plot"),
        (lambda d: str(d / "missing"), r"^error: .*missing: no such directory"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, make, message):
    assert cli.run(report.main, [str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert re.match(message, err) and err.count("\n") == 1


def test_comparing_a_pipeline_with_a_run_is_an_error(pipeline, tmp_path, capsys):
    run = _run(tmp_path / "run", _lm_rows())
    assert cli.run(report.main, [pipeline, "--compare", run]) == 2
    assert "not a pipeline directory" in capsys.readouterr().err


def test_the_logger_s_tensorboard_events_load_in_tensorboard(tmp_path):
    """What `pip install 'flaxgpt[tensorboard]'` reads: every figure the logger writes, at its step,
    including after a resume that drops the steps past the checkpoint (purge_step)."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra is not installed"
    )
    from flaxgpt.config import LoggingConfig
    from flaxgpt.logging import MetricsLogger

    for start, steps in ((0, (1, 2, 3)), (2, (3, 4))):  # the second run resumes from step 2
        logger = MetricsLogger(str(tmp_path), LoggingConfig(progress="none", tensorboard=True), 4, start, {})
        for step in steps:
            logger.log(step, {"loss": 10.0 - step - start, "val_accuracy": 0.1 * step, "note": "text"})
        logger.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "val_accuracy"]
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 9.0), (2, 8.0), (3, 5.0), (4, 4.0)]


def test_figures_at_the_edge_of_float_range_are_drawn_as_gaps(tmp_path):
    rows = _lm_rows(steps=6)
    rows[1]["loss"], rows[2]["loss"] = 1e308, -1e308  # an axis spanning both overflows in matplotlib
    written = report.write(_run(tmp_path / "run", rows))
    assert "loss" in written.plots["loss_step.png"]
