"""Tokenizers, the windowed text source, and the embedded world's oracle."""

import random
import re

import numpy as np
import pytest

from flaxgpt import config as C
from flaxgpt.data import world as W
from flaxgpt.data.text import TokenWindows, build_text_data
from flaxgpt.data.tokenizers import (
    ASSISTANT,
    EOS,
    USER,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)


def test_char_tokenizer_round_trip_and_special_tokens(tmp_path):
    tok = CharTokenizer.from_text("hello world\n")
    text = f"{USER}hello{ASSISTANT}world{EOS}"
    ids = tok.encode(text, allow_special=True)  # trusted text: its markers are special tokens
    assert ids.count(tok.eos_id) == 1 and len(ids) == 3 + len("helloworld")
    assert tok.decode(ids) == text
    assert tok.eos_id not in tok.encode(text)  # as text, they never are
    assert tok.encode("hé") == [tok.stoi["h"], tok.unk_id]
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(text, allow_special=True) == ids and again.vocab_size == tok.vocab_size


def test_sentencepiece_trains_round_trips_and_reserves_specials(tmp_path):
    world = W.make_world(0)
    text = W.corpus(world, 300)
    model_file = train_sentencepiece(text.splitlines(keepends=True), str(tmp_path / "sp"), 400, "bpe")
    tok = SentencePieceTokenizer(model_file)
    sample = text[:500]
    assert tok.decode(tok.encode(sample)) == sample  # exact, whitespace and newlines included
    assert len(tok.encode(sample)) < len(sample)  # it does compress
    with pytest.raises(ValueError, match="raise data.spm_vocab_size"):
        train_sentencepiece(text.splitlines(keepends=True), str(tmp_path / "small"), 100, "bpe")
    ids = tok.encode(f"{USER}hi{EOS}", allow_special=True)
    assert ids[0] == tok.sp.piece_to_id(USER) and ids[-1] == tok.eos_id
    assert tok.decode(ids) == f"{USER}hi{EOS}"
    plain = tok.encode(f"{USER}hi{EOS}")  # as text: ordinary pieces that spell the markers out
    assert not set(plain) & set(tok.special_ids) and tok.decode(plain) == f"{USER}hi{EOS}"
    workdir = tmp_path / "run"
    workdir.mkdir()
    tok.save(str(workdir))
    assert isinstance(load_tokenizer(str(workdir)), SentencePieceTokenizer)


def test_windows_are_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.int32)
    data = TokenWindows(tokens[:900], tokens[900:], seed=3)
    a = data.batch("train", 5, 4, 16)
    b = data.batch("train", 5, 4, 16)
    c = data.batch("train", 6, 4, 16)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])
    np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
    assert np.all(a["inputs"] < 900) and np.all(data.batch("val", 0, 4, 16)["inputs"] >= 900)
    assert a["positions"].shape == (4, 16) and np.all(a["positions"][:, 3] == 3)
    with pytest.raises(ValueError, match="fewer than"):
        TokenWindows(tokens[:10], tokens[:10], 0).batch("train", 0, 2, 16)


def test_text_source_split_is_first_90_percent(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 100)
    cfg = C.Config(data=C.DataConfig(source="text", path=str(path)))
    tok, data = build_text_data(cfg, str(tmp_path))
    assert len(data.train) == 900 and len(data.val) == 100
    assert tok.decode(data.val[:10]) == "abcdefghij"
    assert (tmp_path / "tokenizer.json").exists()


def test_missing_text_file_is_a_clear_error(tmp_path):
    cfg = C.Config(data=C.DataConfig(source="text", path=str(tmp_path / "nope.txt")))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_text_data(cfg, str(tmp_path))


def test_world_is_deterministic_and_its_oracle_answers_every_question():
    assert W.make_world(3) == W.make_world(3)
    assert W.make_world(3) != W.make_world(4)
    world = W.make_world(0)
    rng = random.Random(0)
    for _ in range(200):
        question, answer = W.random_question(world, rng)
        assert answer is not None and W.check_answer(world, question, answer)
        assert not W.check_answer(world, question, answer + "x")
    person = world.people[0]
    assert W.answer(world, f"How old is {person.name}?") == str(person.age)
    assert W.answer(world, "What is 12 plus 30?") == "42"
    assert W.answer(world, "What is 12 minus 30?") == "-18"
    assert W.answer(world, "Who is the king?") is None


def test_world_corpus_states_only_true_facts():
    world = W.make_world(0)
    text = W.corpus(world, 500, seed=1)
    lines = text.split("\n")
    checked = 0
    for q, a in zip(lines, lines[1:]):
        if q.startswith(W.QUESTION) and a.startswith(W.ANSWER):
            assert W.check_answer(world, q[len(W.QUESTION) :], a[len(W.ANSWER) :])
            checked += 1
    assert checked > 200


def test_world_corpus_holds_true_arithmetic_drills_at_the_configured_share(capsys):
    from flaxgpt import cli
    from flaxgpt.data.text import source_text
    from flaxgpt.train import main

    world = W.make_world(0)
    assert W.corpus(world, 400, seed=1, arithmetic=0.0) == W.corpus(world, 400, seed=1)  # default: as before
    docs = W.corpus(world, 400, seed=1, arithmetic=0.3).split("\n\n")
    drills = [d for d in docs if re.match(r"\d+ (plus|minus) ", d)]
    assert 0.22 < len(drills) / len(docs) < 0.38
    for drill in drills:
        statements = re.findall(r"(\d+) (plus|minus) (\d+) is (\d+)\.", drill)
        assert len(statements) == drill.count(".") == 10 and len({s[:3] for s in statements}) > 5  # not a table
        assert all(int(r) == (int(a) + int(b) if op == "plus" else int(a) - int(b)) for a, op, b, r in statements)
    cfg = C.Config(data=C.DataConfig(source="world", world_documents=100, world_arithmetic=1.0))
    assert all(re.match(r"\d+ (plus|minus) ", d) for d in source_text(cfg).strip().split("\n\n"))
    assert cli.run(main, ["-e", "world", "--set", "data.world_arithmetic=1.5", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.world_arithmetic=1.5: expected a number in [0, 1]" in err and "\n" not in err


def test_world_demonstrations_hedge_age_answers_at_the_configured_share():
    task = W.WorldTask(0, "Answer briefly.")
    assert task.demonstrations("sft_train", 300, 0.3, hedge=0.0) == task.demonstrations("sft_train", 300, 0.3)
    turns = [
        (q["content"], a["content"])
        for c in task.demonstrations("sft_train", 3000, 0.3, hedge=0.6)
        for q, a in zip(c[1::2], c[2::2])
    ]
    hedged = [(q, a) for q, a in turns if a.startswith("About ")]
    ages = [(q, a) for q, a in turns if q.startswith("How old is")]
    assert hedged and all(q.startswith("How old is") for q, _ in hedged)  # only age questions hedge
    assert all(a == f"About {W.answer(task.world, q)}." for q, a in hedged)  # around the true answer
    assert all(task.label(q, a) == 0.5 for q, a in hedged)  # the labeler ranks it below the plain answer
    assert 0.6 * 0.7 - 0.05 < len(hedged) / len(ages) < 0.6 * 0.7 + 0.05  # of the answers noise leaves
    from flaxgpt.train import load_experiment
    from flaxgpt.trainers.sft import world_conversations

    train, _, _ = world_conversations(load_experiment("sft_world"))  # the chat demo's SFT data has the habit
    assert sum(m["content"].startswith("About ") for c in train for m in c if m["role"] == "assistant") > 200


def test_tokenizer_cli_trains_from_text_and_jsonl(tmp_path, capsys):
    from flaxgpt import cli
    from flaxgpt.tokenize import main

    text = tmp_path / "a.txt"
    text.write_text(W.corpus(W.make_world(0), 200))
    docs = tmp_path / "b.jsonl"
    docs.write_text('{"text": "What is 2 plus 2?"}\n{"text": "Answer: 4"}\n')
    assert main(["train", "--input", str(text), str(docs), "--vocab-size", "400", "--out", str(tmp_path / "sp")]) == 0
    assert "400 pieces (bpe)" in capsys.readouterr().out
    assert main(["encode", "--model", str(tmp_path / "sp.model"), f"{USER}What is 2 plus 2?"]) == 0
    assert capsys.readouterr().out.startswith(USER)
    assert cli.run(main, ["train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "400", "--out", "x"]) == 2
