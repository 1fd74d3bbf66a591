"""Pretraining data: a token stream sampled as random windows (nanoGPT style), or JSONL
documents packed into rows and shuffled per epoch.

Either way batches are a pure function of (seed, split, step): resuming at step k yields
exactly the batches an uninterrupted run sees, with no iterator state beyond the step
(checkpoints record the position for people to read), and every process builds only
its own rows of each global batch.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxgpt import fileio
from flaxgpt.config import Config
from flaxgpt.data import world as world_lib
from flaxgpt.data.curation import Curator, augment, load_blocklist, load_synonyms
from flaxgpt.data.jsonl import DataError, read_jsonl, read_text
from flaxgpt.data.packing import PackedRows, build_rows, document_example
from flaxgpt.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass
class TokenWindows:
    """Train and validation token arrays; `batch` draws windows of block_size + 1 tokens."""

    train: np.ndarray
    val: np.ndarray
    seed: int

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        return {"train_batches": step}

    def batch(
        self, split: str, step: int, batch_size: int, block_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Rows `rows` (default: all) of global batch number `step` of `split`.

        Keys (all [len(rows), block_size]): inputs, targets, loss_weights, segment_ids, positions.
        """
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= block_size + 1:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than "
                f"block_size + 2 = {block_size + 2}; use more text or a smaller block"
            )
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[split], step])
        starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
        if rows is not None:
            starts = starts[rows]
        window = tokens[starts[:, None] + np.arange(block_size + 1)]
        n = len(window)
        return {
            "inputs": window[:, :-1].astype(np.int32),
            "targets": window[:, 1:].astype(np.int32),
            "loss_weights": np.ones((n, block_size), np.float32),
            "segment_ids": np.ones((n, block_size), np.int32),
            "positions": np.broadcast_to(np.arange(block_size, dtype=np.int32), (n, block_size)).copy(),
        }


@dataclass
class DocumentRows:
    """JSONL or TFDS documents tokenized, packed (or padded) into rows, and shuffled per epoch."""

    train: PackedRows
    val: PackedRows

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        return self.train.position(step, batch_size)

    def batch(
        self, split: str, step: int, batch_size: int, block_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        return (self.train if split == "train" else self.val).batch(step, batch_size, rows)


def source_text(cfg: Config) -> str:
    """The raw text of the configured text or world source."""
    data = cfg.data
    if data.source == "world":
        world = world_lib.make_world(data.world_seed)
        return world_lib.corpus(world, data.world_documents, seed=data.world_seed, arithmetic=data.world_arithmetic)
    text, report = read_text(data.path, data.on_error)
    if report.skipped:
        _log(f"{data.path}: {report.skipped} lines that are not UTF-8 skipped (first: {report.problems[0]})")
    if not text:
        raise DataError(f"{data.path}: no text to train on; expected a UTF-8 text file")
    return text


def _documents(cfg: Config, workdir: str) -> tuple[list[str], list[str]]:
    """(train, val) documents of a JSONL or TFDS source, curated (and training ones augmented)
    as configured: val from its own file / split, or the last documents of the training one."""
    data = cfg.data
    curator = Curator(
        min_chars=data.min_chars,
        max_chars=data.max_chars,
        blocklist=load_blocklist(data.blocklist) if data.blocklist else (),
        exact_dedup=data.dedup,
        near_dedup=data.near_dedup,
        near_threshold=data.near_dedup_threshold,
    )

    skipped = 0

    def read(where: str) -> list[str]:
        nonlocal skipped
        if data.source == "tfds":
            from flaxgpt.data.tfds_source import read_documents

            docs, report = read_documents(data.tfds_name, where, data.tfds_data_dir, data.tfds_text_key, data.on_error)
            texts = docs
        else:
            docs, report = read_jsonl(where, "text", data.on_error)
            texts = [d["text"] for d in docs]
        _log(report.summary())
        skipped += report.skipped
        return texts

    first, second = (
        (data.tfds_train_split, data.tfds_val_split) if data.source == "tfds" else (data.path, data.val_path)
    )
    texts = curator(read(first))  # validation documents are curated against the same seen-set
    if second:
        train, val = texts, curator(read(second))
    else:
        cut = min(max(int(len(texts) * data.train_fraction), 1), len(texts) - 1)
        if cut < 1:
            raise DataError(
                f"{data.path}: {len(texts)} document(s) left after curation cannot be split into "
                "train and validation; add documents or set data.val_path"
            )
        train, val = texts[:cut], texts[cut:]
    if data.augment_copies:
        synonyms = load_synonyms(data.synonyms) if data.synonyms else None
        rng = random.Random(cfg.train.seed)
        extra = [
            augment(doc, rng, data.augment_rate, data.augment_ops, synonyms)
            for doc in train
            for _ in range(data.augment_copies)
        ]
        curator.report.augmented_added = len(extra)
        train = train + extra
    if not val:
        raise DataError(f"{data.val_path or data.path}: no validation documents left after curation")
    report = {"malformed_lines_skipped": skipped, **curator.report.as_dict()}
    _log("data: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    if jax.process_index() == 0:
        fileio.write_atomic(os.path.join(workdir, "data_report.json"), json.dumps(report, indent=2))
    return train, val


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def build_tokenizer(cfg: Config, text: str, train_text: str, workdir: str) -> Tokenizer:
    """The workdir's tokenizer if the run has one, else a new one (saved into the workdir)."""
    if jax.process_count() > 1:
        # Process 0 alone decides and builds; every process then meets at the barrier. (Had each
        # process looked for the file itself, a slow one could find what process 0 had just
        # written, skip the barrier, and wait at the next one under another name.)
        if jax.process_index() == 0 and load_tokenizer(workdir) is None:
            _new_tokenizer(cfg, text, train_text, workdir)
        multihost_utils.sync_global_devices("flaxgpt tokenizer ready")
        return load_tokenizer(workdir)
    existing = load_tokenizer(workdir)
    return existing if existing is not None else _new_tokenizer(cfg, text, train_text, workdir)


def _new_tokenizer(cfg: Config, text: str, train_text: str, workdir: str) -> Tokenizer:
    data = cfg.data
    if data.tokenizer == "char":
        tokenizer: Tokenizer = CharTokenizer.from_text(text)
    elif data.spm_model and os.path.exists(data.spm_model):
        tokenizer = SentencePieceTokenizer(data.spm_model)
    else:  # train one: at data.spm_model if named (so later runs share it), else in the workdir
        prefix = (
            data.spm_model[: -len(".model")]
            if data.spm_model.endswith(".model")
            else (data.spm_model or os.path.join(workdir, "tokenizer"))
        )
        model_file = train_sentencepiece(
            train_text.splitlines(keepends=True), prefix, data.spm_vocab_size, data.spm_model_type
        )
        tokenizer = SentencePieceTokenizer(model_file)
    tokenizer.save(workdir)
    return tokenizer


def build_text_data(cfg: Config, workdir: str) -> tuple[Tokenizer, TokenWindows | DocumentRows]:
    """The tokenizer and the train / validation data of the configured source."""
    if cfg.data.source in ("jsonl", "tfds"):
        train_docs, val_docs = _documents(cfg, workdir)
        tokenizer = build_tokenizer(cfg, "".join(train_docs + val_docs), "\n".join(train_docs), workdir)
        block = cfg.model.block_size

        def rows(docs: list[str], seed: int) -> PackedRows:
            examples = (document_example(tokenizer.encode(d), tokenizer.eos_id) for d in docs)
            return PackedRows(build_rows(examples, block, cfg.data.packing, tokenizer.pad_id), seed)

        return tokenizer, DocumentRows(rows(train_docs, cfg.train.seed), rows(val_docs, cfg.train.seed + 1))
    text = source_text(cfg)
    cut = int(len(text) * cfg.data.train_fraction)
    tokenizer = build_tokenizer(cfg, text, text[:cut], workdir)
    train = np.asarray(tokenizer.encode(text[:cut]), dtype=np.int32)
    val = np.asarray(tokenizer.encode(text[cut:]), dtype=np.int32)
    return tokenizer, TokenWindows(train, val, cfg.train.seed)
