"""SFT on the token path: conversations prepared into rows on disk, streamed like in-memory rows."""

import json
import os
import random
import shutil

import numpy as np
import pytest

from flaxgpt.data import prepare as P
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.rows import RowSource, StreamedRows, prepared_rows
from flaxgpt.data.tokenizers import CharTokenizer, load_tokenizer
from flaxgpt.logging import read_metrics
from flaxgpt.trainers import sft
from tests.conftest import tiny_run_config
from tests.test_stream import straight_and_killed

BLOCK = 48


def _conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        turns = [{"role": "user", "content": f"{a}+{b}=?"}, {"role": "assistant", "content": f"{a + b}"}]
        if rng.random() < 0.3:  # a second exchange, and text that looks like a special token
            turns += [{"role": "user", "content": "<|end|> again"}, {"role": "assistant", "content": "ok"}]
        out.append(([{"role": "system", "content": "Add."}] if rng.random() < 0.5 else []) + turns)
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """(train.jsonl, val.jsonl, the tokenizer's directory, the prepared rows' directory)."""
    root = tmp_path_factory.mktemp("chats")
    train, val = _conversations(90, 0), _conversations(20, 1)
    for name, convs in (("train.jsonl", train), ("val.jsonl", val)):
        (root / name).write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tokenizer = CharTokenizer.from_text("".join(m["content"] for c in train + val for m in c))
    os.makedirs(root / "tok")
    tokenizer.save(str(root / "tok"))
    out = root / "rows"
    _prepare(out, root, "--workers", "2")
    return root / "train.jsonl", root / "val.jsonl", root / "tok", out


def _prepare(out, root, *extra):
    args = ["--out", str(out), "--conversations", str(root / "train.jsonl"), "--val", str(root / "val.jsonl")]
    args += ["--tokenizer-from", str(root / "tok"), "--block-size", str(BLOCK), "--chunk-mb", "1", *extra]
    return P.prepare(P.parser().parse_args(args), log=lambda _: None)


def _cfg(source: str, path, val_path="", block_size=BLOCK, **train):
    return tiny_run_config(
        model={"n_layer": 1, "block_size": block_size},
        train={"trainer": "sft", "max_steps": 1, "log_interval": 1, **train},
        data={"source": source, "path": str(path), "val_path": str(val_path), "packing": "pack"},
        sft={"eval_examples": 0, "loss_on": "all"},
        eval={"interval": 1, "iters": 1, "sample_tokens": 0},
        checkpoint={"every_steps": 100},
        optimizer={"lr": 1e-30, "min_lr": 1e-31},  # no update: Adam's first step would magnify rounding
    )


def test_prepared_rows_are_the_in_memory_rows_and_stream_by_epoch(chats):
    train_path, val_path, tok, rows_dir = chats
    cfg = _cfg("jsonl", train_path, val_path)
    tokenizer = load_tokenizer(str(tok))
    convs, _ = sft.jsonl_conversations(cfg, lambda _: None)
    memory = sft.conversation_rows(convs, tokenizer, cfg, "x", 0).rows
    source = RowSource(str(rows_dir), "train")
    disk = source.rows(np.arange(source.windows))
    assert set(disk) == set(memory)
    for key in memory:  # row for row, bit for bit (one chunk: packed exactly as in memory)
        assert disk[key].dtype == memory[key].dtype
        np.testing.assert_array_equal(disk[key], memory[key], err_msg=key)
    # the "<|end|>" users typed stays text (its "<" a character): special ids come from the template only
    typed = sum(m["content"].startswith("<|end|>") for c in convs for m in c)
    assert 1 <= (disk["inputs"] == tokenizer.encode("<")[0]).sum() <= typed
    streamed = StreamedRows(source, seed=3)
    n = streamed.n
    epoch = streamed.batch(0, n)["inputs"]
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, memory["inputs"]))  # every row once an epoch
    some = np.array([1, 4, 5])  # a process's rows of a batch are those rows of the whole batch
    np.testing.assert_array_equal(streamed.batch(7, 6, some)["targets"], streamed.batch(7, 6)["targets"][some])
    assert streamed.position(5, n) == {"epoch": 5, "index_in_epoch": 0}


def test_sft_on_streamed_rows_has_the_in_memory_loss(chats, tmp_path):
    """The whole training set in one batch: step 1's loss (before any update) and the validation
    loss are the in-memory path's, up to the order of the sum."""
    train_path, val_path, tok, rows_dir = chats
    n = RowSource(str(rows_dir), "train").windows
    n_val = RowSource(str(rows_dir), "val").windows
    figures = []
    for source, path in (("jsonl", train_path), ("tokens", rows_dir)):
        cfg = _cfg(source, path, val_path if source == "jsonl" else "", batch_size=n)
        cfg.eval.batch_size = n_val
        sft.run(cfg, str(tmp_path / source))
        figures.append(read_metrics(str(tmp_path / source))[-1])
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(figures[1][key], figures[0][key], rtol=1e-5, err_msg=key)


def test_rows_that_disagree_with_the_run_are_one_line_errors(chats, tmp_path):
    _, _, tok, rows_dir = chats
    tokenizer = load_tokenizer(str(tok))
    with pytest.raises(DataError, match=r"rows made with --block-size 48, but this run has 64"):
        prepared_rows(_cfg("tokens", rows_dir, block_size=64), tokenizer)
    cfg = _cfg("tokens", rows_dir)
    with pytest.raises(DataError, match="another tokenizer"):
        prepared_rows(cfg, CharTokenizer.from_text("abc"))
    bad = tmp_path / "bad"
    shutil.copytree(rows_dir, bad)
    name = json.load(open(bad / P.MANIFEST))["splits"]["train"][0]["file"]
    os.remove(bad / name)
    with pytest.raises(DataError, match=f"{name}: missing shard"):
        prepared_rows(_cfg("tokens", bad), tokenizer)
    with pytest.raises(DataError, match="--conversations needs --tokenizer-from"):
        P.prepare(
            P.parser().parse_args(
                ["--out", str(tmp_path / "x"), "--conversations", str(bad / P.MANIFEST), "--val", str(bad / P.MANIFEST)]
            ),
            log=lambda _: None,
        )


def _rankings(n: int, seed: int, pairs: bool) -> list[dict]:
    """Pairs, or rankings of 2 or 3 responses (one file holds one schema, as the reward model reads it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randint(0, 99)
        right, wrong = str(a + 1), str(a + rng.randint(2, 9))
        if pairs:
            out.append({"prompt": f"{a}+1=?", "chosen": right, "rejected": wrong})
        else:
            responses = [right, wrong, "no idea"][: rng.randint(2, 3)]
            out.append({"prompt": f"{a}+1=?", "responses": responses, **({"system": "Add."} if a % 2 else {})})
    return out


def test_reward_model_on_streamed_rows_has_the_in_memory_loss_and_offset(tmp_path):
    """Rankings (train) and pairs (validation) prepared into rows; with the whole set in one batch the reward model's
    step-1 loss, validation loss and reference offset are the in-memory path's."""
    train, val = _rankings(40, 0, pairs=False), _rankings(10, 1, pairs=True)
    for name, records in (("train.jsonl", train), ("val.jsonl", val)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [r.get("system", "") + r["prompt"] + "".join(r["responses"]) for r in train]
    os.makedirs(tmp_path / "tok")
    CharTokenizer.from_text("".join(texts)).save(str(tmp_path / "tok"))
    args = ["--out", str(tmp_path / "rows"), "--rankings", str(tmp_path / "train.jsonl")]
    args += ["--val", str(tmp_path / "val.jsonl"), "--tokenizer-from", str(tmp_path / "tok"), "--workers", "0"]
    P.prepare(P.parser().parse_args([*args, "--block-size", str(BLOCK), "--ranking-k", "3"]), log=lambda _: None)
    figures = []
    for source, path in (("jsonl", tmp_path / "train.jsonl"), ("tokens", tmp_path / "rows")):
        cfg = _cfg(source, path, tmp_path / "val.jsonl" if source == "jsonl" else "", batch_size=40)
        cfg.train.trainer, cfg.eval.batch_size = "reward", 10
        figures.append(sft_or_reward(cfg, tmp_path / source))
    for key in ("loss", "val_loss", "val_accuracy", "reward_offset"):
        np.testing.assert_allclose(figures[1][key], figures[0][key], rtol=1e-5, atol=1e-6, err_msg=key)


def sft_or_reward(cfg, workdir) -> dict:
    from flaxgpt.trainers import reward

    result = reward.run(cfg, str(workdir))
    return {**read_metrics(str(workdir))[-1], "reward_offset": result["reward_offset"]}


@pytest.mark.slow
def test_sft_on_streamed_rows_resumes_bit_exact_after_sigkill_across_an_epoch(chats, tmp_path):
    _, _, _, rows_dir = chats
    n = RowSource(str(rows_dir), "train").windows
    assert 8 * 8 < 2 * n < 16 * 8  # the steps resumed (9-16, 8 rows each) cross from the 2nd epoch to the 3rd
    args = ["--experiment", "sft_jsonl", "--set", "train.init_from=", "data.source=tokens", f"data.path={rows_dir}"]
    args += [f"model.{k}" for k in ("n_layer=1", "n_head=2", "d_model=32", f"block_size={BLOCK}", "vocab_size=0")]
    args += ["train.batch_size=8", "train.max_steps=16", "train.log_interval=1", "optimizer.warmup_steps=2"]
    args += ["eval.interval=8", "eval.iters=1", "sft.eval_examples=0", "checkpoint.every_steps=8"]
    args += ["checkpoint.async_save=false", "logging.progress=plain", "logging.tensorboard=false"]
    a, b = straight_and_killed(args, tmp_path, kill_at=11, resumed_from=8)
    assert [r["step"] for r in a] == list(range(1, 17))
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
