"""Pipelines (the chat demo): stage overrides, and a tiny pretrain -> SFT -> RM run end to end."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import REPO, run_cli, tiny_run_config

from flaxgpt.config import ConfigError
from flaxgpt.pipeline import Stage, run_pipeline, validate
from flaxgpt.train import load_experiment

NOTEBOOK = os.path.join(REPO, "launch", "colab", "flaxgpt_demo.ipynb")


def test_stage_overrides_and_their_errors():
    stages = load_experiment("chat_demo", ["sft.train.max_steps=7", "train.seed=3"])
    assert [s.name for s in stages] == ["pretrain", "sft", "rm", "rl"]
    assert stages[1].config.train.max_steps == 7 and stages[0].config.train.max_steps != 7
    assert {s.config.train.seed for s in stages} == {3}
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        load_experiment("chat_demo", ["sfft.train.max_steps=1"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_experiment("chat_demo", ["sft.train.max_stepz=1"])


def test_print_config_of_a_pipeline():
    out = run_cli("-e", "chat_demo", "--print-config", "--set", "rm.reward.margin=0.5")
    assert out.returncode == 0, out.stderr
    described = json.loads(out.stdout)
    assert described["rm"]["init_from"] == "sft" and described["rm"]["reward"]["margin"] == 0.5
    assert described["sft"]["train"]["trainer"] == "sft" and described["rl"]["reward_from"] == "rm"
    assert described["rl"]["train"]["trainer"] == "grpo" and described["rl"]["grpo"]["advantage"] == "rloo"
    assert described["rl"]["ppo"]["reward_function"] == ""  # the reward model, not the labeler


def test_summary_has_each_stages_wall_and_cpu_seconds(tmp_path):
    """A stage that computes spends CPU seconds; one that waits spends wall time only."""

    def run_stage(cfg, stage_dir):
        os.makedirs(stage_dir)
        if stage_dir.endswith("busy"):
            deadline = time.process_time() + 0.4
            while time.process_time() < deadline:
                sum(range(1000))
        else:
            time.sleep(0.4)
        return {"loss": 1.0}

    stages = [Stage("busy", tiny_run_config()), Stage("idle", tiny_run_config(), init_from="busy")]
    summary = run_pipeline(stages, str(tmp_path), run_stage)
    assert summary["busy"]["cpu_seconds"] >= 0.4 and summary["busy"]["wall_seconds"] >= 0.4
    assert summary["idle"]["cpu_seconds"] < 0.2 <= summary["idle"]["wall_seconds"]
    assert json.load(open(tmp_path / "idle" / "result.json"))["cpu_seconds"] == summary["idle"]["cpu_seconds"]


@pytest.mark.slow
def test_colab_notebook_runs_the_tiny_chat_demo_top_to_bottom(tmp_path):
    """The Colab notebook, executed on the CPU with its shortened settings: pretrain -> SFT -> RM ->
    PPO with two rounds of iterated RLHF and PPO-ptx, in miniature; then sampling and chat."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workdir = str(tmp_path / "demo")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = f"FAST = True\nINSTALL = False\nREPO = ''\nWORKDIR = {workdir!r}\n"
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
    out = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "cpu" in out.lower()  # the devices cell
    assert "user: What is 2 plus 5?\nassistant: " in out  # the chat cell

    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"pretrain", "sft", "rm", "ppo"}
    sft_result = json.load(open(os.path.join(workdir, "sft", "result.json")))
    assert summary["sft"]["task_accuracy"] == sft_result["val_task_accuracy"] and summary["sft"]["val_loss"] > 0
    assert summary["rm"]["val_accuracy"] > 0.5  # held-out comparisons, better than chance
    for key in ("reward_start", "reward_end", "kl_end", "task_accuracy", "sft_task_accuracy"):
        assert key in summary["ppo"]
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert os.path.exists(os.path.join(workdir, stage, "result.json"))
    assert os.path.exists(os.path.join(workdir, "rm", "comparisons.jsonl"))
    assert "round 1:" in out and "reward model retrained" in out  # iterated RLHF happened
    rows = [json.loads(line) for line in open(os.path.join(workdir, "ppo", "metrics.jsonl"))]
    assert rows[-1]["round"] == 1 and "ptx_loss" in rows[-1]  # PPO-ptx mixed in
    # the full-size demo on the same workdir: the finished stages' configs changed, so pretrain runs again,
    # and its checkpoint (the miniature model) is refused in one line
    again = run_cli("-e", "chat_demo_ppo", "--workdir", workdir)
    assert again.returncode == 2 and "=== stage pretrain: its config changed since it finished" in again.stdout
    assert "does not fit this model" in again.stderr and "Traceback" not in again.stderr, again.stderr


class _Stages:
    """A stub `run_stage` that records which stages ran, sleeping `nap` seconds and reporting
    the step it was asked for (plus what `extra` names for a stage)."""

    def __init__(self, nap: float = 0.0, extra: dict | None = None):
        self.ran: list[str] = []
        self.nap, self.extra = nap, extra or {}

    def __call__(self, cfg, stage_dir):
        os.makedirs(stage_dir, exist_ok=True)
        name = os.path.basename(stage_dir)
        self.ran.append(name)
        time.sleep(self.nap)
        if isinstance(self.extra.get(name), BaseException):
            raise self.extra.pop(name)
        return {"step": cfg.train.max_steps, "loss": 1.0, **self.extra.get(name, {})}


def _two(steps: int = 2) -> list[Stage]:
    first = tiny_run_config(train={"max_steps": steps})
    return [Stage("a", first, summary={"loss": "loss"}), Stage("b", tiny_run_config(), init_from="a")]


def test_a_finished_stage_runs_again_when_its_config_changed_and_later_stages_start_afresh(tmp_path, capsys):
    workdir = str(tmp_path)
    run_pipeline(_two(), workdir, stub := _Stages())
    run_pipeline(_two(), workdir, stub)
    assert stub.ran == ["a", "b"]  # the second call: both finished with the same config
    capsys.readouterr()
    summary = run_pipeline(_two(5), workdir, stub)
    assert stub.ran == ["a", "b", "a", "b"]
    assert "train.max_steps 2 -> 5" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "b.old-1") and summary["a"]["loss"] == 1.0
    assert json.load(open(tmp_path / "a" / "result.json"))["config"]["train"]["max_steps"] == 5


def test_a_later_stage_is_set_aside_by_its_sources_steps_across_calls_and_only_then(tmp_path):
    from flaxgpt.trainers.scaffold import STOPPED

    workdir = str(tmp_path)
    run_pipeline(_two(), workdir, _Stages())
    with pytest.raises(SystemExit):  # a trains on to 5, and a stop signal ends the call before b
        run_pipeline(_two(5), workdir, _Stages(extra={"a": {STOPPED: "SIGTERM"}}))
    again = _Stages()
    run_pipeline(_two(5), workdir, again)  # b was trained from a's step 2: it starts afresh
    assert again.ran == ["b"] and os.path.isdir(tmp_path / "b.old-1")
    os.remove(tmp_path / "a" / "result.json")  # a reruns and reports the same step: b stands
    last = _Stages()
    run_pipeline(_two(5), workdir, last)
    assert last.ran == ["a"] and not os.path.isdir(tmp_path / "b.old-2")
    assert json.load(open(tmp_path / "b" / "result.json"))["sources"] == {"a": 5}


def test_a_stop_signal_in_a_stages_last_step_records_it_and_stops_the_pipeline(tmp_path, capsys):
    from flaxgpt.trainers.scaffold import STOPPED

    stub = _Stages(extra={"a": {STOPPED: "SIGTERM"}})
    with pytest.raises(SystemExit) as stop:
        run_pipeline(_two(), str(tmp_path), stub)
    assert stop.value.code == 143 and stub.ran == ["a"]
    assert capsys.readouterr().err == "stopped: SIGTERM in stage a, which finished; run the same command to go on\n"
    result = json.load(open(tmp_path / "a" / "result.json"))
    assert result["loss"] == 1.0 and STOPPED not in result
    assert run_pipeline(_two(), str(tmp_path), _Stages())["b"]  # the same command goes on with b


def test_a_missing_summary_figure_is_a_note_and_a_damaged_result_one_line(tmp_path, capsys):
    from flaxgpt.errors import UserError

    stages = _two()
    stages[0].summary = {"loss": "loss", "accuracy": "val_accuracy"}
    summary = run_pipeline(stages, str(tmp_path), _Stages())
    assert summary["a"]["loss"] == 1.0 and "accuracy" not in summary["a"]
    assert "stage 'a' reported no val_accuracy" in capsys.readouterr().out
    (tmp_path / "a" / "result.json").write_text("{")
    with pytest.raises(UserError, match=r"a/result.json: not valid JSON .*remove it to run that stage again"):
        run_pipeline(stages, str(tmp_path), _Stages())


def test_held_out_rl_figures_without_eval_prompts_are_refused_before_training():
    with pytest.raises(ConfigError, match="stage 'rl': ppo.eval_prompts=0 .* start_eval_reward"):
        validate(load_experiment("chat_demo", ["rl.ppo.eval_prompts=0"]))


def test_a_stages_time_sums_its_attempts(tmp_path):
    stub = _Stages(nap=0.3, extra={"a": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_two(), str(tmp_path), stub)
    summary = run_pipeline(_two(), str(tmp_path), stub)
    assert summary["a"]["wall_seconds"] >= 0.6 > summary["b"]["wall_seconds"] >= 0.3
