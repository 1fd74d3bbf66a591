"""What a run shows on the console: the trainer's figures, the closing block, the report at the end."""

import contextlib
import importlib.util
import io
import json
import os

import pytest
from conftest import tiny_run_config
from test_ppo import ppo_config, write_policy_data

from flaxgpt import config as C
from flaxgpt.logging import MetricsLogger
from flaxgpt.pipeline import Stage, run_pipeline
from flaxgpt.trainers import ppo, pretrain, reward, sft


def test_bar_shows_the_logged_steps_figures_and_leaves_the_final_line(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), C.LoggingConfig(progress="bar", tensorboard=False), 2, 0, {})
    logger.shown = ("loss", "val_accuracy")
    logger.log(1, {"loss": 3.0})
    logger.log(2, {"loss": 2.5, "val_accuracy": 0.75, "other": 1.0})
    assert "loss=2.5" in str(logger._bar) and "val_accuracy=0.75" in str(logger._bar)
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "step 2/2 | loss 2.5 | val_accuracy 0.75"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[str, str, dict]:
    """A tiny SFT run from scratch on JSONL chats (report on): (workdir, its console output, result)."""
    base = tmp_path_factory.mktemp("console")
    write_policy_data(str(base))
    cfg = tiny_run_config(
        train={"trainer": "sft", "max_steps": 4, "log_interval": 2},
        data={"source": "jsonl", "path": str(base / "chats.jsonl"), "packing": "pad"},
        sft={"eval_examples": 4, "max_new_tokens": 4},
        eval={"interval": 4, "iters": 1, "sample_tokens": 0},
        logging={"progress": "none", "report": True},
    )
    workdir = str(base / "sft")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = sft.run(cfg, workdir)
    return workdir, out.getvalue(), result


def _done_line(out: str, step: int) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"done: step {step}"))


def test_sft_closes_with_its_figures_workdir_next_commands_and_report(sft_run):
    workdir, out, result = sft_run
    done = _done_line(out, 4)
    for key in ("loss", "val_loss", "val_exact_match", "val_bleu", "val_rougeL"):
        assert f"| {key} {result[key]:.4g}" in done
    block = out[out.index(done) :]
    assert f"workdir: {workdir}" in block
    assert f"python -m flaxgpt.chat --workdir {workdir}" in block and "python -m flaxgpt.serve" in block
    assert f"-e ppo_world --set train.init_from={workdir}" in block
    page = os.path.join(workdir, "report", "report.html")
    assert f"report:  {page}" in block and os.path.getsize(page) > 1000


def test_a_finished_run_started_again_says_so_and_where(sft_run, capsys):
    workdir, _, _ = sft_run
    cfg = C.from_dict(json.load(open(os.path.join(workdir, "config.json"))))
    cfg.logging.report = False
    sft.run(cfg, workdir)
    out = capsys.readouterr().out
    assert "finished earlier at step 4" in out and "resumed" not in out
    assert "finished earlier: step 4 | loss " in out and " | val_loss " in out  # its last training row too
    assert f"workdir: {workdir}" in out and "report:" not in out


@pytest.mark.slow
def test_ppo_closing_block_shows_reward_kl_and_response_length(sft_run, tmp_path, capsys):
    policy = sft_run[0]
    result = ppo.run(ppo_config(policy, "test_ppo:reward_letter_x", 2, epochs=1, eval_prompts=4), str(tmp_path))
    done = _done_line(capsys.readouterr().out, 2)
    for key in ("reward_total", "kl", "response_length", "val_eval_reward"):
        assert f"| {key} {result[key]:.4g}" in done


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
    done = _done_line(capsys.readouterr().out, 3)
    assert f"val_accuracy {result['val_accuracy']:.4g}" in done
    assert f"val_reward_margin {result['val_reward_margin']:.4g}" in done


def test_a_pipeline_ends_with_one_report_across_its_stages(tmp_path, capsys):
    def run_stage(cfg, stage_dir):  # a stand-in stage: two logged rows
        os.makedirs(stage_dir)
        rows = [{"step": s, "loss": 3.0 / s} for s in (1, 2)]
        with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return {"loss": 1.5}

    stages = [Stage("a", tiny_run_config()), Stage("b", tiny_run_config(logging={"report": True}), init_from="a")]
    run_pipeline(stages, str(tmp_path), run_stage)
    out = capsys.readouterr().out
    page = os.path.join(str(tmp_path), "report", "report.html")
    assert f"report:  {page}" in out and f"python -m flaxgpt.chat --workdir {tmp_path / 'b'}" in out
    html = open(page).read()
    assert 'id="a_"' in html and 'id="b_"' in html  # one page, a section per stage


def test_pretraining_suggests_sampling_its_own_prompt_and_the_sft_stage(tmp_path, capsys):
    cfg = tiny_run_config(train={"max_steps": 2, "log_interval": 2}, eval={"interval": 2, "sample_tokens": 0})
    pretrain.run(cfg, str(tmp_path))
    out = capsys.readouterr().out
    assert f"python -m flaxgpt.sample --workdir {tmp_path} --prompt Question:" in out
    assert f"-e sft_world --set train.init_from={tmp_path}  # next stage: SFT" in out


def test_print_config_shows_the_model_as_the_run_writes_it(tmp_path, capsys):
    """Recipe-derived fields resolved (config.json's values), a pipeline's stages from the stage they
    start from, and a fine-tuning run's structure from its source run's config.json."""
    from flaxgpt.data.tokenizers import CharTokenizer
    from flaxgpt.train import main

    assert main(["-e", "world", "--print-config"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    expected = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 384, "head_dim": 32}
    assert {k: model[k] for k in expected} == expected and model["tie_embeddings"] is False
    assert main(["-e", "chat_demo", "--print-config", "--set", "pretrain.model.recipe=gpt2"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert [stages[s]["model"]["position"] for s in stages] == ["learned"] * 4  # the recipe travels down
    assert stages["rm"]["model"]["output"] == "scalar" and stages["sft"]["model"]["d_ff"] == 512
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(
        C.to_json(C.Config(model=C.ModelConfig(recipe="gpt2", vocab_size=72, valid_vocab=10)))
    )
    CharTokenizer("abc").save(str(source))
    assert main(["-e", "sft_world", "--print-config", "--set", f"train.init_from={source}"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["recipe"], model["vocab_size"], model["mlp"], model["tie_embeddings"]) == ("gpt2", 72, "gelu", True)
    assert main(["-e", "sft_world", "--print-config", "--set", f"train.init_from={tmp_path / 'none'}"]) == 0
    assert (
        capsys.readouterr().err
        == f"note: {tmp_path / 'none'} is not there yet: the model printed is the experiment's own\n"
    )


def test_every_cli_parser_shows_its_defaults_and_errs_in_one_line(capsys):
    """The CLIs that test_faults_cli does not cover: defaults in --help (also of a flag without help
    text), a bad flag in one line; and no CLI builds a plain argparse parser."""
    from flaxgpt import compile, feedback, report
    from flaxgpt.data import prepare

    cases = [(lambda a: prepare.parser().parse_args(a), "(default: 4096)"), (report.main, None), (compile.main, None)]
    if importlib.util.find_spec("fastapi"):  # the serve extra
        from flaxgpt.serve.__main__ import parse_args

        cases.append((parse_args, "0: any free port (default: 8000)"))
    for main, default in [*cases, (lambda a: feedback.main(["export", *a]), None)]:
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        out = capsys.readouterr().out
        assert exited.value.code == 0 and (default is None or default in out), out
        with pytest.raises(SystemExit) as exited:
            main(["--no-such-flag"])
        err = capsys.readouterr().err.splitlines()
        assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--help)" in err[0]
    sources = [os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(report.__file__)) for f in fs]
    plain = [f for f in sources if f.endswith(".py") and "argparse.ArgumentParser(" in open(f).read()]
    assert plain == [], "use flaxgpt.cli.ArgumentParser"


def test_the_suite_prints_a_line_per_test_file_as_its_last_test_finishes():
    from types import SimpleNamespace

    from conftest import FileProgress

    written = []
    reporter = SimpleNamespace(
        _tw=SimpleNamespace(width_of_current_line=5),
        write=written.append,
        write_line=lambda t: written.append(t + "\n"),
    )
    progress = FileProgress(SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=lambda name: reporter)))
    progress.pytest_xdist_node_collection_finished(None, ["tests/a.py::x", "tests/a.py::y", "tests/b.py::z"])

    def run(nodeid, *phases):  # (duration, outcome) of setup, call, teardown
        for duration, outcome in phases:
            progress.pytest_runtest_logreport(
                SimpleNamespace(nodeid=nodeid, duration=duration, failed=outcome == "f", skipped=outcome == "s")
            )
        progress.pytest_runtest_logfinish(nodeid)

    run("tests/a.py::x", (1.0, "p"), (10.0, "f"), (0.2, "p"))
    run("tests/b.py::z", (0.5, "s"), (0.0, "p"))
    assert written == ["\n", "tests/b.py: 1 skipped (0 s)\n"]
    run("tests/a.py::y", (1.0, "p"), (2.4, "p"), (0.0, "p"))
    assert written[2:] == ["\n", "tests/a.py: 1 failed, 1 passed (15 s)\n"]
