"""Tokenize a corpus once into sharded token files that `data.source=tokens` streams from disk.

    python -m flaxgpt.data.prepare --out DIR --text a.txt b.txt   (or --jsonl / --conversations FILE..., --tfds NAME)
        [--val FILE...] [--val-fraction 0.01] [--tokenizer char|sentencepiece] [--spm-model M.model]
        [--tokenizer-from RUN_OR_DIR] [--workers N] [--shard-mb 256] [--chunk-mb 4] [--on-error skip]

The inputs are cut into chunks (at line boundaries, or ranges of TFDS records) that worker
processes tokenize in parallel; the chunks come back in order, so the output does not depend
on the worker count. JSONL and TFDS documents end in EOS; a text file is one stream ending in
EOS. DIR receives flat little-endian uint16 token files (uint32 past 65,536 ids),
`train-00000.bin`, ..., `val-00000.bin`, ..., the tokenizer, and manifest.json (each shard's
token count, byte size and sha256), written last: its presence means the corpus is complete.

--conversations FILE... (JSONL of {"messages": [...]}, with --tokenizer-from the run SFT starts
from) writes SFT's rows instead: each conversation rendered by the chat template (special
tokens only from the template, never from the text), weighted on assistant tokens
(--loss-on), packed or padded (--packing) into rows of --block-size exactly as SFT does in
memory (a chunk's last row is padded: a conversation never continues into another chunk's
rows). Shards then hold whole rows of fixed width, and the manifest's "rows" records how they
were made, which SFT with data.source=tokens checks against its config. --rankings FILE...
(rankings or pairs JSONL) does the same for the reward model: rows of up to --ranking-k
responses, each padded to --block-size. --pairs FILE... (pairs, or rankings expanded to every
better/worse pair) and --feedback FILE... write the rows DPO / ORPO and KTO read
(`flaxgpt.preference`), each response padded to --block-size.

Why flat token files rather than ArrayRecord: a training window is then one pread at a
computed offset (no record index, no decoding, no per-record framing), the same files serve
any block size, and numpy or nanoGPT read them as they are.

Resumable: a shard is written as *.tmp and renamed once complete and fsynced; progress.json
records the finished shards and the chunk to continue from. Interrupted, the same command
continues there; a *.tmp left by a kill is discarded and redone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np

from flaxgpt import cli, fileio
from flaxgpt.config import RANGES
from flaxgpt.conversations import conversation_example
from flaxgpt.data.jsonl import DataError, _decode, _parse
from flaxgpt.data.packing import build_rows
from flaxgpt.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

MANIFEST, PROGRESS = "manifest.json", "progress.json"
FORMAT = "flaxgpt-tokens-1"
Chunk = tuple  # ("text" | "jsonl", path, start, stop, last) or ("tfds", name, split, data_dir, key, start, stop)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- chunks


def file_chunks(kind: str, path: str, chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of about chunk_bytes that end at a line end (the last one at the file's end)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; expected a {kind} file")
    size, chunks, start = os.path.getsize(path), [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()
            stop = min(f.tell(), size) if start + chunk_bytes < size else size
            chunks.append((kind, path, start, stop, stop == size))
            start = stop
    return chunks


def tfds_chunks(name: str, split: str, data_dir: str, key: str, records: int) -> list[Chunk]:
    from flaxgpt.data.tfds_source import _tfds

    n = len(_tfds().data_source(name, split=split, data_dir=data_dir or None))
    return [("tfds", name, split, data_dir, key, i, min(i + records, n)) for i in range(0, n, records)]


# a JSONL kind's schema, and what a record of it yields (None: the whole record)
_SCHEMAS = {"jsonl": "text", "conversations": "conversations", "rankings": "rankings", "pairs": "rankings"}
_SCHEMAS["feedback"] = "feedback"
_FIELDS = {"jsonl": "text", "conversations": "messages", "rankings": None, "pairs": None, "feedback": None}


def _parse_record(text: str, kind: str) -> tuple[object, str | None]:
    """(what a record of this kind yields, problem or None); rankings may be pairs, line by line."""
    record, problem = _parse(text, _SCHEMAS[kind])
    if problem is not None and kind in ("rankings", "pairs") and '"chosen"' in text:
        record, problem = _parse(text, "pairs")
    if problem is not None:
        return None, problem
    return (record if _FIELDS[kind] is None else record[_FIELDS[kind]]), None


def chunk_documents(chunk: Chunk, on_error: str, report: dict) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of one chunk (a conversation's messages for that kind); bad
    lines or records raise DataError or are counted."""

    def reject(where: str) -> None:
        if on_error == "raise":
            raise DataError(where + " (--on-error skip skips it)")
        report["skipped"] += 1
        report.setdefault("first", where)

    if chunk[0] == "tfds":
        from flaxgpt.data.tfds_source import _text_of, _tfds

        _, name, split, data_dir, key, start, stop = chunk
        source = _tfds().data_source(name, split=split, data_dir=data_dir or None)
        for i in range(start, stop):
            text, problem = _text_of(source[i][key])
            if problem is None:
                yield text, True
            else:
                reject(f"TFDS dataset '{name}' split '{split}' record {i}: feature '{key}' {problem}")
        return
    kind, path, start, stop, last = chunk
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(stop - start)
    if kind == "text":  # the usual case, decoded in one piece
        try:
            text = raw.decode("utf-8-sig" if start == 0 else "utf-8")
            yield text.replace("\r\n", "\n").replace("\r", "\n"), False
            yield "", last
            return
        except UnicodeDecodeError:
            pass
    offset = start
    for line in raw.splitlines(keepends=True):
        text, problem = _decode(line, offset == 0)
        where = f"{path}: line at byte {offset}"
        offset += len(line)
        if problem is None and kind != "text":
            if not text.strip():
                continue
            text, problem = _parse_record(text, kind)
        if problem is not None:
            reject(f"{where}: {problem}")
        elif kind != "text":
            yield text, True
        else:
            yield text.replace("\r\n", "\n").replace("\r", "\n"), False
    yield "", kind == "text" and last


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(out: str, on_error: str, rows: dict | None = None) -> None:
    _WORKER.update(tokenizer=load_tokenizer(out), on_error=on_error, rows=rows)


def tokenize_chunk(chunk: Chunk) -> tuple[np.ndarray, dict]:
    """The tokens of one chunk (EOS after every document) and its counts; for conversations,
    the bytes of its rows."""
    if chunk[0] in ROW_KINDS:
        return rows_chunk(chunk)
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    report = {"skipped": 0, "chars": 0, "documents": 0}
    ids: list[int] = []
    pending: list[str] = []  # text pieces of a text file, encoded together
    for text, ends in chunk_documents(chunk, _WORKER["on_error"], report):
        report["chars"] += len(text)
        if ends:
            ids.extend(tokenizer.encode("".join(pending) + text))
            ids.append(tokenizer.eos_id)
            report["documents"] += 1
            pending = []
        else:
            pending.append(text)
    if pending:
        ids.extend(tokenizer.encode("".join(pending)))
    return np.asarray(ids, np.int32), report


def _conversation_rows(opts: dict):
    """(item of one conversation, rows of items) as SFT makes them: rendered by the chat template,
    weighted on assistant tokens, packed without splitting one (or padded)."""
    block = opts["block_size"]
    item = lambda messages, tokenizer: conversation_example(messages, tokenizer, block, opts["loss_on"])
    rows = lambda items, tokenizer: build_rows(items, block, opts["packing"], tokenizer.pad_id, keep_whole=True)
    return item, rows


def _ranking_rows(opts: dict):
    """(item of one ranking or pair, rows of items) as the reward model reads them: up to --ranking-k
    responses a row, each padded to the block."""
    from flaxgpt.rewards import Ranking, ranking_rows, response_ids

    block, k = opts["block_size"], opts["k"]

    def item(record: dict, tokenizer: Tokenizer):
        ranking = Ranking.from_record(record)
        if len(ranking.responses) > k:
            raise ValueError(f"{len(ranking.responses)} responses, more than --ranking-k {k}")
        for response in ranking.responses:
            response_ids(ranking.prompt, response, tokenizer, block)  # (a ValueError if it cannot fit)
        return ranking

    return item, lambda items, tokenizer: ranking_rows(items, tokenizer, block, k, width=block)


def _preference_rows(opts: dict):
    """(item of one record, rows of items) as DPO / ORPO (pairs; a ranking expanded to every
    better/worse pair) or KTO (feedback) read them, each response padded to the block. A KTO
    row's mismatched (kl_) response is the next record's within the same chunk."""
    from flaxgpt import preference

    block, pairs = opts["block_size"], opts["kind"] == "pairs"

    def item(record: dict, tokenizer: Tokenizer):
        if pairs:
            out = preference.pairs_from_records([record])
        else:
            out = [preference.feedback_of(record)]
        build(out, tokenizer)  # (a ValueError if a response cannot fit)
        return out

    def build(items: list, tokenizer: Tokenizer) -> dict:
        flat = [x for one in items for x in one] if items and isinstance(items[0], list) else items
        rows_of = preference.pair_rows if pairs else preference.feedback_rows
        return rows_of(flat, tokenizer, block, width=block)

    return item, build


ROW_KINDS = {
    "conversations": _conversation_rows,
    "rankings": _ranking_rows,
    "pairs": _preference_rows,
    "feedback": _preference_rows,
}


def row_layout(rows: dict[str, np.ndarray]) -> list[list]:
    """[key, dtype, shape of one row] of each array of `rows`, in the order a row's bytes hold them."""
    return [[k, v.dtype.newbyteorder("<").str, list(v.shape[1:])] for k, v in rows.items()]


def rows_chunk(chunk: Chunk) -> tuple[np.ndarray, dict]:
    """The rows of one chunk of records, as bytes: row after row, each the arrays of its
    `row_layout` one after the other."""
    tokenizer, on_error = _WORKER["tokenizer"], _WORKER["on_error"]
    item, build = ROW_KINDS[chunk[0]](_WORKER["rows"])
    report = {"skipped": 0, "chars": 0, "documents": 0}
    items = []
    for n, (record, _) in enumerate(r for r in chunk_documents(chunk, on_error, report) if r[0]):
        report["documents"] += 1
        try:
            items.append(item(record, tokenizer))
        except ValueError as e:
            where = f"{chunk[1]}: record {n} of the chunk at byte {chunk[2]}: {e}"
            if on_error == "raise":
                raise DataError(where + " (--on-error skip skips it)") from e
            report["skipped"] += 1
            report.setdefault("first", where)
    rows = build(items, tokenizer)
    n = len(next(iter(rows.values())))
    parts = [rows[k].astype(dt).reshape(n, int(np.prod(shape))).view(np.uint8) for k, dt, shape in row_layout(rows)]
    return np.concatenate(parts, axis=1).ravel(), report


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends tokens to numbered shards of one split; a shard becomes visible only when complete."""

    def __init__(self, out: str, split: str, dtype: np.dtype, shard_tokens: int, done: list[dict]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.done = done  # finished shards (manifest entries)
        self.file = None

    def add(self, tokens: np.ndarray) -> bool:
        """Append; True when that completed a shard (a resume point)."""
        if self.file is None:
            self.name = f"{self.split}-{len(self.done):05d}.bin"
            self.file = open(os.path.join(self.out, self.name + ".tmp"), "wb")
            self.digest, self.tokens = hashlib.sha256(), 0
        data = tokens.astype(self.dtype).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.tokens += len(tokens)
        if self.tokens >= self.shard_tokens:
            self.finish()
            return True
        return False

    def finish(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(os.path.join(self.out, self.name + ".tmp"), os.path.join(self.out, self.name))
        nbytes = self.tokens * self.dtype.itemsize
        self.done.append({"file": self.name, "tokens": self.tokens, "bytes": nbytes, "sha256": self.digest.hexdigest()})


def tokenizer_sha256(out: str) -> str:
    """One fingerprint of the tokenizer files in `out` (every file but shards and manifests)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(out)):
        if name not in (MANIFEST, PROGRESS) and not name.endswith((".bin", ".tmp")):
            digest.update(name.encode() + b"\0" + file_sha256(os.path.join(out, name)).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """`tokenizer_sha256` of the files `tokenizer.save` writes: the same for the same tokenizer
    wherever it is saved (a run's workdir holds other files too)."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save(directory)
        return tokenizer_sha256(directory)


def make_tokenizer(args: argparse.Namespace, train: list[Chunk]) -> Tokenizer:
    """The tokenizer saved in --out already (a resumed job), or the one asked for, saved there."""
    existing = load_tokenizer(args.out)
    if existing is not None:
        return existing
    rows = row_options(args)
    if rows is not None and not args.tokenizer_from:
        which = "--" + rows["kind"]
        raise DataError(f"{which} needs --tokenizer-from: the run (or directory) whose tokenizer the trainer uses")
    if args.tokenizer_from:
        tokenizer = load_tokenizer(args.tokenizer_from)
        if tokenizer is None:
            raise DataError(f"{args.tokenizer_from}: holds no flaxgpt tokenizer (tokenizer.json / tokenizer.model)")
    elif args.tokenizer == "char":
        report = {"skipped": 0}
        chars = set()
        for chunk in train:
            for text, _ in chunk_documents(chunk, args.on_error, report):
                chars.update(text)
        tokenizer = CharTokenizer.from_text("".join(sorted(chars)))
    elif args.spm_model and os.path.exists(args.spm_model):
        tokenizer = SentencePieceTokenizer(args.spm_model)
    else:
        lines, report = [], {"skipped": 0}
        for chunk in train:  # the first --spm-sample-mb of the training chunks
            for text, _ in chunk_documents(chunk, args.on_error, report):
                lines.extend(text.splitlines(keepends=True))
            if sum(map(len, lines)) >= args.spm_sample_mb * 1e6:
                break
        model = train_sentencepiece(lines, os.path.join(args.out, "tokenizer"), args.spm_vocab_size, "bpe")
        tokenizer = SentencePieceTokenizer(model)
    tokenizer.save(args.out)
    return tokenizer


# ----------------------------------------------------------------------------- the job


def plan(args: argparse.Namespace) -> dict[str, list[Chunk]]:
    """The chunks of each split, in order."""
    size = max(int(args.chunk_mb * 1e6), 1)
    if args.tfds:
        per = max(int(args.chunk_mb * 1000), 1)  # about a kB per record
        train = tfds_chunks(args.tfds, args.tfds_split, args.tfds_data_dir, args.tfds_text_key, per)
        val = tfds_chunks(args.tfds, args.tfds_val_split, args.tfds_data_dir, args.tfds_text_key, per)
        return {"train": train, "val": val}
    kinds = (("jsonl", args.jsonl), ("conversations", args.conversations), ("rankings", args.rankings))
    kinds += (("pairs", args.pairs), ("feedback", args.feedback), ("text", args.text))
    kind, files = next((k, f) for k, f in kinds if f)
    train = [c for path in files for c in file_chunks(kind, path, size)]
    if args.val:
        return {"train": train, "val": [c for path in args.val for c in file_chunks(kind, path, size)]}
    held = math.ceil(len(train) * args.val_fraction)
    if len(train) < 2 or held >= len(train):
        raise DataError(
            f"{files[0]}: {len(train)} chunk(s) of --chunk-mb {args.chunk_mb} cannot be split into train and "
            "validation; lower --chunk-mb or pass --val"
        )
    return {"train": train[: len(train) - held], "val": train[len(train) - held :]}


def fingerprint(args: argparse.Namespace, chunks: dict[str, list[Chunk]]) -> str:
    """What the output depends on: the inputs (size, mtime), the cut and the tokenizer's choice."""
    files = sorted({c[1] for cs in chunks.values() for c in cs if c[0] != "tfds"})
    key = {
        "chunks": chunks,
        "inputs": {f: [os.path.getsize(f), os.path.getmtime(f)] for f in files},
        "shard_mb": args.shard_mb,
        "tokenizer": [args.tokenizer, args.spm_model, args.spm_vocab_size, args.tokenizer_from],
        "on_error": args.on_error,
        "rows": row_options(args),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()


def row_options(args: argparse.Namespace) -> dict | None:
    """How records become rows (what the trainer's config must then agree with); None for text."""
    if args.conversations:
        return {
            "kind": "conversations",
            "block_size": args.block_size,
            "loss_on": args.loss_on,
            "packing": args.packing,
        }
    if args.rankings:
        return {"kind": "rankings", "block_size": args.block_size, "k": args.ranking_k}
    if args.pairs or args.feedback:
        return {"kind": "pairs" if args.pairs else "feedback", "block_size": args.block_size}
    return None


def _resume_state(out: str, key: str) -> dict:
    """What a previous, interrupted run of this same job finished (nothing for a fresh one)."""
    for name in os.listdir(out):
        if name.endswith(".tmp"):  # a shard cut short by a kill: redone
            os.remove(os.path.join(out, name))
    path = os.path.join(out, PROGRESS)
    if not os.path.exists(path):
        if any(n.endswith(".bin") for n in os.listdir(out)):
            raise DataError(f"{out}: holds shards but no {PROGRESS}; use an empty --out directory")
        return {"fingerprint": key, "splits": {}, "next": {}, "totals": {"chars": 0, "documents": 0, "skipped": 0}}
    with open(path) as f:
        state = json.load(f)
    if state["fingerprint"] != key:
        raise DataError(f"{out}: holds an interrupted preparation of other inputs or options; use another --out")
    return state


def _write_splits(args: argparse.Namespace, chunks: dict, state: dict, dtype: np.dtype, workers: int, log) -> None:
    """Tokenize the chunks not yet done (in worker processes) into shards, recording progress
    in `state` (and progress.json) at every finished shard."""
    init = (args.out, args.on_error, row_options(args))
    pool = multiprocessing.Pool(workers, _init_worker, init) if workers > 0 else None
    if pool is None:
        _init_worker(*init)
    totals = state["totals"]
    try:
        for split, todo in chunks.items():
            done = state["splits"].setdefault(split, [])
            first = state["next"].get(split, 0)
            writer = ShardWriter(args.out, split, dtype, max(int(args.shard_mb * 1e6) // dtype.itemsize, 1), done)
            mapped = (pool.imap if pool else map)(tokenize_chunk, todo[first:])
            for i, (tokens, report) in enumerate(mapped, start=first + 1):
                for k in totals:
                    totals[k] += report.get(k, 0)
                if report["skipped"]:
                    log(f"skipped: {report['first']}")
                if writer.add(tokens) or i == len(todo):
                    writer.finish()
                    state["next"][split] = i
                    fileio.write_atomic(os.path.join(args.out, PROGRESS), json.dumps(state))
    finally:
        if pool is not None:
            pool.terminate()


def prepare(args: argparse.Namespace, log=print) -> dict:
    """Run (or continue, or confirm) the job; returns the manifest."""
    fileio.makedirs(args.out)
    chunks = plan(args)
    key = fingerprint(args, chunks)
    manifest_path = os.path.join(args.out, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") != key:
            raise DataError(f"{args.out}: already holds a corpus prepared from other inputs or options")
        log(f"{args.out}: already prepared")
        return manifest
    state = _resume_state(args.out, key)
    tokenizer = make_tokenizer(args, chunks["train"])
    dtype = np.dtype("<u2" if tokenizer.vocab_size <= 1 << 16 else "<u4")
    rows = row_options(args)
    if rows is not None:  # rows are bytes: shards end between rows, as chunks do
        dtype = np.dtype("u1")
        layout = row_layout(ROW_KINDS[rows["kind"]](rows)[1]([], tokenizer))  # (an empty set of rows)
        rows.update(layout=layout, tokenizer=tokenizer_fingerprint(tokenizer))
    start = time.perf_counter()
    workers = args.workers if args.workers is not None else os.cpu_count() or 1
    _write_splits(args, chunks, state, dtype, workers, log)
    totals = state["totals"]
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "dtype": dtype.str,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer_sha256(args.out),
        "fingerprint": key,
        "splits": state["splits"],
        "counts": {**totals, "seconds": round(seconds, 3), "workers": workers},
        **({"rows": rows} if rows else {}),
    }
    fileio.write_atomic(manifest_path, json.dumps(manifest, indent=1))
    if os.path.exists(os.path.join(args.out, PROGRESS)):
        os.remove(os.path.join(args.out, PROGRESS))
    tokens = {s: sum(e["tokens"] for e in v) for s, v in state["splits"].items()}
    log(
        f"{args.out}: {tokens} tokens in {sum(map(len, state['splits'].values()))} shards, "
        f"{totals['documents']} documents, {totals['skipped']} skipped, {seconds:.1f} s with {workers} worker(s)"
    )
    return manifest


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxgpt.data.prepare", description=__doc__)
    p.add_argument("--out", required=True, help="directory to write (resumed if interrupted)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", nargs="+", help="UTF-8 text files (each one stream)")
    inputs.add_argument("--jsonl", nargs="+", help='JSONL files of {"text": ...} documents')
    inputs.add_argument("--tfds", help="a prepared TFDS dataset name (array_record)")
    inputs.add_argument(
        "--conversations", nargs="+", help='JSONL files of {"messages": [...]} for SFT (data.source=tokens)'
    )
    inputs.add_argument(
        "--rankings", nargs="+", help="JSONL rankings or pairs for the reward model (data.source=tokens)"
    )
    inputs.add_argument(
        "--pairs", nargs="+", help="JSONL pairs or rankings (expanded to pairs) for DPO / ORPO (data.source=tokens)"
    )
    inputs.add_argument("--feedback", nargs="+", help="JSONL thumbs-up/down feedback for KTO (data.source=tokens)")
    p.add_argument("--val", nargs="+", help="validation files (default: the last --val-fraction of the chunks)")
    p.add_argument("--val-fraction", type=cli.ranged(float, "(0, 1)"), default=0.01)
    p.add_argument("--tfds-data-dir", default="")
    p.add_argument("--tfds-split", default="train")
    p.add_argument("--tfds-val-split", default="validation")
    p.add_argument("--tfds-text-key", default="text")
    p.add_argument("--tokenizer", choices=("char", "sentencepiece"), default="sentencepiece")
    p.add_argument("--spm-model", default="", help="an existing SentencePiece .model (else one is trained)")
    p.add_argument("--spm-vocab-size", type=cli.ranged(int, RANGES["data.spm_vocab_size"]), default=4096)
    p.add_argument(
        "--spm-sample-mb", type=cli.ranged(float, "> 0"), default=20.0, help="text a new SentencePiece model trains on"
    )
    p.add_argument("--tokenizer-from", default="", help="a run's workdir (or directory) whose tokenizer to use")
    p.add_argument(
        "--workers",
        type=cli.ranged(int, ">= 0"),
        default=None,
        help="tokenizing processes (default: CPUs; 0: in-process)",
    )
    p.add_argument("--shard-mb", type=cli.ranged(float, "> 0"), default=256.0, help="shard size in MB of tokens")
    p.add_argument(
        "--chunk-mb", type=cli.ranged(float, "> 0"), default=4.0, help="input MB one worker tokenizes at a time"
    )
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    rows = p.add_argument_group("conversations and rankings: rows, as the trainer's config must then say")
    rows.add_argument(
        "--block-size", type=cli.ranged(int, RANGES["model.block_size"]), default=1024, help="model.block_size"
    )
    rows.add_argument(
        "--ranking-k", type=cli.ranged(int, ">= 2"), default=2, help="responses a ranking row holds (pairs: 2)"
    )
    rows.add_argument("--loss-on", choices=("all", "last"), default="all", help="sft.loss_on")
    rows.add_argument("--packing", choices=("pack", "pad"), default="pack", help="data.packing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prepare(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
