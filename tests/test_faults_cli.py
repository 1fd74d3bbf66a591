"""Issue 20's user errors at the command line: each exits 2 with ONE line `error: ...` on stderr
and no traceback. Run in-process through `cli.run(main, argv)` (what `__main__` runs); three
subprocess runs prove the `__main__` wrappers themselves. Config checks build no model."""

from __future__ import annotations

import errno
import os
import runpy
import subprocess
import sys

import pytest

from flaxgpt import chat, cli, convert, sample, score, tokenize, train
from flaxgpt.data import tfds_source
from flaxgpt.errors import UserError
from tests.conftest import REPO, run_cli


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1.0: expected a finite number > 0"),
        ("optimizer.lr=nan", "optimizer.lr=nan: expected a finite number > 0"),
        ("optimizer.lr=NaN", "optimizer.lr=nan: expected a finite number > 0"),
        ("optimizer.b2=inf", "optimizer.b2=inf: expected a number in [0, 1)"),
        ("model.dropout=2", "model.dropout=2.0: expected a number in [0, 1)"),
        ("model.n_layer=-1", "model.n_layer=-1: expected an integer in [1, 2147483647]"),
        ("model.block_size=0", "model.block_size=0: expected an integer in [1, "),
        ("model.d_model=0", "model.d_model=0: expected an integer in [1, "),
        ("model.n_head=0", "model.n_head=0: expected an integer in [1, "),
        ("train.seed=-1", "train.seed=-1: expected an integer in [0, 2147483647]"),
        ("train.max_steps=1e30", "train.max_steps=1e+30: expected an integer in [1, 2147483647]"),
        ("train.max_steps=Infinity", "train.max_steps must be an integer, got inf"),
        ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
        ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep=0: expected an integer in [1, "),
        ("mesh.fsdp=0", "mesh.fsdp=0: expected -1 or an integer in [1, "),
        ("optimizer.decay_steps=0", "optimizer.decay_steps=0: expected an integer in [1, "),
        # cross-field checks that otherwise fail late
        ("model.d_model=130", "model.d_model=130 is not divisible by model.n_head=4"),
        ("model.n_kv_heads=3", "model.n_head=4 must be a multiple of model.n_kv_heads=3"),
        ("mesh.fsdp=-1", "at most one of mesh.data=-1, mesh.fsdp=-1, mesh.tensor=1 may be -1"),
        ("model.vocab_size=50 model.valid_vocab=100", "model.valid_vocab=100 exceeds model.vocab_size=50"),
        ("data.min_chars=10 data.max_chars=5", "data.max_chars=5 is below data.min_chars=10"),
        (
            "train.trainer=sft model.block_size=32 sft.max_new_tokens=32",
            "sft.max_new_tokens=32 leaves no room for a prompt in model.block_size=32",
        ),
    ],
)
def test_bad_config_values_are_one_line_before_any_work(override, message, capsys):
    args = ["--experiment", "world", "--print-config", "--set", *override.split()]
    assert cli.run(train.main, args) == 2
    assert _one_error_line(capsys).startswith(f"error: {message}")


# ----------------------------------------------------------------------------- the one error path


def _raises(error: BaseException):
    def main(argv=None):
        raise error

    return main


@pytest.mark.parametrize(
    "error, line",
    [
        (UserError("data.txt:3: bad\n  expected a string"), "error: data.txt:3: bad expected a string"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.jsonl"), "error: x.jsonl: No such file"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/"), "error: runs/: Is a directory"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "error: /root/x: Permission denied"),
        (FileNotFoundError("run/ has no config.json"), "error: run/ has no config.json"),
        (OSError(errno.ENOSPC, "No space left on device", "ckpt/7"), "error: ckpt/7: No space left on device"),
    ],
)
def test_user_errors_and_file_errors_are_one_line_exit_2(error, line, capsys, monkeypatch):
    monkeypatch.delenv("FLAXGPT_DEBUG", raising=False)
    assert cli.run(_raises(error), []) == 2
    assert _one_error_line(capsys).startswith(line)


def test_ctrl_c_is_one_line_exit_130_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("FLAXGPT_DEBUG", raising=False)
    assert cli.run(_raises(KeyboardInterrupt()), []) == 130
    assert _one_error_line(capsys) == "error: interrupted (Ctrl-C)"
    monkeypatch.setenv("FLAXGPT_DEBUG", "1")
    assert cli.run(_raises(UserError("bad key")), []) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: bad key"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(_raises(ZeroDivisionError("bug")), [])
    with pytest.raises(ConnectionResetError):  # an OSError about no file is not the user's
        cli.run(_raises(ConnectionResetError(errno.ECONNRESET, "reset")), [])


# ----------------------------------------------------------------------------- flags and CLIs


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-new-tokens", "0", "argument --max-new-tokens: expected an integer in [1, 2147483647], got 0"),
        ("--temperature", "-1", "argument --temperature: expected a finite number >= 0, got -1"),
        ("--temperature", "nan", "argument --temperature: expected a finite number >= 0, got nan"),
        ("--top-p", "2", "argument --top-p: expected a number in (0, 1], got 2"),
        ("--top-p", "0", "argument --top-p: expected a number in (0, 1], got 0"),
        ("--num-beams", "0", "argument --num-beams: expected an integer in [1, 2147483647], got 0"),
        ("--top-k", "-3", "argument --top-k: expected an integer in [0, 2147483647], got -3"),
        ("--seed", "x", "argument --seed: expected an integer in [0, 2147483647], got 'x'"),
        ("--step", "-1", "argument --step: expected an integer in [0, 2147483647], got -1"),
    ],
)
def test_sample_flags_out_of_range_are_one_argparse_line(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        sample.main(["--workdir", "nowhere", "--prompt", "hi", flag, value])
    assert exited.value.code == 2
    assert _one_error_line(capsys) == f"error: {expected} (see python -m flaxgpt.sample --help)"


def test_every_cli_reports_a_missing_path_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = [
        (train.main, ["--experiment", missing + ".py"], "experiment file not found"),
        (sample.main, ["--workdir", missing, "--prompt", "x"], "has no config.json"),
        (chat.main, ["--workdir", missing, "--prompt", "x"], "has no config.json"),
        (score.main, ["--workdir", missing, "--prompt", "x", "--response", "y"], "has no config.json"),
        (convert.main, ["export", "--workdir", missing, "--hf", str(tmp_path / "out")], "has no config.json"),
        (tokenize.main, ["encode", "--model", missing, "hi"], f"{missing}: no such SentencePiece model file"),
        (tokenize.main, ["train", "--input", missing, "--vocab-size", "300", "--out", missing], missing),
        (tfds_source.main, ["build", "--train", missing, "--data-dir", str(tmp_path)], missing),
    ]
    for main, argv, fragment in cases:
        assert cli.run(main, argv) == 2, (main.__module__, argv)
        assert fragment in _one_error_line(capsys), main.__module__


def test_every_cli_shows_its_defaults_in_help(capsys):
    for main, argv, default in [
        (sample.main, ["--help"], "(default: 0.8)"),
        (chat.main, ["--help"], "(default: 128)"),
        (score.main, ["--help"], "(default: 16)"),
        (convert.main, ["export", "--help"], "(default: 5.0)"),
        (tokenize.main, ["train", "--help"], "(default: bpe)"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0 and default in capsys.readouterr().out, main.__module__


# ----------------------------------------------------------------------------- the __main__ wrappers


def test_main_wrappers_print_one_line_and_no_traceback(tmp_path):
    config = run_cli("--experiment", "world", "--set", "model.dropout=2", "--print-config")
    assert config.returncode == 2 and config.stderr == "error: model.dropout=2.0: expected a number in [0, 1)\n"
    # a reader that goes away (`... | head`) ends the command quietly, without BrokenPipeError
    listing = subprocess.Popen(
        [sys.executable, "-m", "flaxgpt.train", "--list-keys"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    listing.stdout.close()  # before the child writes its first line
    assert listing.wait(timeout=120) == 141 and listing.stderr.read() == b""
    sampled = subprocess.run(
        [sys.executable, "-m", "flaxgpt.sample", "--workdir", os.fspath(tmp_path), "--prompt", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        sampled.returncode == 2
        and sampled.stderr == f"error: {tmp_path} has no config.json: is it a flaxgpt workdir?\n"
    )


def test_an_experiment_file_with_a_syntax_error_is_named_with_its_line(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("from flaxgpt.config import Config\n\ndef config(:\n    return Config()\n")
    assert cli.run(train.main, ["--experiment", str(broken), "--print-config"]) == 2
    assert _one_error_line(capsys) == f"error: {broken}:3: invalid syntax"


# ----------------------------------------------------------------------------- a damaged run directory


def _run_dir(path, vocab_size: int = 40, valid_vocab: int = 0, chars: str = "abcdefghijklmnopqrstuvwxyz0123456") -> str:
    """A run's config.json and character tokenizer.json (len(chars) + 7 special ids), no checkpoint."""
    from flaxgpt.config import to_json
    from flaxgpt.data.tokenizers import CharTokenizer
    from tests.conftest import tiny_run_config

    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_run_config(model={"vocab_size": vocab_size, "valid_vocab": valid_vocab})
    (path / "config.json").write_text(to_json(cfg))
    CharTokenizer(list(chars)).save(str(path))
    return str(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"config.json": '{"name": '}, "config.json: not valid JSON"),
        ({"config.json": "[1]"}, "config.json: holds a JSON list, expected a JSON object"),
        ({"config.json": '{"model": {"n_layer": "abc"}}'}, "config.json: model.n_layer must be an integer"),
        ({"config.json": '{"model": {"n_layer": -3}}'}, "config.json: model.n_layer=-3: expected an integer"),
        ({"tokenizer.json": "[" * 100_000}, "tokenizer.json: not a flaxgpt character tokenizer (RecursionError"),
        ({"tokenizer.json": '{"type": "char", "chars": ["a"]}'}, "its tokenizer has 8 ids but config.json's model"),
        (
            {
                "tokenizer.json": '{"type": "char", "chars": '
                + str(list("abcdefghijklmnopqrstuvwxyz0123456789ABC")).replace("'", '"')
                + "}"
            },
            "its tokenizer has 46 ids",
        ),
    ],
)
def test_a_damaged_run_is_one_line_naming_the_file_in_sample_chat_and_init_from(tmp_path, damage, message, capsys):
    workdir = _run_dir(tmp_path / "run")
    for name, text in damage.items():
        (tmp_path / "run" / name).write_text(text)
    for main, argv in [
        (sample.main, ["--workdir", workdir, "--prompt", "x"]),
        (chat.main, ["--workdir", workdir, "--prompt", "x"]),
        (train.main, ["-e", "world", "--print-config", "--set", f"train.init_from={workdir}"]),
    ]:
        assert cli.run(main, argv) == 2, main.__module__
        line = _one_error_line(capsys)
        assert workdir in line and message in line, line


def test_a_tokenizer_of_a_padded_vocabulary_fits_and_a_reward_model_does_not_generate(tmp_path, capsys):
    from flaxgpt import runs

    padded = _run_dir(tmp_path / "padded", vocab_size=64, valid_vocab=40)  # 33 chars + 7 specials
    assert runs.read_run(padded)[1].vocab_size == 40
    garbage = tmp_path / "spm"
    garbage.mkdir()
    (garbage / "config.json").write_text((tmp_path / "padded" / "config.json").read_text())
    (garbage / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert cli.run(sample.main, ["--workdir", str(garbage), "--prompt", "x"]) == 2
    assert f"{garbage}/tokenizer.model: not a valid sentencepiece tokenizer" in _one_error_line(capsys)
    assert cli.run(tokenize.main, ["encode", "--model", str(garbage / "tokenizer.model"), "hi"]) == 2
    assert "tokenizer.model: not a valid sentencepiece tokenizer" in _one_error_line(capsys)

    import json

    from flaxgpt.config import from_dict, to_json

    reward = _run_dir(tmp_path / "rm")
    cfg = from_dict(json.loads((tmp_path / "rm" / "config.json").read_text()))
    cfg.model.output = "scalar"
    (tmp_path / "rm" / "config.json").write_text(to_json(cfg))
    for main in (sample.main, chat.main):
        assert cli.run(main, ["--workdir", reward, "--prompt", "hi"]) == 2
        assert (
            _one_error_line(capsys)
            == f"error: {reward} holds a reward model (model.output='scalar'): generate with a language model"
        )


# ----------------------------------------------------------------------------- experiment files, compile, simuser


def test_an_experiment_path_without_py_loads_and_a_bad_stages_is_one_line(tmp_path, capsys):
    plain = tmp_path / "exp_plain"  # no .py suffix
    plain.write_text("from flaxgpt.config import Config\n\ndef config():\n    return Config(name='plain')\n")
    assert cli.run(train.main, ["-e", str(plain), "--print-config"]) == 0
    assert '"name": "plain"' in capsys.readouterr().out
    for returned, got in [("3", "int"), ("[1, 2]", "a list holding other things")]:
        bad = tmp_path / "bad_stages.py"
        bad.write_text(f"def stages():\n    return {returned}\n")
        assert cli.run(train.main, ["-e", str(bad), "--print-config"]) == 2
        line = _one_error_line(capsys)
        assert line == f"error: experiment {bad}: stages() returned {got}, expected a list of flaxgpt.pipeline.Stage"


def test_compile_and_simuser_report_user_errors_in_one_line(tmp_path, capsys, monkeypatch):
    from flaxgpt import simuser
    from tests.conftest import free_port

    no_tokenizer = tmp_path / "notok"
    _run_dir(no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    monkeypatch.setattr(sys, "argv", ["compile", "-e", "sft_world", "--set", f"train.init_from={no_tokenizer}"])
    with pytest.raises(SystemExit) as exited:  # what `python -m flaxgpt.compile` runs
        runpy.run_module("flaxgpt.compile", run_name="__main__")
    assert exited.value.code == 2
    assert _one_error_line(capsys) == f"error: {no_tokenizer} has no tokenizer.json or tokenizer.model"
    port = free_port()  # nothing listens there
    assert cli.run(simuser.main, ["--url", f"http://127.0.0.1:{port}", "--questions", "1"]) == 2
    assert _one_error_line(capsys).startswith(f"error: --url http://127.0.0.1:{port}: ConnectError: ")
    with pytest.raises(SystemExit) as exited:
        simuser.main(["--url", "notaurl"])
    assert exited.value.code == 2
    assert "argument --url: expected an http:// or https:// address, got 'notaurl'" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- flags that must do something


def test_process_flags_without_a_coordinator_or_out_of_range_are_one_line(tmp_path, capsys, monkeypatch):
    from flaxgpt.sharding import initialize_distributed

    argv = ["-e", "world", "-w", str(tmp_path / "run"), "--num-processes", "2", "--process-id", "1"]
    assert cli.run(train.main, argv) == 2
    assert "2 processes (this one 1) need the coordinator's HOST:PORT" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="process id 5 is out of range: a run of 2 processes has ids 0 to 1"):
        initialize_distributed("127.0.0.1:1", 2, 5)
    monkeypatch.setenv("FLAXGPT_NUM_PROCESSES", "abc")
    with pytest.raises(UserError, match="FLAXGPT_NUM_PROCESSES='abc': expected an integer >= 1"):
        initialize_distributed()
    monkeypatch.setenv("FLAXGPT_NUM_PROCESSES", "1")
    assert initialize_distributed() is False  # one process, said so: nothing to join


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--val-fraction", "nan"),
        ("--val-fraction", "-1"),
        ("--val-fraction", "1"),
        ("--shard-mb", "nan"),
        ("--shard-mb", "1e400"),
        ("--workers", "-1"),
        ("--chunk-mb", "0"),
        ("--chunk-mb", "-1"),
        ("--spm-vocab-size", "10"),
        ("--block-size", "0"),
    ],
)
def test_prepare_numeric_flags_out_of_range_are_one_argparse_line(flag, value, tmp_path, capsys):
    from flaxgpt.data import prepare

    with pytest.raises(SystemExit) as exited:
        prepare.main(["--out", str(tmp_path / "out"), "--text", "x.txt", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: expected " in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_tokenize_train_names_the_input_and_the_cause(tmp_path, capsys):
    binary, empty, long_line = tmp_path / "bin.txt", tmp_path / "empty.txt", tmp_path / "long.txt"
    binary.write_bytes(b"\xff\xfe abc\n")
    empty.write_text("")
    long_line.write_text("word " * 1000)  # one line of 5000 bytes
    out = str(tmp_path / "tok")
    assert cli.run(tokenize.main, ["train", "--input", str(binary), "--vocab-size", "300", "--out", out]) == 2
    assert _one_error_line(capsys) == f"error: {binary}: not UTF-8 text (invalid start byte: byte b'\\xff')"
    for path in (empty, long_line):
        assert cli.run(tokenize.main, ["train", "--input", str(path), "--vocab-size", "300", "--out", out]) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"error: --input {path}: the tokenizer's training text has no line SentencePiece")
        assert "longer than 4192 bytes" in line and "spm_vocab_size" not in line
    assert sorted(os.listdir(tmp_path)) == ["bin.txt", "empty.txt", "long.txt"]  # no model, no temporary file


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sft.train.max_steps=abc"], "error: sft.train.max_steps must be an integer, got 'abc'"),
        (["sft.train.zzz=1"], "error: unknown config key 'sft.train.zzz'"),
        (
            ["sft.train.max_steps=5", "rm.train.max_steps=-1"],
            "error: stage 'rm': train.max_steps=-1: expected an integer in [1, 2147483647]",
        ),
    ],
)
def test_a_bad_stage_override_names_its_stage(overrides, message, capsys):
    assert cli.run(train.main, ["-e", "chat_demo", "--print-config", "--set", *overrides]) == 2
    assert _one_error_line(capsys).startswith(message)
