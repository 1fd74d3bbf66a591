"""Curation (length, blocklist, exact and near duplicates, each counted) and seeded augmentation."""

import json
import random

import pytest

from flaxgpt.data.curation import Curator, augment, load_synonyms
from flaxgpt.logging import read_metrics
from tests.conftest import run_cli

BASE = "the quick brown fox jumps over the lazy dog near the quiet river bank on a sunny day in june"


def test_each_filter_drops_what_it_should_and_counts_it():
    docs = [
        BASE,
        "  THE quick brown fox jumps over the lazy dog near the quiet river bank on a sunny day in JUNE ",  # exact
        BASE.replace("june", "july"),  # near duplicate: one word of twenty differs
        "short",
        "an entirely different sentence about spaceships, tea and the history of clocks in old towns",
        "this one mentions a forbidden word somewhere in the middle of its text for the filter",
        "x" * 500,
    ]
    curator = Curator(
        min_chars=10, max_chars=200, blocklist=["Forbidden"], exact_dedup=True, near_dedup=True, near_threshold=0.7
    )
    kept = curator(docs)
    assert kept == [docs[0], docs[4]]
    assert curator.report.as_dict() == {
        "input": 7,
        "too_short": 1,
        "too_long": 1,
        "blocklisted": 1,
        "exact_duplicates": 1,
        "near_duplicates": 1,
        "kept": 2,
        "augmented_added": 0,
    }


def test_minhash_estimates_jaccard_similarity():
    curator = Curator(num_perm=256, bands=32)
    a = " ".join(f"w{i}" for i in range(100))
    b = " ".join(f"w{i}" for i in range(50, 150))  # 3-gram Jaccard = 48 / 148 ~ 0.32
    estimate = (curator.signature(a) == curator.signature(b)).mean()
    assert abs(estimate - 48 / 148) < 0.1
    assert (curator.signature(a) == curator.signature(a)).all()


def test_curation_is_off_by_default():
    docs = [BASE, BASE, "a"]
    assert Curator()(docs) == docs


def test_augmentation_is_seeded_and_does_what_each_op_says(tmp_path):
    table = tmp_path / "syn.tsv"
    table.write_text("quick\tfast,speedy\nlazy\tidle\n")
    synonyms = load_synonyms(str(table))
    assert synonyms == {"quick": ["fast", "speedy"], "lazy": ["idle"]}
    words = BASE.split()
    same = [augment(BASE, random.Random(3), 0.1, ["synonym", "swap"], synonyms) for _ in range(2)]
    assert same[0] == same[1] != BASE
    replaced = augment(BASE, random.Random(0), 0.5, ["synonym"], synonyms).split()
    assert len(replaced) == len(words) and {"fast", "speedy", "idle"} & set(replaced)
    assert len(augment(BASE, random.Random(0), 0.1, ["delete"]).split()) == len(words) - 2
    assert len(augment(BASE, random.Random(0), 0.1, ["insert"]).split()) == len(words) + 2
    assert sorted(augment(BASE, random.Random(0), 0.1, ["swap"]).split()) == sorted(words)
    with pytest.raises(ValueError, match="unknown augmentation op 'shout'"):
        augment(BASE, random.Random(0), 0.1, ["shout"])


def test_curation_and_augmentation_in_a_run_write_a_report(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": f"Document {i}: the cat sat on the mat number {i % 9} today."} for i in range(120)]
    lines += lines[:30]  # exact duplicates
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("# words we do not train on\nnumber 3\n")
    result = run_cli(
        "--experiment",
        "world",
        "--workdir",
        str(tmp_path / "run"),
        "--set",
        "data.source=jsonl",
        f"data.path={path}",
        "data.dedup=true",
        f"data.blocklist={blocklist}",
        "data.augment_copies=1",
        "model.n_layer=1",
        "model.d_model=32",
        "model.block_size=32",
        "train.batch_size=8",
        "train.max_steps=4",
        "eval.interval=4",
        "eval.iters=1",
        "eval.sample_tokens=0",
        "logging.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "run" / "data_report.json"))
    # Filters run in order: "number 3" hits 13 originals and 3 of the 30 repeats, so 27 repeats remain.
    assert report == {
        "malformed_lines_skipped": 0,
        "input": 150,
        "too_short": 0,
        "too_long": 0,
        "blocklisted": 16,
        "exact_duplicates": 27,
        "near_duplicates": 0,
        "kept": 107,
        "augmented_added": 96,
    }  # one copy of 90 % of 107
    assert read_metrics(str(tmp_path / "run"))[-1]["step"] == 4
