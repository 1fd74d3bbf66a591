"""A token stream split into train / validation, sampled as random windows (nanoGPT style).

Batches are a pure function of (seed, split, step): resuming at step k yields
exactly the batches an uninterrupted run sees, with no iterator state beyond
the step, and every process can cut its own rows from the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxgpt.config import Config
from flaxgpt.data import world as world_lib
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

    def batch(self, split: str, step: int, batch_size: int, block_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` (default: all) of global batch number `step` of `split`.

        Keys (all [len(rows), block_size]): inputs, targets, loss_weights, segment_ids, positions.
        """
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= block_size + 1:
            raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than "
                             f"block_size + 2 = {block_size + 2}; use more text or a smaller block")
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


def source_text(cfg: Config) -> str:
    """The raw text of the configured source."""
    data = cfg.data
    if data.source == "world":
        world = world_lib.make_world(data.world_seed)
        return world_lib.corpus(world, data.world_documents, seed=data.world_seed)
    if not os.path.exists(data.path):
        raise FileNotFoundError(f"data.path: no such text file: {data.path}")
    with open(data.path, encoding="utf-8") as f:
        return f.read()


def build_tokenizer(cfg: Config, text: str, train_text: str, workdir: str) -> Tokenizer:
    """The workdir's tokenizer if the run has one, else a new one (saved into the workdir)."""
    existing = load_tokenizer(workdir)
    if existing is not None:
        return existing
    if jax.process_count() > 1:  # process 0 builds and saves it; the others read what it wrote
        if jax.process_index() == 0:
            _new_tokenizer(cfg, text, train_text, workdir)
        multihost_utils.sync_global_devices("flaxgpt tokenizer saved")
        return load_tokenizer(workdir)
    return _new_tokenizer(cfg, text, train_text, workdir)


def _new_tokenizer(cfg: Config, text: str, train_text: str, workdir: str) -> Tokenizer:
    data = cfg.data
    if data.tokenizer == "char":
        tokenizer: Tokenizer = CharTokenizer.from_text(text)
    elif data.spm_model:
        tokenizer = SentencePieceTokenizer(data.spm_model)
    else:
        model_file = train_sentencepiece(
            train_text.splitlines(keepends=True), os.path.join(workdir, "tokenizer"),
            data.spm_vocab_size, data.spm_model_type,
        )
        tokenizer = SentencePieceTokenizer(model_file)
    tokenizer.save(workdir)
    return tokenizer


def build_text_data(cfg: Config, workdir: str) -> tuple[Tokenizer, TokenWindows]:
    """Read the source, split it (first train_fraction trains), tokenize, and wrap it."""
    text = source_text(cfg)
    cut = int(len(text) * cfg.data.train_fraction)
    tokenizer = build_tokenizer(cfg, text, text[:cut], workdir)
    train = np.asarray(tokenizer.encode(text[:cut]), dtype=np.int32)
    val = np.asarray(tokenizer.encode(text[cut:]), dtype=np.int32)
    return tokenizer, TokenWindows(train, val, cfg.train.seed)
