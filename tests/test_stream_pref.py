"""DPO, KTO and ORPO on the token path: pairs (rankings expanded) and feedback prepared into rows
on disk, streamed, with the in-memory path's loss."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from flaxgpt.data import prepare as P
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.rows import RowSource, prepared_rows
from flaxgpt.data.stream import Mixture, TokenSource
from flaxgpt.logging import read_metrics
from flaxgpt.trainers import dpo, kto, orpo, sft
from tests.conftest import REPO, SHAKESPEARE, free_port, tiny_run_config
from tests.test_checkpoint_resume import KILLED_RUN
from tests.test_stream import TINY
from tests.test_stream import _prepare as prepare_text

BLOCK = 32


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records(kind: str, n: int, seed: int) -> list[dict]:
    """Rankings of 2-3 responses (expanded to pairs; ties give none) or thumbs-up/down feedback."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.randint(0, 9)
        system = {"system": "Add."} if i % 2 else {}
        if kind == "pairs":
            responses = [str(a + 1), str(a + 2), "no idea"][: rng.randint(2, 3)]
            out.append({"prompt": f"{a}+1=?", "responses": responses, "scores": [2, 1, 1][: len(responses)], **system})
        else:
            answer = str(a + rng.randint(1, 2))
            out.append({"prompt": f"{a}+1=?", "response": answer, "label": answer == str(a + 1), **system})
    return out


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A 1-step SFT run (the policy the trainers start from, and the tokenizer the rows use)."""
    root = tmp_path_factory.mktemp("pref")
    turns = [{"role": "system", "content": "Add."}, {"role": "user", "content": "0123456789+=?"}]
    chat = {"messages": turns + [{"role": "assistant", "content": "no idea"}]}
    path = _write(root / "chats.jsonl", [chat] * 5)
    cfg = tiny_run_config(
        model={"n_layer": 1, "block_size": BLOCK},
        train={"trainer": "sft", "max_steps": 1, "batch_size": 2},
        data={"source": "jsonl", "path": path, "packing": "pad", "train_fraction": 0.6},
        sft={"eval_examples": 0},
        eval={"interval": 1, "iters": 1, "sample_tokens": 0},
    )
    sft.run(cfg, str(root / "sft"))
    return root


def _cfg(trainer: str, policy, source: str, path, val_path, batch: int, eval_batch: int):
    return tiny_run_config(
        model={"n_layer": 1, "block_size": BLOCK},
        train={"trainer": trainer, "init_from": str(policy / "sft"), "max_steps": 2, "batch_size": batch},
        data={"source": source, "path": str(path), "val_path": str(val_path)},
        eval={"interval": 1, "iters": 1, "batch_size": eval_batch, "sample_tokens": 0},
        checkpoint={"every_steps": 100},
        optimizer={"lr": 1e-30, "min_lr": 1e-31, "warmup_steps": 0},  # no update: Adam would magnify rounding
    )


@pytest.mark.parametrize("trainer", [dpo, kto, orpo], ids=["dpo", "kto", "orpo"])
def test_preference_on_streamed_rows_has_the_in_memory_loss(policy, tmp_path, trainer):
    """The whole training set in one batch: the losses of 2 steps (before any update) and the
    validation loss are the in-memory path's, up to the order of the sum."""
    name = trainer.__name__.rsplit(".", 1)[-1]
    kind = "feedback" if name == "kto" else "pairs"
    train = _write(tmp_path / "train.jsonl", _records(kind, 24, 0))
    val = _write(tmp_path / "val.jsonl", _records(kind, 8, 1))
    args = ["--out", str(tmp_path / "rows"), f"--{kind}", train, "--val", val, "--workers", "0"]
    args += ["--tokenizer-from", str(policy / "sft"), "--block-size", str(BLOCK), "--chunk-mb", "1"]
    manifest = P.prepare(P.parser().parse_args(args), log=lambda _: None)
    assert manifest["rows"]["kind"] == kind
    other = "dpo" if kind == "feedback" else "kto"  # rows of the other kind: one line naming the directory
    with pytest.raises(
        DataError, match=f"rows/manifest.json: holds no {'pairs' if other == 'dpo' else 'feedback'} rows"
    ):
        prepared_rows(_cfg(other, policy, "tokens", tmp_path / "rows", "", 1, 1), None)
    n, n_val = (RowSource(str(tmp_path / "rows"), split).windows for split in ("train", "val"))
    assert (n, n_val) == (24, 8) if kind == "feedback" else n > 24  # rankings: expanded to pairs
    figures = []
    for source, path, val_path in (("jsonl", train, val), ("tokens", tmp_path / "rows", "")):
        trainer.run(_cfg(name, policy, source, path, val_path, n, n_val), str(tmp_path / source))
        figures.append([r for r in read_metrics(str(tmp_path / source)) if "loss" in r])
    assert [r["step"] for r in figures[1]] == [1, 2]
    for memory, streamed in zip(*figures):
        for key in ("loss", "val_loss"):
            np.testing.assert_allclose(streamed[key], memory[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _two_processes(args: list[str], workdir, kill_at: int = 0) -> None:
    """Train on 2 local processes (jax.distributed on 127.0.0.1, 2 CPU devices each); with kill_at,
    process 0 SIGKILLs itself after logging that step and process 1 is SIGKILLed then."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KILL_AT": str(kill_at)}
    command = [sys.executable, "-c", KILLED_RUN] if kill_at else [sys.executable, "-m", "flaxgpt.train"]
    command += [*args, "--workdir", str(workdir), "--coordinator-address", f"127.0.0.1:{free_port()}"]
    logs = [open(os.path.join(workdir.parent, f"{workdir.name}-{i}-{kill_at}.log"), "w") for i in range(2)]
    procs = [
        subprocess.Popen(
            [*command, "--num-processes", "2", "--process-id", str(i)], cwd=REPO, env=env, stdout=log, stderr=log
        )
        for i, log in enumerate(logs)
    ]
    try:
        codes = [procs[0].wait(timeout=600)]
        if kill_at:
            procs[1].kill()
        codes.append(procs[1].wait(timeout=600))
    finally:
        for p in procs:
            p.kill()
    text = open(logs[0].name).read()
    assert codes == ([-9, -9] if kill_at else [0, 0]), text[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tiny shakespeare not found")
def test_two_processes_on_token_data_resume_bit_exact_after_sigkill(tmp_path):
    """A mixture of two prepared corpora on 2 processes: killed (SIGKILL, both) after step 8,
    restarted from the step-6 checkpoint (the small source then crosses into its 2nd epoch), the
    figures of every step are those of an uninterrupted 2-process run."""
    corpus, second, small = tmp_path / "corpus", tmp_path / "second", tmp_path / "small.txt"
    prepare_text(corpus)
    small.write_text(open(SHAKESPEARE, encoding="utf-8").read()[:1500], encoding="utf-8")
    prepare_text(second, "--tokenizer-from", str(corpus), "--chunk-mb", "0.0003", text=str(small))
    mixture = json.dumps([{"path": str(corpus), "weight": 0.5}, {"path": str(second), "weight": 0.5}])
    tiny = [t for t in TINY if not t.startswith(("train.max_steps", "eval.interval", "checkpoint.every"))]
    args = ["--experiment", "llama_1b_mixture", "--set", *tiny, f"data.mixture={mixture}", "train.max_steps=12"]
    args += ["eval.interval=6", "checkpoint.every_steps=6", "mesh.data=1", "mesh.dcn_data=2", "mesh.fsdp=2"]
    at_resume, at_end = (Mixture([0.5, 0.5], seed=0).consumed(step * 8)[1] for step in (6, 12))
    assert at_resume < TokenSource(str(second), "train", 32).windows < at_end
    _two_processes(args, tmp_path / "straight")
    _two_processes(args, tmp_path / "killed", kill_at=8)
    assert [r["step"] for r in read_metrics(str(tmp_path / "killed"))][-1] >= 8
    _two_processes(args, tmp_path / "killed")
    assert "resumed from step 6" in open(tmp_path / "killed-0-0.log").read()
    a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "killed"))
    assert [r["step"] for r in a] == list(range(1, 13)) == [r["step"] for r in b]
    for key in ("loss", "grad_norm", "val_loss", "tokens/corpus", "tokens/second"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
