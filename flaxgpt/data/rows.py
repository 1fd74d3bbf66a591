"""SFT, reward-model and preference rows streamed from disk: what `python -m flaxgpt.data.prepare
--conversations` (or `--rankings`, `--pairs`, `--feedback`) wrote.

The shards hold fixed-width rows (the arrays `packing.build_rows` or `rewards.ranking_rows`
make, their layout in the manifest), so row i is one pread at i x row_bytes. `StreamedRows` serves
them like `packing.PackedRows` (the same `batch` / `position`), each epoch in its own keyed
permutation (`stream.epoch_order`): a batch is a pure function of (seed, step), so a resume
is bit-exact, and memory is a batch's rows whatever the corpus size. Shard checks (missing,
truncated, corrupt; data.on_error=skip) are `stream.TokenSource`'s.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from flaxgpt.config import Config, ConfigError
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.packing import ShuffledRows
from flaxgpt.data.prepare import MANIFEST, tokenizer_fingerprint
from flaxgpt.data.stream import TokenSource, epoch_order, read_manifest, say_skipped
from flaxgpt.data.tokenizers import Tokenizer, load_tokenizer


class RowSource(TokenSource):
    """One split of a prepared directory of rows."""

    what = "row ({width} bytes)"

    def __init__(self, directory: str, split: str, on_error: str = "raise"):
        self.layout = read_manifest(directory)["rows"]["layout"]
        self.row_bytes = sum(np.dtype(dt).itemsize * int(np.prod(shape)) for _, dt, shape in self.layout)
        self._open(directory, split, on_error, stride=self.row_bytes, width=self.row_bytes)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index` as the arrays `build_rows` gives (int32 / float32)."""
        raw, out, at = self.read_raw(np.asarray(index, np.int64)), {}, 0
        for key, dtype, shape in self.layout:
            size = np.dtype(dtype).itemsize * int(np.prod(shape))
            value = np.ascontiguousarray(raw[:, at : at + size]).view(dtype).reshape(len(raw), *shape)
            out[key] = value.astype(np.float32 if np.dtype(dtype).kind == "f" else np.int32)
            at += size
        return out


class StreamedRows(ShuffledRows):
    """`PackedRows`' interface over a `RowSource`: each epoch in its own keyed permutation."""

    def __init__(self, source: RowSource, seed: int, columns: dict[str, np.ndarray] | None = None):
        """columns: per-row arrays held in memory beside the streamed ones (DPO's and KTO's
        reference log-probabilities, [n, 1])."""
        self.source, self.seed, self.n, self.columns = source, seed, source.windows, columns or {}

    def take(self, wanted: np.ndarray) -> dict[str, np.ndarray]:
        index = epoch_order(wanted, self.n, self.seed)
        return {**self.source.rows(index), **{k: v[index] for k, v in self.columns.items()}}


_ROW_KINDS = {"sft": "conversations", "reward": "rankings", "dpo": "pairs", "orpo": "pairs", "kto": "feedback"}


def prepared_rows(cfg: Config, tokenizer: Tokenizer) -> tuple[StreamedRows, StreamedRows]:
    """Train and validation rows of data.path for this run's trainer (SFT: conversations, the
    reward model: rankings, DPO and ORPO: pairs, KTO: feedback), once the manifest agrees with the
    run: the same tokenizer, model.block_size, and sft.loss_on and data.packing (SFT); else a
    one-line DataError."""
    if cfg.data.mixture:
        raise ConfigError("data.mixture mixes pretraining corpora; a trainer of prepared rows reads data.path")
    path = os.path.join(cfg.data.path, MANIFEST)
    kind = _ROW_KINDS[cfg.train.trainer]
    made = read_manifest(cfg.data.path).get("rows")
    if made is None or made.get("kind") != kind:
        raise DataError(f"{path}: holds no {kind} rows; prepare it with python -m flaxgpt.data.prepare --{kind}")
    wanted = {"block_size": cfg.model.block_size}
    if kind == "conversations":
        wanted.update(loss_on=cfg.sft.loss_on, packing=cfg.data.packing)
    for key, value in wanted.items():
        if made[key] != value:
            flag = "--" + key.replace("_", "-")
            raise DataError(f"{path}: rows made with {flag} {made[key]}, but this run has {value}; prepare again")
    if made["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{path}: rows made with another tokenizer than this run's; prepare with --tokenizer-from it")
    train, val = (say_skipped(RowSource(cfg.data.path, split, cfg.data.on_error), split) for split in ("train", "val"))
    return StreamedRows(train, cfg.train.seed), StreamedRows(val, cfg.train.seed + 1)


def prepared_tokenizer(cfg: Config, workdir: str) -> None:
    """A run from scratch on prepared rows uses the tokenizer they were made with: saved into
    the workdir, where `starting_point` finds it."""
    if jax.process_index() == 0 and load_tokenizer(workdir) is None:
        tokenizer = load_tokenizer(cfg.data.path)
        if tokenizer is None:
            raise DataError(f"{cfg.data.path}: no tokenizer beside {MANIFEST}; prepare the rows again")
        tokenizer.save(workdir)
