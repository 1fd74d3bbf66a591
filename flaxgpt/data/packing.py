"""Turn tokenized examples into fixed-shape rows, and serve them shuffled per epoch.

An example is (inputs, targets, loss_weights) of equal length. Two layouts:

  pack  examples are concatenated and cut into rows of `length`; each keeps its own
        segment id and positions that restart at 0, so the model never attends across
        them (an example longer than a row continues, as a new segment, in the next row)
  pad   one example per row, truncated to `length`, padded with segment id 0 and weight 0

`PackedRows.batch(step, ...)` is a pure function of (seed, step): the epoch and the
position in it follow from the step, each epoch has its own permutation, and every
process can take exactly its own rows. Resuming at step k therefore replays nothing and
skips nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Example = tuple[Sequence[int], Sequence[int], Sequence[float]]


def document_example(tokens: Sequence[int], eos_id: int) -> Example:
    """Next-token example for one document: predict every token and finally EOS."""
    tokens = list(tokens)
    return tokens, tokens[1:] + [eos_id], [1.0] * len(tokens)


_ROW_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")
_ROW_DTYPES = (np.int32, np.int32, np.float32, np.int32, np.int32)


def build_rows(
    examples: Iterable[Example], length: int, mode: Literal["pack", "pad"], pad_id: int, keep_whole: bool = False
) -> dict[str, np.ndarray]:
    """Stack examples into [rows, length] arrays: inputs, targets, loss_weights, segment_ids, positions.

    keep_whole (pack mode): an example that fits in a row never straddles two; it starts a
    new row instead (conversations for SFT keep their prompt with their answer)."""
    fill_values = {"inputs": pad_id, "targets": pad_id, "loss_weights": 0.0, "segment_ids": 0, "positions": 0}
    out: dict[str, list] = {k: [] for k in _ROW_KEYS}
    row: dict[str, list] = {k: [] for k in _ROW_KEYS}

    def flush() -> None:
        fill = length - len(row["inputs"])
        for key in _ROW_KEYS:
            out[key].append(row[key] + [fill_values[key]] * fill)
            row[key] = []

    for x, y, w in examples:
        if mode == "pad":
            x, y, w = x[:length], y[:length], w[:length]
        elif keep_whole and row["inputs"] and len(row["inputs"]) + len(x) > length >= len(x):
            flush()
        start = 0
        while start < len(x):
            take = min(len(x) - start, length - len(row["inputs"]))
            segment = row["segment_ids"][-1] + 1 if row["segment_ids"] else 1
            row["inputs"].extend(x[start : start + take])
            row["targets"].extend(y[start : start + take])
            row["loss_weights"].extend(w[start : start + take])
            row["segment_ids"].extend([segment] * take)
            row["positions"].extend(range(take))
            start += take
            if mode == "pad" or len(row["inputs"]) == length:
                flush()
    if row["inputs"]:
        flush()
    return {k: np.asarray(out[k], dt).reshape(-1, length) for k, dt in zip(_ROW_KEYS, _ROW_DTYPES)}


class ShuffledRows:
    """Rows served in a fresh order every epoch, global batch `step` being running rows
    step * batch_size onwards: what in-memory and streamed rows share. `take(running row
    numbers)` gives the rows."""

    n: int

    def take(self, wanted: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        """Where global batch `step` starts: recorded in checkpoints for people to read."""
        first = step * batch_size
        return {"epoch": first // self.n, "index_in_epoch": first % self.n}

    def batch(self, step: int, batch_size: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` (default all) of global batch number `step`."""
        wanted = np.arange(step * batch_size, (step + 1) * batch_size)
        if rows is not None:
            wanted = wanted[rows]
        return self.take(wanted)


@dataclass
class PackedRows(ShuffledRows):
    """Fixed rows, in memory, served in a fresh random order every epoch."""

    rows: dict[str, np.ndarray]
    seed: int

    def __post_init__(self) -> None:
        self.n = len(next(iter(self.rows.values())))
        if self.n == 0:
            raise ValueError("no rows: the dataset is empty after tokenization")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, wanted: np.ndarray) -> dict[str, np.ndarray]:
        epochs = wanted // self.n
        picked = np.empty(len(wanted), np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            picked[mask] = self._order(int(epoch))[wanted[mask] % self.n]
        return {key: value[picked] for key, value in self.rows.items()}
