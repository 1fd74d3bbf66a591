"""Pre-tokenized token shards: prepare (parallel, resumable, checksummed), the streaming reader,
mixtures, and pretraining from them with a bit-exact resume after SIGKILL."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flaxgpt.data import prepare as P
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.stream import Mixture, TokenSource, TokenStream, block_counts, permute
from flaxgpt.data.tokenizers import load_tokenizer
from flaxgpt.logging import read_metrics
from tests.conftest import REPO, SHAKESPEARE, run_cli
from tests.test_checkpoint_resume import KILLED_RUN

pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tiny shakespeare not found")


def _prepare(out, *extra, text=SHAKESPEARE, workers=0):
    args = P.parser().parse_args(
        ["--out", str(out), "--text", text, "--tokenizer", "char", "--chunk-mb", "0.05", "--shard-mb", "0.3"]
        + ["--val-fraction", "0.1", "--workers", str(workers), *extra]
    )
    return P.prepare(args, log=lambda _: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tiny shakespeare prepared by two worker processes."""
    out = tmp_path_factory.mktemp("tokens") / "shakespeare"
    _prepare(out, workers=2)
    return str(out)


def _tokens(directory, split):
    manifest = json.load(open(os.path.join(directory, P.MANIFEST)))
    return np.concatenate([np.fromfile(os.path.join(directory, e["file"]), "<u2") for e in manifest["splits"][split]])


def test_prepared_tokens_are_the_tokenizers_and_resume_after_interruption(corpus, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(corpus)
    text = open(SHAKESPEARE, encoding="utf-8").read()
    whole = np.concatenate([_tokens(corpus, "train"), _tokens(corpus, "val")])
    np.testing.assert_array_equal(whole, tokenizer.encode(text) + [tokenizer.eos_id])
    manifest = json.load(open(os.path.join(corpus, P.MANIFEST)))
    assert len(manifest["splits"]["train"]) >= 3 and manifest["counts"]["workers"] == 2

    # Interrupted after 13 chunks (some shards finished, one half-written), then run again.
    calls = {"n": 0}
    real = P.tokenize_chunk

    def dies(chunk):
        calls["n"] += 1
        if calls["n"] > 13:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(P, "tokenize_chunk", dies)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _prepare(out)
    assert not os.path.exists(out / P.MANIFEST) and os.path.exists(out / P.PROGRESS)
    assert any(n.endswith(".tmp") for n in os.listdir(out))
    monkeypatch.setattr(P, "tokenize_chunk", real)
    calls["n"] = 0
    again = _prepare(out)
    assert again["splits"] == manifest["splits"]  # same shards, same sha256, whatever the worker count
    for key in ("chars", "documents", "skipped"):  # counts carried over the interruption
        assert again["counts"][key] == manifest["counts"][key], key
    assert not os.path.exists(out / P.PROGRESS)
    # A different job into the same directory is refused.
    with pytest.raises(DataError, match="other inputs or options"):
        _prepare(out, "--shard-mb", "0.2")


def test_prepare_trains_a_sentencepiece_model_whose_tokens_round_trip(tmp_path):
    out = tmp_path / "spm"
    args = ["--tokenizer", "sentencepiece", "--spm-vocab-size", "512", "--spm-sample-mb", "0.2"]
    manifest = _prepare(out, *args)
    assert manifest["vocab_size"] == 512 and os.path.exists(out / "tokenizer.model")
    tokenizer = load_tokenizer(str(out))
    whole = np.concatenate([_tokens(str(out), "train"), _tokens(str(out), "val")])
    assert tokenizer.decode(whole.tolist()) == open(SHAKESPEARE, encoding="utf-8").read() + "<|eos|>"


def test_feistel_permutation_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 1000, 4097):
        out = permute(np.arange(n), n, np.arange(4, dtype=np.uint64))
        assert sorted(out.tolist()) == list(range(n))


def test_mixture_proportions_and_source_positions():
    weights = [0.7, 0.2, 0.1]
    mix = Mixture(weights, seed=3)
    source, index = mix.locate(np.arange(10_000))
    realised = np.bincount(source, minlength=3) / 10_000
    np.testing.assert_allclose(realised, weights, atol=0.01)
    for k in range(3):  # each source is read in order: indices 0, 1, 2, ... with no gap or repeat
        assert sorted(index[source == k].tolist()) == list(range(int((source == k).sum())))
    np.testing.assert_array_equal(mix.consumed(10_000), np.bincount(source, minlength=3))
    # a process asking for any subset of rows gets the same answer (pure function of the row)
    some = np.arange(4000, 7000, 7)
    again = Mixture(weights, seed=3).locate(some)
    np.testing.assert_array_equal(again[0], source[some])
    np.testing.assert_array_equal(again[1], index[some])
    assert block_counts([1, 1, 1], 1024).sum() == 1024


def test_stream_epochs_cover_every_window_once(corpus):
    source = TokenSource(corpus, "val", 64)
    stream = TokenStream([source], [1.0], seed=0)
    n = source.windows
    rows = stream.windows(np.arange(2 * n))
    every = source.read(np.arange(n))
    for epoch in (rows[:n], rows[n:]):  # every window once per epoch, in a fresh order
        assert sorted(map(bytes, epoch.astype(np.int32))) == sorted(map(bytes, every))
    assert not np.array_equal(rows[:n], rows[n:])
    where = stream.position(3, n)  # what checkpoints record: per source rows, tokens, epoch
    assert where["sources"]["shakespeare"] == {"path": corpus, "rows": 3 * n, "tokens": 3 * n * 64, "epoch": 3}


def test_missing_truncated_and_corrupt_shards(corpus, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    names = [e["file"] for e in json.load(open(bad / P.MANIFEST))["splits"]["train"]]
    os.remove(bad / names[0])
    with pytest.raises(DataError, match=f"{names[0]}: missing shard"):
        TokenSource(str(bad), "train", 64)
    shutil.copy(os.path.join(corpus, names[0]), bad / names[0])
    with open(bad / names[1], "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=f"{names[1]}: 100 bytes, the manifest says [0-9]+ .half-written"):
        TokenSource(str(bad), "train", 64)
    shutil.copy(os.path.join(corpus, names[1]), bad / names[1])
    with open(bad / names[2], "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    source = TokenSource(str(bad), "train", 64)  # the checksum is verified on first read
    with pytest.raises(DataError, match=f"{names[2]}: sha256 differs"):
        source.read(np.arange(source.windows))
    os.remove(bad / names[0])
    skipping = TokenSource(str(bad), "train", 64, on_error="skip")
    assert len(skipping.skipped) == 2 and len(skipping.shards) == len(names) - 2
    assert skipping.read(np.arange(skipping.windows)).shape == (skipping.windows, 65)


TINY = [
    "model.recipe=llama",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_kv_heads=1",
    "model.d_model=32",
    "model.d_ff=64",
    "model.block_size=32",
    "model.vocab_size=0",
    "model.vocab_multiple=8",
    "model.dtype=float32",
    "model.scan_layers=false",
    "model.remat=none",
    "train.batch_size=8",
    "train.grad_accum_steps=1",
    "train.max_steps=24",
    "train.log_interval=1",
    "optimizer.warmup_steps=2",
    "eval.interval=12",
    "eval.iters=1",
    "eval.sample_tokens=4",
    "checkpoint.every_steps=12",
    "checkpoint.async_save=false",
    "logging.progress=plain",
    "logging.tensorboard=false",
]


def straight_and_killed(args: list[str], tmp_path, kill_at: int, resumed_from: int) -> tuple[list, list]:
    """metrics.jsonl rows of a run straight through and of one SIGKILLed after step `kill_at`,
    then resumed (from step `resumed_from`): the same steps."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    done = run_cli(*args, "--workdir", straight)
    assert done.returncode == 0, done.stderr[-3000:]
    died = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *args, "--workdir", killed],
        cwd=REPO,
        env={**os.environ, "KILL_AT": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode == -9, died.stderr[-3000:]
    resumed = run_cli(*args, "--workdir", killed)
    assert resumed.returncode == 0 and f"resumed from step {resumed_from}" in resumed.stdout, resumed.stderr[-3000:]
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return a, b


@pytest.mark.slow
def test_mixture_pretraining_resumes_bit_exact_after_sigkill(corpus, tmp_path):
    """Two sources (one tiny enough to pass several epochs) through the 1B mixture experiment."""
    small = tmp_path / "small.txt"
    small.write_text(open(SHAKESPEARE, encoding="utf-8").read()[:1500], encoding="utf-8")
    second = tmp_path / "second"  # 37 training windows: 96 rows of it pass 2.6 epochs
    _prepare(second, "--tokenizer-from", corpus, "--chunk-mb", "0.0003", text=str(small))
    mixture = json.dumps([{"path": corpus, "weight": 0.5}, {"path": str(second), "weight": 0.5}])
    args = ["--experiment", "llama_1b_mixture", "--set", *TINY, f"data.mixture={mixture}"]
    a, b = straight_and_killed(args, tmp_path, kill_at=17, resumed_from=12)
    assert [r["step"] for r in a] == list(range(1, 25))
    for key in ("loss", "grad_norm", "val_loss", "tokens/shakespeare", "tokens/second"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    # each row counts the tokens every source has given so far, the resumed run's included
    for r in b:
        assert [r["tokens/shakespeare"], r["tokens/second"]] == (
            Mixture([0.5, 0.5], 0).consumed(r["step"] * 8) * 32
        ).tolist()
    # the killed run resumed inside the small source's third epoch (train.seed=0, 8 rows a step)
    assert Mixture([0.5, 0.5], seed=0).consumed(12 * 8)[1] > TokenSource(str(second), "train", 32).windows


def test_prepare_from_tfds_and_jsonl_documents_end_in_eos(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="TFDS is the optional extra")
    from flaxgpt.data.tfds_source import build_dataset, read_documents

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i}: {i % 7} owls."}) + "\n" for i in range(40)))
    data_dir = str(tmp_path / "tfds")
    name = build_dataset([str(docs)], [str(docs)], data_dir)
    common = ["--tokenizer", "char", "--workers", "0", "--chunk-mb", "0.01"]
    from_tfds = P.prepare(
        P.parser().parse_args(["--out", str(tmp_path / "a"), "--tfds", name, "--tfds-data-dir", data_dir, *common]),
        log=lambda _: None,
    )
    tokenizer = load_tokenizer(str(tmp_path / "a"))
    texts = read_documents(name, "train", data_dir)[0]  # TFDS's own (hashed) record order
    expected = [t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_id]]
    np.testing.assert_array_equal(_tokens(str(tmp_path / "a"), "train"), expected)
    assert from_tfds["counts"]["documents"] == 80
    from_jsonl = P.prepare(
        P.parser().parse_args(["--out", str(tmp_path / "b"), "--jsonl", str(docs), "--val", str(docs), *common]),
        log=lambda _: None,
    )
    assert from_jsonl["counts"]["documents"] == 80 and from_jsonl["vocab_size"] == tokenizer.vocab_size


def test_gpt2_124m_experiment_trains_from_a_stand_in_corpus(corpus, tmp_path, capsys):
    from flaxgpt.train import load_experiment
    from flaxgpt.trainers import pretrain

    tiny = [t for t in TINY if not t.startswith(("model.recipe", "model.n_kv", "model.d_ff", "model.scan", "model.r"))]
    cfg = load_experiment(
        "gpt2_124m",
        [
            *tiny,
            "model.n_layer=1",
            f"data.path={corpus}",
            "train.max_steps=2",
            "eval.interval=2",
            "eval.sample_tokens=0",
        ],
    )
    result = pretrain.run(cfg, str(tmp_path / "run"))
    assert result["step"] == 2 and np.isfinite(result["val_loss"]) and result["val_loss"] < 6
    rows = read_metrics(str(tmp_path / "run"))  # tokens consumed from the (one) source, cumulative
    assert [r["tokens/shakespeare"] for r in rows] == [8 * 32, 2 * 8 * 32]
    assert "  tokens:  shakespeare 512\n" in capsys.readouterr().out  # the closing block says them too


def test_mixture_config_errors_are_one_line():
    from flaxgpt.config import ConfigError
    from flaxgpt.train import load_experiment

    with pytest.raises(ConfigError, match=r"data.mixture\[1\] must be"):
        load_experiment("llama_1b_mixture", ['data.mixture=[{"path": "a", "weight": 1}, {"path": "b", "weight": 0}]'])
    with pytest.raises(ConfigError, match="needs data.path or data.mixture"):
        load_experiment("llama_1b_mixture", ["data.mixture=[]"])


# Each of two processes (2 CPU devices each; data parallel within and across them) loads only its rows of
# a mixture batch; gathered, they are the batch one process builds alone.
_ROWS_WORKER = r"""
import json, sys
import jax, numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from flaxgpt.config import apply_overrides
from flaxgpt.data.stream import build_token_data
from flaxgpt.train import load_experiment
from flaxgpt.trainers.scaffold import Runtime
cfg = load_experiment("llama_1b_mixture", json.loads(sys.argv[3]))
rt = Runtime.create(cfg, sys.argv[4])
_, data = build_token_data(cfg, sys.argv[4])
wholes = []
for step, size in ((5, 8), (85, 12)):  # (rows 1020-1031 of step 85 straddle a mixture block)
    rows = rt.rows(size)
    placed = rt.place(data.batch("train", step, size, 32, rows), size)
    with rt.context():
        wholes.append(np.asarray(multihost_utils.process_allgather(placed["targets"], tiled=True)))
    print("ROWS", jax.process_index(), size, rows.tolist())
if jax.process_index() == 0:
    np.savez(sys.argv[5], *wholes)
"""


def test_two_processes_each_read_only_their_rows(corpus, tmp_path):
    """Across processes too, a batch is the pure function of the step the resume relies on: at
    step 85 the small source is several epochs on and the rows (1020-1031) straddle a mixture block."""
    from tests.conftest import free_port

    small = tmp_path / "small.txt"
    small.write_text(open(SHAKESPEARE, encoding="utf-8").read()[:1500], encoding="utf-8")
    second = tmp_path / "second"
    _prepare(second, "--tokenizer-from", corpus, "--chunk-mb", "0.0003", text=str(small))
    mixture = json.dumps([{"path": corpus, "weight": 0.6}, {"path": str(second), "weight": 0.4}])
    overrides = json.dumps([*TINY, f"data.mixture={mixture}", "mesh.data=2", "mesh.dcn_data=2"])
    address, out = f"127.0.0.1:{free_port()}", str(tmp_path / "whole.npz")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ROWS_WORKER, address, str(i), overrides, str(tmp_path / "w"), out],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    rows = [line.split(" ", 3) for o, _ in results for line in o.splitlines() if line.startswith("ROWS")]
    for size in (8, 12):  # each process loads its half of the rows, no more
        mine = [json.loads(r[3]) for r in rows if r[2] == str(size)]
        assert len(mine) == 2 and sorted(mine[0] + mine[1]) == list(range(size)) and len(mine[0]) == size // 2
    from flaxgpt.config import Config, DataConfig, ModelConfig, TrainConfig
    from flaxgpt.data.stream import build_token_data

    cfg = Config(
        model=ModelConfig(block_size=32),
        data=DataConfig(source="tokens", mixture=json.loads(mixture)),
        train=TrainConfig(seed=0),
    )
    os.makedirs(tmp_path / "alone")
    _, alone = build_token_data(cfg, str(tmp_path / "alone"))
    whole = np.load(out)
    np.testing.assert_array_equal(whole["arr_0"], alone.batch("train", 5, 8, 32)["targets"])
    np.testing.assert_array_equal(whole["arr_1"], alone.batch("train", 85, 12, 32)["targets"])
    assert alone.position(85, 12)["sources"]["second"]["epoch"] >= 5  # the small source, epochs on


def test_a_missing_shard_stops_training_with_one_line(corpus, tmp_path, capsys):
    from flaxgpt import cli
    from flaxgpt.train import main

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    os.remove(bad / "val-00000.bin")
    code = cli.run(main, ["-e", "gpt2_124m", "--workdir", str(tmp_path / "run"), "--set", *TINY, f"data.path={bad}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "val-00000.bin: missing shard" in err and "data.on_error=skip" in err


def test_skipped_shards_are_counted_and_said_once(corpus, tmp_path, capsys):
    from flaxgpt.config import Config, DataConfig, ModelConfig
    from flaxgpt.data.stream import build_token_data

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    os.remove(bad / "train-00001.bin")
    cfg = Config(model=ModelConfig(block_size=32), data=DataConfig(source="tokens", path=str(bad), on_error="skip"))
    os.makedirs(tmp_path / "run")
    _, data = build_token_data(cfg, str(tmp_path / "run"))
    assert len(data.train.sources[0].skipped) == 1
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"{bad} [train]: 1 shard(s) skipped (first: {bad}/train-00001.bin: missing shard)"]
    assert data.batch("train", 3, 8, 32)["inputs"].shape == (8, 32)  # and training reads on without it
