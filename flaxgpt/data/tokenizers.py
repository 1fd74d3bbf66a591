"""Tokenizers behind one interface: characters (nanoGPT's shakespeare_char), SentencePiece,
and an imported Hugging Face model's own tokenizer.

Both reserve the same special tokens, so the chat format used by SFT and RLHF
later is a sequence of ordinary ids whatever the tokenizer. A tokenizer is
saved into the run's workdir, so sampling and resuming use exactly the
vocabulary the model was trained with.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from flaxgpt import fileio

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


def _decode_around_specials(
    ids: Sequence[int], special_ids: dict[int, str], pad_id: int, decode_run: Callable[[list[int]], str]
) -> str:
    """Ordinary ids decoded run by run by the base tokenizer, special ids as their text (pad as
    nothing): subword tokenizers never render flaxgpt's special tokens themselves."""
    pieces: list[str] = []
    run: list[int] = []
    for i in (int(i) for i in ids):
        if i in special_ids:
            if run:
                pieces.append(decode_run(run))
            run = []
            pieces.append("" if i == pad_id else special_ids[i])
        else:
            run.append(i)
    if run:
        pieces.append(decode_run(run))
    return "".join(pieces)


class CharTokenizer:
    """One id per character, special tokens first. Unknown characters map to <|unk|>."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.itos = list(SPECIAL_TOKENS) + self.chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.pad_id, self.unk_id, self.eos_id = (self.stoi[t] for t in (PAD, UNK, EOS))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
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
        with fileio.open_file(os.path.join(directory, CHAR_FILE), "w") as f:
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
            raise ValueError(
                f"SentencePiece model {model_file} has no piece for {missing}; "
                "train it with flaxgpt.data.tokenizers.train_sentencepiece"
            )
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
        return _decode_around_specials(ids, self.special_ids, self.pad_id, self.sp.decode)

    def save(self, directory: str) -> None:
        _copy(self.model_file, os.path.join(directory, SPM_FILE))


def train_sentencepiece(lines: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a SentencePiece model that round-trips text exactly; returns the .model path.

    Identity normalisation and kept whitespace make decode(encode(x)) == x;
    byte fallback means no character is ever unknown.
    """
    import sentencepiece as spm

    try:
        _train(spm, lines, model_prefix, vocab_size, model_type)
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} model (byte "
            f"fallback alone takes 256 pieces; raise data.spm_vocab_size): {e}"
        ) from e
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
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        pad_piece=PAD,
        unk_piece=UNK,
        eos_piece=EOS,
        user_defined_symbols=[SYSTEM, USER, ASSISTANT, END_OF_TURN],
        minloglevel=2,
    )


IMPORTED_META = "imported_tokenizer.meta.json"


class ImportedTokenizer:
    """An imported model's own tokenizer: a Hugging Face `tokenizer.json` (e.g. GPT-2's byte-level
    BPE, through the `tokenizers` library) or a SentencePiece `.model` (Llama).

    flaxgpt's special tokens map onto the model's own where it has them (<|eos|> is the model's
    end-of-text token) and onto ids appended after its vocabulary where it has not (the chat
    markers, usually <|pad|>), as TRL's chat setup does; the import gives those rows the mean
    embedding. So the chat format of SFT and RLHF is the same sequence of ids for every model.
    """

    def __init__(self, kind: str, file: str, specials: dict[str, int], vocab_size: int):
        self.kind, self.file, self.specials, self.vocab_size = kind, file, dict(specials), vocab_size
        if kind == "tokenizers":
            from tokenizers import Tokenizer as HFTokenizer

            self._base = HFTokenizer.from_file(file)
        elif kind == "sentencepiece":
            import sentencepiece as spm

            self._base = spm.SentencePieceProcessor(model_file=file)
        else:
            raise ValueError(f"unknown imported tokenizer kind {kind!r}")
        self.pad_id, self.eos_id = self.specials[PAD], self.specials[EOS]
        self.special_ids = {i: t for t, i in self.specials.items()}

    @classmethod
    def from_hf(cls, directory: str, model_vocab: int, eos_id: int | None, pad_id: int | None) -> ImportedTokenizer:
        """The tokenizer of a Hugging Face model directory; appended ids start at `model_vocab`
        (or past the tokenizer's own vocabulary, if that is larger)."""
        json_file, spm_file = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer.model")
        if os.path.exists(json_file):
            kind, file = "tokenizers", json_file
        elif os.path.exists(spm_file):
            kind, file = "sentencepiece", spm_file
        else:
            raise FileNotFoundError(f"{directory} has neither tokenizer.json nor tokenizer.model")
        probe = cls(kind, file, {PAD: 0, EOS: 0}, 0)
        own = probe._own_ids()
        next_id = max(model_vocab, probe._base_size())
        specials: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            if token == EOS and eos_id is not None:
                specials[token] = eos_id
            elif token == PAD and pad_id is not None:
                specials[token] = pad_id
            elif token in own:
                specials[token] = own[token]
            else:
                specials[token], next_id = next_id, next_id + 1
        if EOS not in specials:
            raise ValueError(f"{directory}: no end-of-text token (eos_token_id) in config.json")
        return cls(kind, file, specials, next_id)

    def own_token(self, i: int) -> str | None:
        """The model tokenizer's own text for id `i`, or None for an id the import appended."""
        if i >= self._base_size():
            return None
        return self._base.id_to_token(i) if self.kind == "tokenizers" else self._base.id_to_piece(i)

    def _base_size(self) -> int:
        if self.kind == "tokenizers":
            return self._base.get_vocab_size(with_added_tokens=True)
        return self._base.get_piece_size()

    def _own_ids(self) -> dict[str, int]:
        if self.kind == "tokenizers":
            return {t: i for t in SPECIAL_TOKENS if (i := self._base.token_to_id(t)) is not None}
        return {t: i for t in SPECIAL_TOKENS if (i := self._base.piece_to_id(t)) != self._base.unk_id()}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            if part in SPECIAL_TOKENS:
                ids.append(self.specials[part])
            elif part and self.kind == "tokenizers":
                ids.extend(self._base.encode(part, add_special_tokens=False).ids)
            elif part and not ids:
                ids.extend(self._base.encode(part))
            elif part:  # no word-start prefix after a special token, as transformers' Llama tokenizer
                unk = self._base.id_to_piece(self._base.unk_id())
                ids.extend(self._base.encode(unk + part)[len(self._base.encode(unk)) :])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_around_specials(ids, self.special_ids, self.pad_id, self._base.decode)

    def save(self, directory: str) -> None:
        target = os.path.join(directory, "imported_" + os.path.basename(self.file))
        _copy(self.file, target)
        with fileio.open_file(os.path.join(directory, IMPORTED_META), "w") as f:
            json.dump(
                {
                    "kind": self.kind,
                    "file": os.path.basename(target),
                    "specials": self.specials,
                    "vocab_size": self.vocab_size,
                },
                f,
                indent=2,
            )


def load_tokenizer(directory: str) -> Tokenizer | None:
    """The tokenizer saved in a workdir, or None if there is none."""
    meta_file = os.path.join(directory, IMPORTED_META)
    if fileio.exists(meta_file):
        with fileio.open_file(meta_file) as f:
            meta = json.load(f)
        return ImportedTokenizer(
            meta["kind"], _local(os.path.join(directory, meta["file"])), meta["specials"], meta["vocab_size"]
        )
    char_file = os.path.join(directory, CHAR_FILE)
    if fileio.exists(char_file):
        with fileio.open_file(char_file) as f:
            return CharTokenizer(json.load(f)["chars"])
    spm_file = os.path.join(directory, SPM_FILE)
    if fileio.exists(spm_file):
        return SentencePieceTokenizer(_local(spm_file))
    return None


def _copy(source: str, target: str) -> None:
    if fileio.absolute(source) != fileio.absolute(target):
        data = fileio.read_bytes(source)
        with fileio.open_file(target, "wb") as f:
            f.write(data)


def _local(path: str) -> str:
    """A local file with the content of `path` (SentencePiece and `tokenizers` read local files)."""
    if not fileio.is_remote(path):
        return path
    import hashlib
    import tempfile

    local = os.path.join(
        tempfile.gettempdir(), "flaxgpt-" + hashlib.sha1(path.encode()).hexdigest()[:16] + "-" + os.path.basename(path)
    )
    with open(local, "wb") as f:
        f.write(fileio.read_bytes(path))
    return local
