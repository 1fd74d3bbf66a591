"""Corpus curation and text augmentation, both off by default.

Curation runs in a fixed order, each step counted in a report: length filter, blocklist,
exact duplicates (after normalising case and whitespace), near duplicates (MinHash over word
shingles with locality-sensitive hashing, as in GPT-3 / The Pile). Augmentation follows EDA
(Wei & Zou, 2019): synonym replacement from a user table, random insertion, deletion and
swap, reproducible under a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flaxgpt.data.jsonl import DataError, read_text

_WORD = re.compile(r"\w+", re.UNICODE)
_MERSENNE = (1 << 61) - 1


@dataclass
class CurationReport:
    input: int = 0
    too_short: int = 0
    too_long: int = 0
    blocklisted: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    augmented_added: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Curator:
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    blocklist: Sequence[str] = ()
    exact_dedup: bool = False
    near_dedup: bool = False
    near_threshold: float = 0.8  # estimated Jaccard similarity above which a document is dropped
    num_perm: int = 64
    bands: int = 16
    shingle: int = 3  # words per shingle
    report: CurationReport = field(default_factory=CurationReport)

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError(f"MinHash: num_perm={self.num_perm} must be a multiple of bands={self.bands}")
        words = [re.escape(w.strip().lower()) for w in self.blocklist if w.strip()]
        self._blocked = re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        rng = np.random.default_rng(1)
        self._a = rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 31, self.num_perm, dtype=np.uint64)

    def __call__(self, docs: Sequence[str]) -> list[str]:
        r = self.report
        r.input += len(docs)
        kept, seen_exact = [], set()
        buckets: dict[tuple, list[np.ndarray]] = {}
        for doc in docs:
            if len(doc) < self.min_chars:
                r.too_short += 1
                continue
            if self.max_chars and len(doc) > self.max_chars:
                r.too_long += 1
                continue
            if self._blocked is not None and self._blocked.search(doc):
                r.blocklisted += 1
                continue
            if self.exact_dedup:
                key = hashlib.sha1(" ".join(doc.lower().split()).encode()).digest()
                if key in seen_exact:
                    r.exact_duplicates += 1
                    continue
                seen_exact.add(key)
            if self.near_dedup and self._is_near_duplicate(doc, buckets):
                r.near_duplicates += 1
                continue
            kept.append(doc)
        r.kept += len(kept)
        return kept

    def signature(self, doc: str) -> np.ndarray:
        """MinHash of the document's word shingles: min over shingles of (a*h + b) mod p."""
        words = _WORD.findall(doc.lower())
        n = self.shingle
        shingles = {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}
        hashes = np.array(
            [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=4).digest(), "little") for x in shingles],
            dtype=np.uint64,
        )
        # a, b < 2^31 and h < 2^32 keep a*h + b below 2^64: exact in uint64.
        return ((self._a[:, None] * hashes[None, :] + self._b[:, None]) % _MERSENNE).min(axis=1)

    def _is_near_duplicate(self, doc: str, buckets: dict) -> bool:
        sig = self.signature(doc)
        rows = self.num_perm // self.bands
        keys = [(band, sig[band * rows : (band + 1) * rows].tobytes()) for band in range(self.bands)]
        candidates = {id(other): other for key in keys for other in buckets.get(key, ())}
        if any(np.mean(other == sig) >= self.near_threshold for other in candidates.values()):
            return True
        for key in keys:
            buckets.setdefault(key, []).append(sig)
        return False


def load_blocklist(path: str) -> list[str]:
    text = read_text(path, what="blocklist")[0]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_synonyms(path: str) -> dict[str, list[str]]:
    """A JSON object {"word": ["synonym", ...]} or lines `word<TAB>syn1,syn2`."""
    text = read_text(path, what="synonym table")[0]
    if text.lstrip().startswith("{"):
        try:
            table = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else path
            raise DataError(f'{where}: not valid JSON; expected {{"word": ["synonym", ...]}}') from e
        if not isinstance(table, dict) or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in table.values()
        ):
            raise DataError(f'{path}: expected {{"word": ["synonym", ...]}} with lists of strings')
    else:
        table = {}
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                if "\t" not in line:
                    raise DataError(f"{path}:{number}: expected 'word<TAB>syn1,syn2'")
                word, syns = line.split("\t", 1)
                table[word.strip()] = [s.strip() for s in syns.split(",") if s.strip()]
    return {k.lower(): v for k, v in table.items() if v}


def augment(
    doc: str, rng: random.Random, rate: float, ops: Sequence[str], synonyms: dict[str, list[str]] | None = None
) -> str:
    """One EDA variant of `doc`: each op touches about rate * len(words) words (at least one)."""
    words = doc.split(" ")
    n = max(1, int(rate * len(words)))
    synonyms = synonyms or {}
    for op in ops:
        if op == "synonym":
            replaceable = [i for i, w in enumerate(words) if w.lower() in synonyms]
            for i in rng.sample(replaceable, min(n, len(replaceable))):
                words[i] = rng.choice(synonyms[words[i].lower()])
        elif op == "insert":
            for _ in range(n):
                source = rng.choice(words)
                words.insert(rng.randrange(len(words) + 1), rng.choice(synonyms.get(source.lower(), [source])))
        elif op == "delete" and len(words) > 1:
            drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
            words = [w for i, w in enumerate(words) if i not in drop]
        elif op == "swap" and len(words) > 1:
            for _ in range(n):
                i, j = rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
        elif op not in ("synonym", "insert", "delete", "swap"):
            raise ValueError(f"unknown augmentation op '{op}'; ops are synonym, insert, delete, swap")
    return " ".join(words)
