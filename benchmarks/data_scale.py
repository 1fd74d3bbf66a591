"""Data at scale: does a training process's memory stay flat as the corpus grows, how fast is
the streaming reader, and how fast is pre-tokenization?

    python benchmarks/data_scale.py [--small-mb 10] [--factor 10] [--workers 2]

Corpora are generated locally by repeating tiny shakespeare to SMALL and SMALL x FACTOR MB of
text (character tokenizer: 2 bytes of uint16 shard per character). For each size a fresh
process reads 50 GPT-2 batches (32 x 1024) and reports its peak RSS, both from token shards
(data.source=tokens) and through today's in-memory text path (data.source=text). Input
throughput is tokens/s of one reader thread building batches of its rows (through the
mixture and epoch permutation, pread from the shards); pre-tokenization is MB of text per
second per worker, against the tokenizer's own encode speed. Appends a section to
benchmarks/RESULTS.md.
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


def _child(kind: str, path: str, workdir: str) -> None:
    """Read BATCHES batches the way a trainer does, then print peak RSS (MB) and tokens/s."""
    from flaxgpt import config as C
    from flaxgpt import host_allocator

    host_allocator.tune_host_allocator()  # as the training CLIs do: freed batch buffers reused, not faulted in anew

    source = "tokens" if kind == "tokens" else "text"
    cfg = C.Config(
        model=C.ModelConfig(block_size=BLOCK),
        data=C.DataConfig(source=source, path=path, tokenizer="char"),
        train=C.TrainConfig(batch_size=BATCH),
    )
    if source == "tokens":
        from flaxgpt.data.stream import build_token_data as build
    else:
        from flaxgpt.data.text import build_text_data as build
    _, data = build(cfg, workdir)
    for step in range(WARMUP):  # first reads: shards opened and their sha256 verified once
        data.batch("train", step, BATCH, BLOCK)
    start = time.perf_counter()
    for step in range(WARMUP, BATCHES):
        data.batch("train", step, BATCH, BLOCK)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mb": peak, "tokens_per_s": (BATCHES - WARMUP) * BATCH * BLOCK / seconds}))


def _measure(kind: str, path: str, tmp: str) -> dict:
    workdir = tempfile.mkdtemp(dir=tmp)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, path, workdir],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )
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
    parser.add_argument("--small-mb", type=float, default=10.0)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    from flaxgpt.data.tokenizers import load_tokenizer

    lines = [
        f"## data_scale — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        f"command: `python benchmarks/data_scale.py --small-mb {args.small_mb:g} --factor {args.factor} "
        f"--workers {args.workers}`",
        "",
        f"Peak RSS of a process reading {BATCHES} batches of {BATCH} x {BLOCK} (char tokenizer, tiny "
        "shakespeare repeated); input tokens/s of one reader thread:",
        "",
        "| text MB | token shards MB | prepare MB/s per worker | source | peak RSS MB | tokens/s | x 470k |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        chars = os.path.join(tmp, "chars")  # the character vocabulary, built once
        _prepare(SHAKESPEARE, chars, 0, "--tokenizer", "char")
        speeds = []
        for mb in (args.small_mb, args.small_mb * args.factor):
            text = _corpus(tmp, mb)
            out = os.path.join(tmp, f"tokens-{mb:g}")
            speeds.append(_prepare(text, out, args.workers, "--tokenizer-from", chars))
            shards = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".bin")) / 1e6
            for kind, path in (("tokens", out), ("text", text)):
                r = _measure(kind, path, tmp)
                lines.append(
                    f"| {mb:g} | {shards:.0f} | {speeds[-1]:.2f} | {kind} | {r['rss_mb']:.0f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / H100_GPT2_TOKENS_PER_S:.1f} |"
                )
                print(lines[-1], flush=True)
            if mb == args.small_mb:
                small = text
        sample = open(small, encoding="utf-8").read()
        char_encode = _encode_speed(load_tokenizer(chars), sample)
        trained = os.path.join(tmp, "spm-trained")  # train the model once, then time the preparation alone
        _prepare(small, trained, args.workers, "--spm-vocab-size", "4096", "--spm-sample-mb", "2")
        spm_out = os.path.join(tmp, "spm")
        spm_speed = _prepare(small, spm_out, args.workers, "--spm-model", os.path.join(trained, "tokenizer.model"))
        spm_encode = _encode_speed(load_tokenizer(spm_out), sample)
    lines += [
        "",
        f"Pre-tokenization of {args.small_mb:g} MB with {args.workers} worker processes, MB of text/s per worker:",
        "",
        "| tokenizer | prepare MB/s per worker | tokenizer.encode alone MB/s |",
        "|---|---|---|",
        f"| char | {speeds[0]:.2f} | {char_encode:.2f} |",
        f"| SentencePiece BPE 4096 | {spm_speed:.2f} | {spm_encode:.2f} |",
    ]
    print("\n".join(lines[-6:]))
    record("\n".join(lines))


if __name__ == "__main__":
    main()
