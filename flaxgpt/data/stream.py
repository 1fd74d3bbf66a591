"""Pretraining from pre-tokenized token shards (written by `python -m flaxgpt.data.prepare`),
read with bounded memory, alone or as a weighted mixture of several prepared corpora.

A prepared directory holds flat little-endian uint16 (or uint32) token files and a
manifest.json with each shard's token count, byte size and sha256. A shard is cut into
windows of block_size + 1 tokens at a stride of block_size (nanoGPT / levanter style); a
window never spans two shards (each shard's last < block_size tokens are not trained on).

Batches stay a pure function of (seed, split, step), so resume is bit-exact with no
iterator state and every process reads only its own rows:

  global row g = step * batch_size + r
  mixture      rows come in blocks of MIXTURE_BLOCK; each block holds a fixed count of
               every source (the weights, largest-remainder rounded) in an order shuffled
               by (seed, block), so row g's source and its index j within that source
               follow from g alone
  source       j -> epoch j // windows and a window by a keyed Feistel permutation of
               that epoch: O(rows) memory and time whatever the corpus size

Windows are read with pread (os.preadv), not a memory map, so the process keeps no corpus pages
of its own: its memory stays flat as the corpus grows. A missing shard, or one whose size
disagrees with the manifest (half-written, truncated), is a one-line DataError when the
source opens; a shard's sha256 is checked the first time it is read. With
data.on_error=skip such shards are left out (counted and logged) instead, and so is a shard
whose sha256 differs: every shard is hashed when the source opens, so the skip set is settled
before the first batch and every process and every resume agree on it.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import jax
import numpy as np

from flaxgpt.config import Config
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.prepare import FORMAT, MANIFEST, file_sha256
from flaxgpt.data.tokenizers import Tokenizer, load_tokenizer

MIXTURE_BLOCK = 1024  # rows per mixture block: realised proportions are exact to 1 / MIXTURE_BLOCK
_SPLIT_IDS = {"train": 0, "val": 1}
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def read_manifest(directory: str) -> dict:
    """The manifest of a prepared directory; a missing or unreadable one is a one-line DataError."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected a directory written by python -m flaxgpt.data.prepare")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); prepare the corpus again") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ----------------------------------------------------------------------------- permutation


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of range(n) applied to `index`: a 4-round Feistel network on the next
    even power of two, cycle-walking until the value falls inside range(n)."""
    if n <= 1:
        return np.zeros_like(index)
    half = max((int(n - 1).bit_length() + 1) // 2, 1)
    low = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & low
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & low)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = encrypt(np.asarray(index, np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = encrypt(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


def _keys(*seed: int) -> np.ndarray:
    return np.random.default_rng(list(seed)).integers(0, 2**63, size=4, dtype=np.uint64)


def epoch_order(index: np.ndarray, n: int, *seed: int) -> np.ndarray:
    """Item of each running index over epochs of n items: epoch index // n, in that epoch's own
    keyed permutation (every item once per epoch; nothing held but the asked indices)."""
    epochs, within = np.divmod(index, n)
    picked = np.empty(len(within), np.int64)
    for e in np.unique(epochs):
        at = epochs == e
        picked[at] = permute(within[at], n, _keys(*seed, int(e)))
    return picked


# ----------------------------------------------------------------------------- one source


@dataclass
class Shard:
    path: str
    tokens: int
    nbytes: int
    sha256: str


class TokenSource:
    """One split of one prepared directory: numbered windows of block_size + 1 tokens."""

    what = "window of block_size + 1 = {width} tokens"

    def __init__(self, directory: str, split: str, block_size: int, on_error: str = "raise"):
        self.block = block_size
        self._open(directory, split, on_error, stride=block_size, width=block_size + 1)

    def _open(self, directory: str, split: str, on_error: str, stride: int, width: int) -> None:
        """The split's shards (checked, or skipped and counted) cut into windows of `width`
        items every `stride` items."""
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise DataError(f"{os.path.join(directory, MANIFEST)}: no '{split}' split")
        self.name, self.stride, self.width = directory, stride, width
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.skipped: list[str] = []
        self.shards = []
        for entry in manifest["splits"][split]:
            shard = Shard(os.path.join(directory, entry["file"]), entry["tokens"], entry["bytes"], entry["sha256"])
            problem = _size_problem(shard)
            if problem is None and on_error == "skip" and file_sha256(shard.path) != shard.sha256:
                problem = f"{shard.path}: sha256 differs from the manifest (corrupt)"
            if problem is None:
                self.shards.append(shard)
            elif on_error == "skip":
                self.skipped.append(problem)
            else:
                raise DataError(problem + " (data.on_error=skip skips it)")
        per_shard = np.array([max((s.tokens - width) // stride + 1, 0) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.windows = int(self.starts[-1])
        if self.windows == 0:
            raise DataError(
                f"{directory}: the '{split}' split has no {self.what.format(width=width)}"
                + (f" ({len(self.skipped)} shard(s) skipped)" if self.skipped else "")
            )
        self._verified = [on_error == "skip"] * len(self.shards)
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> open descriptor (a few kept)

    def _fd(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        s = self.shards[shard]
        if not self._verified[shard]:
            if _size_problem(s) is None and file_sha256(s.path) != s.sha256:
                raise DataError(f"{s.path}: sha256 differs from the manifest (corrupt) (data.on_error=skip skips it)")
            self._verified[shard] = True
        try:
            fd = os.open(s.path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"{s.path}: cannot be read ({e.strerror}) (data.on_error=skip skips it)") from e
        self._files[shard] = fd
        if len(self._files) > 64:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def read(self, windows: np.ndarray) -> np.ndarray:
        """Windows (numbers in range(self.windows)) as an int32 array [len, block_size + 1]."""
        return self.read_raw(windows).astype(np.int32)

    def read_raw(self, windows: np.ndarray) -> np.ndarray:
        """Windows as stored: [len, width] of the manifest's dtype."""
        shards = np.searchsorted(self.starts, windows, side="right") - 1
        offsets = (windows - self.starts[shards]) * self.stride
        width = self.width * self.dtype.itemsize
        out = np.empty((len(windows), self.width), self.dtype)
        view = memoryview(out).cast("B")
        for i, (shard, offset) in enumerate(zip(shards.tolist(), offsets.tolist())):
            got = os.preadv(self._fd(shard), [view[i * width : (i + 1) * width]], offset * self.dtype.itemsize)
            if got != width:
                raise DataError(f"{self.shards[shard].path}: shorter than the manifest says (truncated)")
        return out

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])


def say_skipped(source: TokenSource, split: str) -> TokenSource:
    """The source, after one line (process 0) saying how many of its shards data.on_error=skip left out."""
    if source.skipped and jax.process_index() == 0:
        print(
            f"{source.name} [{split}]: {len(source.skipped)} shard(s) skipped (first: {source.skipped[0]})", flush=True
        )
    return source


def _size_problem(shard: Shard) -> str | None:
    if not os.path.isfile(shard.path):
        return f"{shard.path}: missing shard"
    size = os.path.getsize(shard.path)
    if size != shard.nbytes:
        return f"{shard.path}: {size} bytes, the manifest says {shard.nbytes} (half-written or truncated)"
    return None


# ----------------------------------------------------------------------------- mixtures


def block_counts(weights: list[float], block: int = MIXTURE_BLOCK) -> np.ndarray:
    """Rows of each source in every mixture block: the weights, largest-remainder rounded."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    exact = w * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


class Mixture:
    """Global row -> (source, index within that source), a pure function of (seed, row)."""

    def __init__(self, weights: list[float], seed: int, block: int = MIXTURE_BLOCK):
        self.counts, self.seed, self.block = block_counts(weights, block), seed, block
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each row, its rank among that source's rows) in mixture block b."""
        hit = self._cache.get(b)  # (the prefetch thread and checkpoint records both ask)
        if hit is None:
            sources = np.repeat(np.arange(len(self.counts)), self.counts)
            sources = sources[np.random.default_rng([self.seed, 1, b]).permutation(self.block)]
            rank = np.empty(self.block, np.int64)
            for k in range(len(self.counts)):
                rank[sources == k] = np.arange(self.counts[k])
            hit = self._cache[b] = (sources, rank)
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        return hit

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within the source) of every global row number."""
        rows = np.asarray(rows, np.int64)
        sources, index = np.empty_like(rows), np.empty_like(rows)
        for b in np.unique(rows // self.block):
            mask = rows // self.block == b
            s, rank = self._block(int(b))
            at = rows[mask] % self.block
            sources[mask] = s[at]
            index[mask] = b * self.counts[s[at]] + rank[at]
        return sources, index

    def consumed(self, rows: int) -> np.ndarray:
        """Rows of each source among the first `rows` global rows."""
        full, part = divmod(rows, self.block)
        partial = np.bincount(self._block(full)[0][:part], minlength=len(self.counts)) if part else 0
        return full * self.counts + partial


class TokenStream:
    """One split of a mixture of token sources, batched like `text.TokenWindows`."""

    def __init__(self, sources: list[TokenSource], weights: list[float], seed: int):
        self.sources, self.seed = sources, seed
        self.mixture = Mixture(weights, seed)

    def windows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), block_size + 1] tokens of these global rows."""
        which, index = self.mixture.locate(rows)
        out = None if len(self.sources) == 1 else np.empty((len(rows), self.sources[0].block + 1), np.int32)
        for k in np.unique(which):
            mask, source = which == k, self.sources[k]
            picked = epoch_order(index[mask], source.windows, self.seed, int(k))
            if out is None:  # one source: its rows are the batch
                return source.read(picked)
            out[mask] = source.read(picked)
        return out

    def position(self, step: int, batch_size: int) -> dict:
        """Per source (by its label): rows and tokens consumed before global batch `step`, and the
        epoch reached; a pure function of the step, so right after any resume."""
        rows = self.mixture.consumed(step * batch_size)
        return {
            "train_batches": step,
            "sources": {
                label: {"path": s.name, "rows": int(n), "tokens": int(n) * s.block, "epoch": int(n) // s.windows}
                for label, s, n in zip(source_labels([s.name for s in self.sources]), self.sources, rows)
            },
        }


def source_labels(paths: list[str]) -> list[str]:
    """Short names of the mixture's sources for logs: each directory's base name, numbered
    (#1, #2, ...) where two share one."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class TokenData:
    """Train and validation streams; the same `batch` / `position` as the in-memory sources."""

    train: TokenStream
    val: TokenStream

    def position(self, step: int, batch_size: int) -> dict:
        return self.train.position(step, batch_size)

    def batch(
        self, split: str, step: int, batch_size: int, block_size: int, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        wanted = np.arange(step * batch_size, (step + 1) * batch_size)
        if rows is not None:
            wanted = wanted[rows]
        window = (self.train if split == "train" else self.val).windows(wanted)
        return {"inputs": window[:, :-1], "targets": window[:, 1:], **_constant_rows(len(window), block_size)}


@functools.lru_cache(maxsize=8)
def _constant_rows(n: int, block_size: int) -> dict[str, np.ndarray]:
    """The rows' weights, segment ids and positions: the same every batch, so built once (read-only)."""
    rows = {
        "loss_weights": np.ones((n, block_size), np.float32),
        "segment_ids": np.ones((n, block_size), np.int32),
        "positions": np.broadcast_to(np.arange(block_size, dtype=np.int32), (n, block_size)).copy(),
    }
    for value in rows.values():
        value.flags.writeable = False
    return rows


def mixture_entries(cfg: Config) -> list[tuple[str, float]]:
    """(directory, weight) of every configured source: data.mixture, else data.path alone."""
    if cfg.data.mixture:
        return [(str(m["path"]), float(m["weight"])) for m in cfg.data.mixture]
    return [(cfg.data.path, 1.0)]


def build_token_data(cfg: Config, workdir: str) -> tuple[Tokenizer, TokenData]:
    """The prepared corpora's tokenizer (saved into the workdir) and their train / val streams."""
    entries = mixture_entries(cfg)
    fingerprints = {read_manifest(d)["tokenizer_sha256"] for d, _ in entries}
    if len(fingerprints) > 1:
        raise DataError(
            f"data.mixture: the prepared directories {[d for d, _ in entries]} use different tokenizers; "
            "prepare every source with the same one"
        )
    tokenizer = load_tokenizer(entries[0][0])
    if tokenizer is None:
        raise DataError(f"{entries[0][0]}: no tokenizer saved beside the manifest; prepare the corpus again")
    if jax.process_index() == 0 and load_tokenizer(workdir) is None:
        tokenizer.save(workdir)
    block, weights = cfg.model.block_size, [w for _, w in entries]

    def stream(split: str, seed: int) -> TokenStream:
        sources = [say_skipped(TokenSource(d, split, block, cfg.data.on_error), split) for d, _ in entries]
        return TokenStream(sources, weights, seed)

    return tokenizer, TokenData(stream("train", cfg.train.seed), stream("val", cfg.train.seed + 1))
