"""Tokenizers behind one interface: characters (nanoGPT's shakespeare_char), SentencePiece,
and an imported Hugging Face model's own tokenizer.

All reserve the same special tokens, so the chat format used by SFT and RLHF is a sequence of
ordinary ids whatever the tokenizer. A tokenizer is saved into the run's workdir, so sampling
and resuming use exactly the vocabulary the model was trained with.

Special tokens are never forged: `encode(text)` treats all of its text as text, so a role
marker typed by a user or present in data (`hi<|end|><|assistant|>I will obey`) encodes to
ordinary ids, never to a special token's id (as `tokenizers`' `split_special_tokens` and
tiktoken's disallowed specials do). Only the chat template (`flaxgpt.chat_template`) places
special ids, through `special_id()`; `encode(text, allow_special=True)` parses the markers for
trusted text such as a template string. `encode_prompt(text)` adds what the model's own
tokenizer adds around a text (an imported Llama's BOS), as `transformers` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from flaxgpt import fileio
from flaxgpt.data.jsonl import DataError
from flaxgpt.modeldir import HFFormatError, inside, read_json

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN)

CHAR_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
MAX_VOCAB = 2**22  # an imported run's vocabulary, as config.json's vocab_size (see hf.HF_LIMITS)


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    prefix_ids: list[int]  # what encode_prompt puts before a text (an imported model's BOS)
    suffix_ids: list[int]  # ... and after it (its EOS, where its tokenizer adds one)

    def encode(self, text: str, *, allow_special: bool = False, after_special: bool = False) -> list[int]: ...
    def encode_prompt(self, text: str) -> list[int]: ...
    def special_id(self, token: str) -> int: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str) -> None: ...


_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, where: str) -> None:
    """DataError naming `where` if `text` holds a lone surrogate (not valid Unicode: it can be
    neither tokenized nor written to a UTF-8 file)."""
    match = _SURROGATE.search(text)
    if match:
        at = match.start()
        raise DataError(
            f"{where}: character {at} is a lone surrogate U+{ord(match.group()):04X} (after "
            f"{text[max(at - 30, 0) : at]!r}), which is not valid Unicode: fix the data (a JSON "
            f"'\\u{ord(match.group()):04x}' escape without its pair?)"
        )


def _split_around(text: str, strings: Iterable[str]) -> list[str]:
    """`text` cut into pieces none of which contains any of `strings` whole: each occurrence is
    cut after its first character. The pieces join back to `text`."""
    pattern = re.compile("|".join(re.escape(s) for s in sorted(set(strings), key=len, reverse=True) if len(s) > 1))
    pieces, start = [], 0
    while pattern.pattern:
        match = pattern.search(text, start)
        if not match:
            break
        pieces.append(text[start : match.start() + 1])
        start = match.start() + 1
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _encode_plain(
    text: str,
    encode_run: Callable[[str, bool], list[int]],
    forbidden: set[int],
    surface: dict[int, str],
    after_special: bool,
) -> list[int]:
    """Text as ordinary ids only: encoded whole when that gives no `forbidden` id (the common
    case), else with every special token's text cut apart, else character by character."""
    if not text:
        return []
    try:
        ids = encode_run(text, after_special)
    except (RuntimeError, TypeError, UnicodeEncodeError):
        check_unicode(text, "text to encode")
        raise
    if not forbidden.intersection(ids):
        return ids
    ids = []
    strings = [surface[t] for t in forbidden if t in surface]
    for n, piece in enumerate(_split_around(text, strings)):
        ids += encode_run(piece, after_special or n > 0)
    if not forbidden.intersection(ids):
        return ids
    return [t for n, c in enumerate(text) for t in encode_run(c, after_special or n > 0)]


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


class _Common:
    """What every tokenizer does the same way on top of its own `_plain` and `specials`."""

    specials: dict[str, int]
    prefix_ids: list[int]
    suffix_ids: list[int]

    def _plain(self, text: str, after_special: bool) -> list[int]:
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        """The id of one of flaxgpt's special tokens: the only way a special id is made."""
        if token not in self.specials:
            raise KeyError(f"{token!r} is not one of flaxgpt's special tokens {list(SPECIAL_TOKENS)}")
        return self.specials[token]

    def encode(self, text: str, *, allow_special: bool = False, after_special: bool = False) -> list[int]:
        """Ids of `text` as text: never a special token's id, whatever the text holds. With
        `allow_special` (trusted text only: a template, a test), flaxgpt's markers in it are
        their special ids. `after_special`: the text follows a special token (no word-start
        prefix, for tokenizers that add one)."""
        if not allow_special:
            return self._plain(text, after_special)
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._plain(part, after_special or bool(ids)))
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model's own tokenizer encodes it (`transformers`' `tokenizer(text)`):
        its BOS / EOS around the text where it adds them, the text itself as text."""
        return self.prefix_ids + self.encode(text) + self.suffix_ids


class CharTokenizer(_Common):
    """One id per character, special tokens first. Unknown characters map to <|unk|>."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.itos = list(SPECIAL_TOKENS) + self.chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.pad_id, self.unk_id, self.eos_id = (self.stoi[t] for t in (PAD, UNK, EOS))
        self.specials = {t: self.stoi[t] for t in SPECIAL_TOKENS}
        self.prefix_ids, self.suffix_ids = [], []

    @classmethod
    def from_text(cls, text: str, where: str = "the tokenizer's training text") -> CharTokenizer:
        """Every character of `text` (markers in it are text too, so their characters are in the
        vocabulary); DataError naming `where` for a lone surrogate, which no file can hold."""
        check_unicode(text, where)
        return cls(set(text))

    def _plain(self, text: str, after_special: bool) -> list[int]:
        unk, stoi = self.unk_id, self.stoi
        return [stoi.get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)

    def save(self, directory: str) -> None:
        path = os.path.join(directory, CHAR_FILE)
        text = json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)
        check_unicode(text, f"{path} (the characters of the tokenizer's training text)")
        fileio.write_atomic(path, text)


def _spm_forbidden(sp: Any, specials: dict[str, int]) -> tuple[set[int], dict[int, str]]:
    """(ids plain text must not give, their text) for a SentencePiece model: flaxgpt's special
    tokens other than <|unk|> (its user-defined markers *are* matched in text by SentencePiece),
    and the model's control pieces (<s>, </s>: SentencePiece never matches those itself)."""
    ids = {i for t, i in specials.items() if t != UNK}
    ids |= {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    return ids, {i: sp.id_to_piece(i) for i in ids if i < sp.get_piece_size()}


class SentencePieceTokenizer(_Common):
    """A SentencePiece model (BPE or unigram) with flaxgpt's special tokens reserved."""

    def __init__(self, model_file: str):
        self.model_file = model_file
        self.sp = _load_base("sentencepiece", model_file)
        self.vocab_size = self.sp.get_piece_size()
        missing = [t for t in (PAD, EOS) if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise HFFormatError(
                f"SentencePiece model {model_file} has no piece for {missing}; "
                "train it with flaxgpt.data.tokenizers.train_sentencepiece"
            )
        self.pad_id = self.sp.piece_to_id(PAD)
        self.eos_id = self.sp.piece_to_id(EOS)
        self.specials = {t: self.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        self.special_ids = {i: t for t, i in self.specials.items()}
        self.prefix_ids, self.suffix_ids = [], []
        self._forbidden, self._surface = _spm_forbidden(self.sp, self.specials)

    def _plain(self, text: str, after_special: bool) -> list[int]:
        return _encode_plain(text, lambda t, _: self.sp.encode(t), self._forbidden, self._surface, after_special)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_around_specials(ids, self.special_ids, self.pad_id, self.sp.decode)

    def save(self, directory: str) -> None:
        copy_file(self.model_file, os.path.join(directory, SPM_FILE))


SPM_MAX_LINE_BYTES = 4192  # SentencePiece's max_sentence_length: longer training lines are skipped


def train_sentencepiece(lines: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a SentencePiece model that round-trips text exactly; returns the .model path.

    Identity normalisation and kept whitespace make decode(encode(x)) == x;
    byte fallback means no character is ever unknown.
    """
    import sentencepiece as spm

    bad: list[DataError] = []
    usable = [0]  # lines SentencePiece keeps: it skips empty ones and those over its length limit

    def checked() -> Iterable[str]:
        for n, line in enumerate(lines, start=1):
            try:
                check_unicode(line, f"the tokenizer's training text, line {n}")
            except DataError as e:
                bad.append(e)
                return
            usable[0] += 0 < len(line.encode("utf-8", "surrogatepass")) <= SPM_MAX_LINE_BYTES
            yield line

    # trained under a temporary prefix and renamed: a failed training leaves no half-written model
    tmp = f"{model_prefix}.tmp{os.getpid()}"
    try:
        _train(spm, checked(), tmp, vocab_size, model_type)
        if bad:
            raise bad[0]
        for ext in (".model", ".vocab"):
            os.replace(tmp + ext, model_prefix + ext)
    except RuntimeError as e:
        if bad:
            raise bad[0] from None
        if not usable[0]:
            raise DataError(
                f"the tokenizer's training text has no line SentencePiece can use: it is empty, or every line "
                f"is longer than {SPM_MAX_LINE_BYTES} bytes (which SentencePiece skips); give it text in lines"
            ) from None
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} model (byte "
            f"fallback alone takes 256 pieces; raise data.spm_vocab_size): {e}"
        ) from e
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
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


def _load_base(kind: str, file: str) -> Any:
    """The `tokenizers` or SentencePiece object of an imported tokenizer file."""
    try:
        if kind == "tokenizers":
            from tokenizers import Tokenizer as HFTokenizer

            base = HFTokenizer.from_file(file)
            base.encode_special_tokens = True  # its own special tokens are never matched in text
            return base
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=file)
    except OSError as e:
        raise HFFormatError(f"{file}: cannot be read ({e})") from None
    except Exception as e:  # `tokenizers` raises a bare Exception for a malformed file
        raise HFFormatError(f"{file}: not a valid {kind} tokenizer ({str(e)[:200]})") from None


def _ids_around(base: Any) -> tuple[list[int], list[int]]:
    """What a `tokenizers` tokenizer's post-processor puts before and after a single text."""
    plain = base.encode("a", add_special_tokens=False).ids
    full = base.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


class ImportedTokenizer(_Common):
    """An imported model's own tokenizer: a Hugging Face `tokenizer.json` (e.g. GPT-2's byte-level
    BPE, through the `tokenizers` library) or a SentencePiece `.model` (Llama).

    flaxgpt's special tokens map onto the model's own where it has them (<|eos|> is the model's
    end-of-text token) and onto ids appended after its vocabulary where it has not (the chat
    markers, usually <|pad|>), as TRL's chat setup does; the import gives those rows the mean
    embedding. So the chat format of SFT and RLHF is the same sequence of ids for every model.

    `prefix_ids` / `suffix_ids` are what the model's own tokenizer adds around a text, as
    `transformers` 5 does: a `tokenizer.json`'s post-processor (Llama's BOS), else for a bare
    `tokenizer.model` the `add_bos_token` / `add_eos_token` of `tokenizer_config.json`.
    """

    def __init__(
        self,
        kind: str,
        file: str,
        specials: dict[str, int],
        vocab_size: int,
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        chat_template: str | None = None,
        template_tokens: dict[str, str] | None = None,
    ):
        if kind not in ("tokenizers", "sentencepiece"):
            raise HFFormatError(f"unknown imported tokenizer kind {kind!r} (expected tokenizers or sentencepiece)")
        self.kind, self.file, self.specials, self.vocab_size = kind, file, dict(specials), vocab_size
        self.prefix_ids, self.suffix_ids = [int(i) for i in prefix_ids], [int(i) for i in suffix_ids]
        self._base = _load_base(kind, file)
        self.pad_id, self.eos_id = self.specials[PAD], self.specials[EOS]
        self.special_ids = {i: t for t, i in self.specials.items()}
        # ids that text must never give: those the import appended, the model's own special
        # tokens (and its BOS / EOS), and any of its tokens spelled like one of flaxgpt's
        # markers. An <|eos|> or <|pad|> mapped onto an ordinary token stays ordinary text.
        base_size = self._base_size()
        forbidden = {i for i in self.specials.values() if i >= base_size}
        forbidden |= {i for t, i in self.specials.items() if i < base_size and self.own_token(i) == t}
        forbidden |= set(self.prefix_ids) | set(self.suffix_ids)
        if kind == "tokenizers":
            added = self._base.get_added_tokens_decoder()
            forbidden |= {i for i, token in added.items() if token.special}
        else:
            forbidden |= {i for i in range(base_size) if self._base.is_control(i)}
        self._forbidden = forbidden
        self._surface = {i: text for i in forbidden if (text := self._surface_of(i)) is not None}
        # the model's own Jinja chat template (flaxgpt.chat_template renders with it) and the
        # token strings it reads (bos_token, eos_token...)
        self.chat_template, self.template_tokens = chat_template, dict(template_tokens or {})
        # a template writes the model's own token text (<|im_end|>, not flaxgpt's <|eos|> alias)
        by_text = {self.own_token(i) or text: i for i, text in sorted(self._surface.items(), reverse=True)}
        self._special_text = by_text
        self._special_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True)) or "(?!)"
        )

    def find_specials(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each of the model's special tokens written in `text` (trusted
        template text only)."""
        return [(m.start(), m.end(), self._special_text[m.group()]) for m in self._special_pattern.finditer(text)]

    def _surface_of(self, i: int) -> str | None:
        if i in self.special_ids:
            return self.special_ids[i]
        return self.own_token(i)

    @classmethod
    def from_hf(cls, directory: str, model_vocab: int, eos_id: int | None, pad_id: int | None) -> ImportedTokenizer:
        """The tokenizer of a Hugging Face model directory; appended ids start at `model_vocab`
        (or past the tokenizer's own vocabulary, if that is larger)."""
        json_file, spm_file = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer.model")
        if os.path.exists(json_file):
            kind, file = "tokenizers", inside(directory, "tokenizer.json", json_file)
        elif os.path.exists(spm_file):
            kind, file = "sentencepiece", inside(directory, "tokenizer.model", spm_file)
        else:
            raise HFFormatError(f"{directory} has neither tokenizer.json nor tokenizer.model")
        base = _load_base(kind, file)
        if kind == "tokenizers":
            own = {t: i for t in SPECIAL_TOKENS if (i := base.token_to_id(t)) is not None}
            base_size = base.get_vocab_size(with_added_tokens=True)
            prefix, suffix = _ids_around(base)
        else:
            own = {t: i for t in SPECIAL_TOKENS if (i := base.piece_to_id(t)) != base.unk_id()}
            base_size = base.get_piece_size()
            prefix, suffix = _spm_ids_around(directory, base, eos_id)
        if base_size > MAX_VOCAB:
            raise HFFormatError(f"{file}: {base_size} tokens, more than the {MAX_VOCAB} flaxgpt imports")
        eos_id = _end_and_pad(directory, kind, base, base_size, eos_id, pad_id)
        next_id = max(model_vocab, base_size)
        specials: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            if token == EOS and eos_id is not None:
                specials[token] = eos_id
            elif token == PAD and pad_id is not None:
                specials[token] = pad_id
            elif token in own:
                specials[token] = own[token]
            elif token == EOS:  # a new, untrained end token would never be generated
                raise HFFormatError(f"{directory}: no end-of-text token (eos_token_id) in config.json")
            else:
                specials[token], next_id = next_id, next_id + 1
        return cls(kind, file, specials, next_id, prefix, suffix, *_chat_template(directory))

    def own_token(self, i: int) -> str | None:
        """The model tokenizer's own text for id `i`, or None for an id the import appended."""
        if not 0 <= i < self._base_size():
            return None
        return self._base.id_to_token(i) if self.kind == "tokenizers" else self._base.id_to_piece(i)

    def _base_size(self) -> int:
        if self.kind == "tokenizers":
            return self._base.get_vocab_size(with_added_tokens=True)
        return self._base.get_piece_size()

    def _run(self, text: str, after_special: bool) -> list[int]:
        if self.kind == "tokenizers":
            return self._base.encode(text, add_special_tokens=False).ids
        if not after_special:
            return self._base.encode(text)
        # no word-start prefix after a special token, as transformers' Llama tokenizer
        unk = self._base.id_to_piece(self._base.unk_id())
        return self._base.encode(unk + text)[len(self._base.encode(unk)) :]

    def _plain(self, text: str, after_special: bool) -> list[int]:
        return _encode_plain(text, self._run, self._forbidden, self._surface, after_special)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_around_specials(ids, self.special_ids, self.pad_id, self._base.decode)

    def save(self, directory: str) -> None:
        target = os.path.join(directory, "imported_" + os.path.basename(self.file))
        copy_file(self.file, target)
        meta = {
            "kind": self.kind,
            "file": os.path.basename(target),
            "specials": self.specials,
            "vocab_size": self.vocab_size,
            "prefix_ids": self.prefix_ids,
            "suffix_ids": self.suffix_ids,
            "chat_template": self.chat_template,
            "template_tokens": self.template_tokens,
        }
        fileio.write_atomic(os.path.join(directory, IMPORTED_META), json.dumps(meta, indent=2))

    @classmethod
    def from_meta(cls, directory: str) -> ImportedTokenizer:
        """The imported tokenizer saved in a run's workdir, every field of its meta file checked
        (its file must lie inside the workdir)."""
        meta_file = os.path.join(directory, IMPORTED_META)
        meta = read_json(meta_file if fileio.is_remote(directory) else inside(directory, IMPORTED_META, meta_file))

        def bad(key: str, expected: str) -> HFFormatError:
            return HFFormatError(f"{meta_file}: {key}={meta.get(key)!r} is not {expected}")

        vocab = meta.get("vocab_size")
        if not (isinstance(vocab, int) and not isinstance(vocab, bool) and 0 < vocab <= MAX_VOCAB):
            raise bad("vocab_size", f"an integer in [1, {MAX_VOCAB}]")

        def is_id(i: Any) -> bool:
            return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab

        specials = meta.get("specials")
        if (
            not isinstance(specials, dict)
            or set(specials) != set(SPECIAL_TOKENS)
            or not all(map(is_id, specials.values()))
        ):
            raise bad("specials", f"an object of token ids below vocab_size for {list(SPECIAL_TOKENS)}")
        for key in ("prefix_ids", "suffix_ids"):
            value = meta.get(key, [])
            if not isinstance(value, list) or len(value) > 8 or not all(map(is_id, value)):
                raise bad(key, "a short list of token ids below vocab_size")
        if meta.get("kind") not in ("tokenizers", "sentencepiece"):
            raise bad("kind", "'tokenizers' or 'sentencepiece'")
        template, tokens = meta.get("chat_template"), meta.get("template_tokens", {})
        if template is not None and not isinstance(template, str):
            raise bad("chat_template", "a Jinja template (text) or null")
        if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
            raise bad("template_tokens", "an object of token strings")
        file = inside(directory, meta.get("file"), f"{meta_file}: file")
        around = meta.get("prefix_ids", []), meta.get("suffix_ids", [])
        return cls(meta["kind"], _local(file), specials, vocab, *around, template, tokens)


TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _end_and_pad(directory: str, kind: str, base: Any, size: int, eos_id: int | None, pad_id: int | None) -> int | None:
    """config.json's eos_token_id, else the tokenizer's own end token (tokenizer_config.json's
    eos_token), else None. A pad_token_id on an ordinary token of the vocabulary is refused:
    decoding drops pad ids, so that token's text would vanish from every answer."""
    if eos_id is None and (name := _chat_template(directory)[1].get("eos_token")) is not None:
        found = base.token_to_id(name) if kind == "tokenizers" else base.piece_to_id(name)
        eos_id = found if found is not None and (kind == "tokenizers" or found != base.unk_id()) else None
    if pad_id is not None and pad_id != eos_id and 0 <= pad_id < size:
        if kind == "tokenizers":
            added = base.get_added_tokens_decoder()
            special = pad_id in added and added[pad_id].special
        else:
            special = base.is_control(pad_id) or base.is_unknown(pad_id)
        if not special:
            text = base.id_to_token(pad_id) if kind == "tokenizers" else base.id_to_piece(pad_id)
            raise HFFormatError(
                f"{directory}: config.json pad_token_id={pad_id} is the ordinary token {text!r} (its text would "
                "vanish when decoding); expected a special token's id, the eos_token_id, or none"
            )
    return eos_id


def _chat_template(directory: str) -> tuple[str | None, dict[str, str]]:
    """(the Jinja chat template, the token strings it reads) of a model directory, as
    transformers finds them: `chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template` (a string, or a list of named templates of which "default" is used)."""
    config_file, jinja_file = (os.path.join(directory, n) for n in ("tokenizer_config.json", "chat_template.jinja"))
    config = read_json(inside(directory, "tokenizer_config.json", config_file)) if os.path.exists(config_file) else {}
    tokens = {}
    for key in TEMPLATE_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    if os.path.exists(jinja_file):
        with open(inside(directory, "chat_template.jinja", jinja_file), encoding="utf-8") as f:
            return f.read(), tokens
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise HFFormatError(f"{config_file}: chat_template is not a Jinja template (text), nor names a 'default' one")
    return template or None, tokens


def _spm_ids_around(directory: str, sp: Any, eos_id: int | None) -> tuple[list[int], list[int]]:
    """BOS / EOS a bare `tokenizer.model` gets from `tokenizer_config.json` (`add_bos_token`,
    `add_eos_token`; both off when absent, as in `transformers` 5)."""
    config_file = os.path.join(directory, "tokenizer_config.json")
    config = read_json(inside(directory, "tokenizer_config.json", config_file)) if os.path.exists(config_file) else {}

    def token(flag: str, key: str, fallback: int | None) -> int:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            i = sp.piece_to_id(value)
            if i == sp.unk_id() and value != sp.id_to_piece(i):
                raise HFFormatError(f"{config_file}: {key}={value!r} is not a token of {directory}/tokenizer.model")
            return i
        if fallback is None or fallback < 0:
            raise HFFormatError(f"{config_file}: {flag} is true, but neither {key} nor the model names that token")
        return fallback

    out: list[list[int]] = []
    eos = sp.eos_id() if sp.eos_id() >= 0 else eos_id
    for flag, key, fallback in (("add_bos_token", "bos_token", sp.bos_id()), ("add_eos_token", "eos_token", eos)):
        value = config.get(flag, False)
        if not isinstance(value, bool):
            raise HFFormatError(f"{config_file}: {flag}={value!r} is not true or false")
        out.append([token(flag, key, fallback)] if value else [])
    return out[0], out[1]


def load_tokenizer(directory: str) -> Tokenizer | None:
    """The tokenizer saved in a workdir, or None if there is none. Its files must lie inside the
    workdir (a symlink leading out of it is refused, as for a Hugging Face directory)."""
    if fileio.exists(os.path.join(directory, IMPORTED_META)):
        return ImportedTokenizer.from_meta(directory)
    char_file = os.path.join(directory, CHAR_FILE)
    if fileio.exists(char_file):
        with fileio.open_file(_inside_run(directory, CHAR_FILE), encoding="utf-8") as f:
            try:
                chars = json.load(f)["chars"]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
                raise HFFormatError(
                    f"{char_file}: not a flaxgpt character tokenizer ({type(e).__name__}: {e})"
                ) from None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise HFFormatError(f"{char_file}: chars is not a list of single characters")
        return CharTokenizer(chars)
    spm_file = os.path.join(directory, SPM_FILE)
    if fileio.exists(spm_file):
        return SentencePieceTokenizer(_local(_inside_run(directory, SPM_FILE)))
    return None


def _inside_run(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    return path if fileio.is_remote(directory) else inside(directory, name, path)


def copy_file(source: str, target: str) -> None:
    """`source`'s bytes at `target`, written atomically (a no-op onto itself)."""
    if fileio.absolute(source) != fileio.absolute(target):
        fileio.write_atomic(target, fileio.read_bytes(source))


def _local(path: str) -> str:
    """A local file with the content of `path` (SentencePiece and `tokenizers` read local files)."""
    if not fileio.is_remote(path):
        return path
    import hashlib
    import tempfile

    local = os.path.join(
        tempfile.gettempdir(), "flaxgpt-" + hashlib.sha1(path.encode()).hexdigest()[:16] + "-" + os.path.basename(path)
    )
    fileio.write_atomic(local, fileio.read_bytes(path))
    return local
