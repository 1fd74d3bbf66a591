"""JSONL schemas and their errors, packing and padding, epoch shuffling, and a JSONL pretraining run."""

import json

import numpy as np
import pytest

from flaxgpt.data.jsonl import DataError, read_jsonl, schema_problem
from flaxgpt.data.packing import PackedRows, build_rows, document_example
from flaxgpt.logging import read_metrics
from tests.conftest import run_cli

GOOD = {
    "text": {"text": "hello"},
    "conversations": {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    },
    "rankings": {"prompt": "p", "responses": ["best", "mid", "worst"], "scores": [2, 1, 1]},
    "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "feedback": {"prompt": "p", "response": "r", "label": True},
}


@pytest.mark.parametrize("schema", sorted(GOOD))
def test_each_schema_accepts_its_example(schema):
    assert schema_problem(GOOD[schema], schema) is None


@pytest.mark.parametrize(
    "schema, record, fragment",
    [
        ("text", {"txt": "x"}, "missing key(s) ['text']"),
        ("text", {"text": 3}, "'text' must be a string"),
        ("conversations", {"messages": [{"role": "user", "content": "hi"}]}, "at least one assistant"),
        ("conversations", {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0] must be"),
        (
            "conversations",
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "system message may only come first",
        ),
        ("rankings", {"prompt": "p", "responses": ["only one"]}, "at least 2 strings"),
        ("rankings", {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}, "must not increase"),
        ("rankings", {"prompt": "p", "responses": ["a", "b"], "scores": [float("nan"), 1]}, "finite numbers"),
        ("rankings", {"prompt": "p", "responses": ["a", "b"], "scores": [float("inf"), 1]}, "finite numbers"),
        ("pairs", {"prompt": "p", "chosen": "a", "rejected": None}, "['rejected'] must be strings"),
        ("feedback", {"prompt": "p", "response": "r", "label": "yes"}, "'label' must be true or false"),
        (
            "pairs",
            {"prompt": "p", "chosen": "a", "rejected": "b", "history": [{"role": "system", "content": "s"}]},
            "'history'",
        ),
        ("feedback", {"prompt": "p", "response": "r", "label": True, "history": "hi"}, "'history' (the earlier turns)"),
    ],
)
def test_schema_problems_are_specific(schema, record, fragment):
    assert fragment in schema_problem(record, schema)


def test_problems_stay_one_short_line_whatever_the_record_holds(tmp_path):
    huge = {"messages": [{"role": "bot", "content": "x" * 100_000}]}
    assert len(schema_problem(huge, "conversations")) < 400
    many = schema_problem({f"k{i:04}": 1 for i in range(1000)}, "text")
    assert len(many) < 400 and "'k0009', ... 990 more]" in many
    path = tmp_path / "control.jsonl"
    path.write_text('{"text": "a\tb"}\n')  # a raw tab inside a JSON string
    with pytest.raises(DataError, match=r"\(Invalid control character at column 12\)"):
        read_jsonl(str(path), "text")


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"body": "three"}\n{"text": "four"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:3: not valid JSON"):
        read_jsonl(str(path), "text")
    records, report = read_jsonl(str(path), "text", on_error="skip")
    assert [r["text"] for r in records] == ["one", "four"] and report.skipped == 2
    assert "docs.jsonl:4: missing key(s) ['text']" in report.problems[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable 'text' records"):
        read_jsonl(str(empty), "text")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(str(tmp_path / "missing.jsonl"), "text")


def test_packing_keeps_documents_apart_and_positions_restart():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    rows = build_rows((document_example(d, eos_id=0) for d in docs), length=4, mode="pack", pad_id=99)
    np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 99]])
    np.testing.assert_array_equal(rows["targets"], [[2, 3, 0, 5], [0, 7, 8, 9], [10, 11, 0, 99]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 0]])
    np.testing.assert_array_equal(rows["loss_weights"][-1], [1, 1, 1, 0])


def test_padding_puts_one_truncated_document_per_row():
    docs = [[1, 2], [3, 4, 5, 6, 7]]
    rows = build_rows((document_example(d, eos_id=0) for d in docs), length=4, mode="pad", pad_id=99)
    np.testing.assert_array_equal(rows["inputs"], [[1, 2, 99, 99], [3, 4, 5, 6]])
    np.testing.assert_array_equal(rows["loss_weights"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_epochs_visit_every_row_once_in_a_fresh_order_and_rows_split_by_process():
    rows = {"inputs": np.arange(10)[:, None]}
    data = PackedRows(rows, seed=0)
    seen = [data.batch(step, 5)["inputs"][:, 0] for step in range(4)]
    epoch0, epoch1 = np.concatenate(seen[:2]), np.concatenate(seen[2:])
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1)
    assert not np.array_equal(epoch0, epoch1)
    assert data.position(3, 5) == {"epoch": 1, "index_in_epoch": 5}
    full = data.batch(7, 4)["inputs"]
    np.testing.assert_array_equal(data.batch(7, 4, rows=np.array([2, 3]))["inputs"], full[2:])
    np.testing.assert_array_equal(PackedRows(rows, seed=0).batch(7, 4)["inputs"], full)


def test_jsonl_pretraining_run_and_its_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"Document {i}: the cat sat on mat {i % 7}."}) + "\n" for i in range(200))
    )
    args = [
        "--experiment",
        "world",
        "--set",
        "data.source=jsonl",
        f"data.path={path}",
        "model.n_layer=1",
        "model.d_model=32",
        "model.block_size=32",
        "train.batch_size=8",
        "train.max_steps=20",
        "eval.interval=10",
        "eval.iters=2",
        "eval.sample_tokens=0",
        "logging.progress=none",
    ]
    ok = run_cli(*args, "--workdir", str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[-1]["step"] == 20 and rows[-1]["val_loss"] < rows[0]["loss"]
    assert "docs.jsonl: 200 records" in ok.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "oops"}\n')
    failed = run_cli(*args, f"data.path={bad}", "--workdir", str(tmp_path / "bad"))  # the later --set wins
    assert failed.returncode == 2 and "bad.jsonl:3: missing key(s) ['text']" in failed.stderr


def test_prefetch_yields_every_step_in_order_and_surfaces_errors():
    from flaxgpt.data.prefetch import prefetch

    assert list(prefetch(lambda s: s * s, 3, 9, depth=2)) == [(s, s * s) for s in range(3, 9)]
    assert list(prefetch(lambda s: s, 0, 4, depth=0)) == [(s, s) for s in range(4)]

    def fails_at_5(step):
        if step == 5:
            raise ValueError("bad batch 5")
        return step

    seen = []
    with pytest.raises(ValueError, match="bad batch 5"):
        for step, _ in prefetch(fails_at_5, 0, 10, depth=3):
            seen.append(step)
    assert seen == [0, 1, 2, 3, 4]
    early = prefetch(lambda s: s, 0, 1000, depth=2)
    assert next(early) == (0, 0)
    early.close()  # stopping early ends the worker instead of blocking it forever


def test_jsonl_run_resumed_across_epochs_sees_the_same_batches(tmp_path):
    """18 steps of 8 rows over ~40 packed rows cross several epochs; stopping at step 9 and
    resuming reproduces the uninterrupted run exactly."""
    from flaxgpt.trainers import pretrain
    from tests.conftest import tiny_run_config

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Note {i}: bring {i % 4} apples."}) + "\n" for i in range(60)))

    def cfg(max_steps):
        return tiny_run_config(
            data={"source": "jsonl", "path": str(path), "on_error": "raise"},
            optimizer={"decay_steps": 18},
            train={"max_steps": max_steps},
            eval={"interval": 9, "sample_tokens": 0},
            checkpoint={"every_steps": 9},
        )

    pretrain.run(cfg(18), str(tmp_path / "straight"))
    pretrain.run(cfg(9), str(tmp_path / "resumed"))
    pretrain.run(cfg(18), str(tmp_path / "resumed"))
    a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [r["step"] for r in b] == list(range(1, 19))
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path):
    result = run_cli(
        "--experiment", "world", "--workdir", str(tmp_path / "run"), "--set", "model.vocab_size=10", "train.max_steps=1"
    )
    assert result.returncode == 2
    assert "model.vocab_size=10 is smaller than the tokenizer's 65 ids" in result.stderr
