"""Data at scale: does a training process's memory stay flat as the corpus grows, how fast is
the streaming reader, and how fast is pre-tokenization?

    nice python benchmarks/data_scale.py [--small-mb 200] [--factor 10] [--text-max-mb 400] [--workers 2]

Corpora are generated locally by repeating tiny shakespeare to SMALL and SMALL x FACTOR MB of
text (character tokenizer: 2 bytes of uint16 shard per character); they are deleted at the end.
For each size a fresh process first reads 30 GPT-2 batches (480 x 1024) the way a trainer does
(input tokens/s of that one reader: per worker), then trains a tiny model on the same data
for a few steps through `pretrain.run` (a real training process: JAX, the prefetch thread,
evaluation and the final checkpoint); its peak RSS is reported. Both from token shards
(data.source=tokens) and through the in-memory text path (data.source=text), the latter only
up to --text-max-mb (it holds the whole corpus several times over), at SMALL and 2 x SMALL to
show its trend. Pre-tokenization is MB of text per second per worker, against the tokenizer's
own encode speed. Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402

SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
H100_GPT2_TOKENS_PER_S = 470_000  # README: GPT-2 124M at 1024 on one H100
BATCH, BLOCK, BATCHES, WARMUP = 480, 1024, 30, 3  # nanoGPT's GPT-2 batch
TRAIN_STEPS = 6
TINY = [  # GPT-2's recipe at a size that trains a 32 x 1024 batch in about a second here
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "model.vocab_size=0",
    "model.vocab_multiple=8",
    "model.dtype=float32",
    "train.batch_size=32",
    "train.grad_accum_steps=1",
    f"train.max_steps={TRAIN_STEPS}",
    "train.log_interval=1",
    "optimizer.warmup_steps=1",
    f"eval.interval={TRAIN_STEPS}",
    "eval.iters=1",
    "eval.sample_tokens=0",
    "checkpoint.every_steps=1000",
    "checkpoint.async_save=false",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "logging.report=false",
    "data.tokenizer=char",
]


def _child(kind: str, path: str, workdir: str) -> None:
    """Read BATCHES batches as a trainer does (tokens/s), then train TRAIN_STEPS steps of a tiny
    model on the same source; print the peak RSS (MB) after each."""
    from flaxgpt import host_allocator
    from flaxgpt.train import load_experiment
    from flaxgpt.trainers import pretrain

    host_allocator.tune_host_allocator()  # as the training CLIs do: freed batch buffers reused, not faulted in anew
    cfg = load_experiment("gpt2_124m", [*TINY, f"data.source={kind}", f"data.path={path}"])
    if kind == "tokens":
        from flaxgpt.data.stream import build_token_data as build
    else:
        from flaxgpt.data.text import build_text_data as build
    os.makedirs(os.path.join(workdir, "reader"))
    _, data = build(cfg, os.path.join(workdir, "reader"))
    for step in range(WARMUP):  # first reads: shards opened and their sha256 verified once
        data.batch("train", step, BATCH, BLOCK)
    start = time.perf_counter()
    for step in range(WARMUP, BATCHES):
        data.batch("train", step, BATCH, BLOCK)
    seconds = time.perf_counter() - start
    read_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del data
    pretrain.run(cfg, os.path.join(workdir, "train"))
    train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens_per_s = (BATCHES - WARMUP) * BATCH * BLOCK / seconds
    print(json.dumps({"read_rss_mb": read_peak, "rss_mb": train_peak, "tokens_per_s": tokens_per_s}))


def _measure(kind: str, path: str, tmp: str) -> dict:
    workdir = tempfile.mkdtemp(dir=tmp)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, path, workdir],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )
    if out.returncode:
        sys.exit(f"the {kind} child on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _corpus(tmp: str, megabytes: float) -> str:
    text = open(SHAKESPEARE, encoding="utf-8").read()
    path = os.path.join(tmp, f"corpus-{megabytes:g}mb.txt")
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 1e6:
            f.write(text)
            written += len(text)
    return path


def _prepare(text: str, out: str, workers: int, *extra: str) -> float:
    """MB of text per second per worker of python -m flaxgpt.data.prepare."""
    from flaxgpt.data import prepare

    args = prepare.parser().parse_args(
        ["--out", out, "--text", text, "--workers", str(workers), "--shard-mb", "64", *extra]
        + ["--chunk-mb", str(min(2.0, os.path.getsize(text) / 20e6))]
    )
    start = time.perf_counter()
    prepare.prepare(args, log=lambda _: None)
    return os.path.getsize(text) / 1e6 / (time.perf_counter() - start) / max(workers, 1)


def _encode_speed(tokenizer, text: str) -> float:
    start = time.perf_counter()
    tokenizer.encode(text)
    return len(text.encode()) / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small-mb", type=float, default=200.0)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--text-max-mb", type=float, default=400.0, help="largest corpus for the in-memory path")
    parser.add_argument("--spm-mb", type=float, default=20.0, help="text the SentencePiece preparation is timed on")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    load = [f"{os.getloadavg()[0]:.1f}"]
    rows = [
        "| text MB | token shards MB | prepare MB/s per worker | source | reader peak RSS MB | training peak RSS MB "
        "| tokens/s per worker | x 470k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        chars = os.path.join(tmp, "chars")  # the character vocabulary, built once
        _prepare(SHAKESPEARE, chars, 0, "--tokenizer", "char")
        big = args.small_mb * args.factor
        speeds: dict[float, float] = {}
        for mb in sorted({args.small_mb, min(2 * args.small_mb, args.text_max_mb), big}):
            text, shards = _corpus(tmp, mb), 0.0
            kinds = (["tokens"] if mb in (args.small_mb, big) else []) + (["text"] if mb <= args.text_max_mb else [])
            if "tokens" in kinds:
                out = os.path.join(tmp, f"tokens-{mb:g}")
                speeds[mb] = _prepare(text, out, args.workers, "--tokenizer-from", chars)
                shards = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".bin")) / 1e6
            for kind in kinds:
                r = _measure(kind, out if kind == "tokens" else text, tmp)
                load.append(f"{os.getloadavg()[0]:.1f}")
                lead = f"| {mb:g} | {shards:.0f} | {speeds[mb]:.2f} |" if kind == "tokens" else f"| {mb:g} | - | - |"
                rows.append(
                    f"{lead} {kind} | {r['read_rss_mb']:.0f} | {r['rss_mb']:.0f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['tokens_per_s'] / H100_GPT2_TOKENS_PER_S:.1f} |"
                )
                print(rows[-1], flush=True)
            if mb != args.small_mb:
                os.remove(text)  # (the 2 GB text and its 4 GB of shards need not coexist with the next)
                if "tokens" in kinds:
                    subprocess.run(["rm", "-rf", out], check=True)
        char_speed, char_encode, spm_speed, spm_encode = _tokenizer_speeds(tmp, chars, args)
    lines = [
        f"## data_scale — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {' / '.join(load)} (at the start / after each child; a shared machine, run with nice)",
        f"command: `nice python benchmarks/data_scale.py --small-mb {args.small_mb:g} --factor {args.factor} "
        f"--text-max-mb {args.text_max_mb:g} --spm-mb {args.spm_mb:g} --workers {args.workers}`",
        "",
        f"Per corpus size, one fresh process: {BATCHES} batches of {BATCH} x {BLOCK} read as a trainer does "
        f"(tokens/s of that one reader), then {TRAIN_STEPS} steps of a tiny GPT-2 through pretrain.run "
        "(char tokenizer, tiny shakespeare repeated); peak RSS after each:",
        "",
        *rows,
        "",
        f"Pre-tokenization of {args.spm_mb:g} MB with {args.workers} worker processes, MB of text/s per worker:",
        "",
        "| tokenizer | prepare MB/s per worker | tokenizer.encode alone MB/s (one process) |",
        "|---|---|---|",
        f"| char | {char_speed:.2f} | {char_encode:.2f} |",
        f"| SentencePiece BPE 4096 | {spm_speed:.2f} | {spm_encode:.2f} |",
    ]
    print("\n".join(lines))
    record("\n".join(lines))


def _tokenizer_speeds(tmp: str, chars: str, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """(prepare MB/s per worker, encode MB/s) of the char tokenizer, then of a SentencePiece BPE
    4096 model (trained first, so that only the preparation is timed), on --spm-mb of text."""
    from flaxgpt.data.tokenizers import load_tokenizer

    small = _corpus(tmp, args.spm_mb)
    sample = open(small, encoding="utf-8").read()
    char_speed = _prepare(small, os.path.join(tmp, "char-speed"), args.workers, "--tokenizer-from", chars)
    char_encode = _encode_speed(load_tokenizer(chars), sample)
    trained = os.path.join(tmp, "spm-trained")
    _prepare(small, trained, args.workers, "--spm-vocab-size", "4096", "--spm-sample-mb", "2")
    spm_out = os.path.join(tmp, "spm")
    spm_speed = _prepare(small, spm_out, args.workers, "--spm-model", os.path.join(trained, "tokenizer.model"))
    return char_speed, char_encode, spm_speed, _encode_speed(load_tokenizer(spm_out), sample)


if __name__ == "__main__":
    main()
