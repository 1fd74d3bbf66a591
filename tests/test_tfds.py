"""TFDS, offline and without TensorFlow: build flaxgpt's builder into a temporary data_dir, read it
back through TFDS itself, and pretrain from it."""

import json

import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is the optional extra: pip install '.[tfds]'")

from flaxgpt.data.jsonl import DataError  # noqa: E402
from flaxgpt.data.tfds_source import build_dataset, main, read_documents  # noqa: E402
from flaxgpt.logging import read_metrics  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    train = root / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"Document {i}: the owl sees {i % 5} stars."}) + "\n" for i in range(60))
    )
    extra = root / "extra.txt"
    extra.write_text("A whole text file is one document.\nEven over two lines.")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": f"Held out {i}: the fox hears {i} owls."}) + "\n" for i in range(8)))
    data_dir = str(root / "data")
    assert main(["build", "--train", str(train), str(extra), "--validation", str(val), "--data-dir", data_dir]) == 0
    return data_dir


def test_built_dataset_reads_back_through_tfds(built):
    train, report = read_documents("flaxgpt_text", "train", built)
    assert report.records == 61 and report.skipped == 0
    assert len(train) == 61 and "A whole text file is one document.\nEven over two lines." in train
    assert sorted(read_documents("flaxgpt_text", "validation", built)[0])[0] == "Held out 0: the fox hears 0 owls."
    assert len(read_documents("flaxgpt_text", "train[:50%]", built)[0]) in (30, 31)
    builder = tfds.builder_from_directory(f"{built}/flaxgpt_text/1.0.0")
    assert builder.info.splits["train"].num_examples == 61
    assert isinstance(builder.info.features["text"], tfds.features.Text)


def test_missing_dataset_or_feature_is_a_clear_error(built, tmp_path):
    with pytest.raises(DataError, match="'no_such_set' split 'train'"):
        read_documents("no_such_set", "train", str(tmp_path))
    with pytest.raises(DataError, match="has no feature 'body'"):
        read_documents("flaxgpt_text", "train", built, text_key="body")
    with pytest.raises(DataError, match="at least one --train file"):
        build_dataset([], [], str(tmp_path))


def test_pretraining_from_a_tfds_dataset(built, tmp_path):
    result = run_cli(
        "--experiment",
        "world",
        "--workdir",
        str(tmp_path / "run"),
        "--set",
        "data.source=tfds",
        "data.tfds_name=flaxgpt_text",
        f"data.tfds_data_dir={built}",
        "model.n_layer=1",
        "model.d_model=32",
        "model.block_size=32",
        "train.batch_size=8",
        "train.max_steps=6",
        "eval.interval=6",
        "eval.iters=1",
        "eval.sample_tokens=0",
        "logging.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tfds flaxgpt_text[train]: 61 documents" in result.stdout
    assert read_metrics(str(tmp_path / "run"))[-1]["step"] == 6
