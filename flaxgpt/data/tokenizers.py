"""Tokenizers behind one interface: characters (nanoGPT's shakespeare_char) and SentencePiece.

Both reserve the same special tokens, so the chat format used by SFT and RLHF
later is a sequence of ordinary ids whatever the tokenizer. A tokenizer is
saved into the run's workdir, so sampling and resuming use exactly the
vocabulary the model was trained with.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Protocol, Sequence

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN)

CHAR_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str) -> None: ...


_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class CharTokenizer:
    """One id per character, special tokens first. Unknown characters map to <|unk|>."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.itos = list(SPECIAL_TOKENS) + self.chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.pad_id, self.unk_id, self.eos_id = (self.stoi[t] for t in (PAD, UNK, EOS))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(_SPECIAL_PATTERN.sub("", text)))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            if part in SPECIAL_TOKENS:
                ids.append(self.stoi[part])
            else:
                ids.extend(self.stoi.get(c, self.unk_id) for c in part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, CHAR_FILE), "w") as f:
            json.dump({"type": "char", "chars": self.chars}, f, ensure_ascii=False)


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) with flaxgpt's special tokens reserved."""

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        missing = [t for t in (PAD, EOS) if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"SentencePiece model {model_file} has no piece for {missing}; "
                             "train it with flaxgpt.data.tokenizers.train_sentencepiece")
        self.pad_id = self.sp.piece_to_id(PAD)
        self.eos_id = self.sp.piece_to_id(EOS)

        self.special_ids = {self.sp.piece_to_id(t): t for t in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        # Special tokens are matched here: SentencePiece never parses control pieces from text.
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            if part in SPECIAL_TOKENS:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if i in self.special_ids:
                pieces.append(self.sp.decode(run))
                run = []
                pieces.append("" if i == self.pad_id else self.special_ids[i])
            else:
                run.append(i)
        return "".join(pieces) + self.sp.decode(run)

    def save(self, directory: str) -> None:
        target = os.path.join(directory, SPM_FILE)
        if os.path.abspath(target) != os.path.abspath(self.model_file):
            with open(self.model_file, "rb") as src, open(target, "wb") as dst:
                dst.write(src.read())


def train_sentencepiece(
    lines: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a SentencePiece model that round-trips text exactly; returns the .model path.

    Identity normalisation and kept whitespace make decode(encode(x)) == x;
    byte fallback means no character is ever unknown.
    """
    import sentencepiece as spm

    try:
        _train(spm, lines, model_prefix, vocab_size, model_type)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model (byte "
                         f"fallback alone takes 256 pieces; raise data.spm_vocab_size): {e}") from e
    return model_prefix + ".model"


def _train(spm, lines, model_prefix, vocab_size, model_type) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=False,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
        pad_piece=PAD, unk_piece=UNK, eos_piece=EOS,
        user_defined_symbols=[SYSTEM, USER, ASSISTANT, END_OF_TURN],
        minloglevel=2,
    )


def load_tokenizer(directory: str) -> Tokenizer | None:
    """The tokenizer saved in a workdir, or None if there is none."""
    char_file = os.path.join(directory, CHAR_FILE)
    if os.path.exists(char_file):
        with open(char_file) as f:
            return CharTokenizer(json.load(f)["chars"])
    spm_file = os.path.join(directory, SPM_FILE)
    if os.path.exists(spm_file):
        return SentencePieceTokenizer(spm_file)
    return None
