"""`python -m flaxgpt.tokenize train --input FILES --vocab-size N --model-type bpe|unigram --out PREFIX`

Trains a SentencePiece model with flaxgpt's special tokens (<|pad|>, <|eos|>, the chat
role markers) reserved, exact round-trips and byte fallback. Inputs are text files, or
JSONL files in the "text" schema (one document per line). `encode` shows how a text splits.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator, Sequence

from flaxgpt import cli
from flaxgpt.config import RANGES
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from flaxgpt.errors import UserError


def _lines(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        if path.endswith(".jsonl"):
            for record in read_jsonl(path, "text")[0]:
                yield from record["text"].splitlines(keepends=True)
        else:
            with open(path, encoding="utf-8") as f:
                try:
                    yield from f
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: not UTF-8 text ({e.reason}: byte {e.object[e.start : e.end]!r})"
                    ) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.tokenize", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model", description=__doc__)
    train.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    train.add_argument(
        "--vocab-size", type=cli.ranged(int, RANGES["data.spm_vocab_size"]), required=True, help="pieces, > 256"
    )
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm")
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    encode = commands.add_parser("encode", help="show the pieces of a text", description=__doc__)
    encode.add_argument("--model", required=True, help="a .model file")
    encode.add_argument("text")
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            model_file = train_sentencepiece(_lines(args.input), args.out, args.vocab_size, args.model_type)
        except ValueError as e:  # unreadable text, or SentencePiece refused this vocabulary size for it
            named = any(str(e).startswith(path) for path in args.input)
            raise UserError(str(e) if named else f"--input {' '.join(args.input)}: {e}") from e
        tok = SentencePieceTokenizer(model_file)
        print(f"wrote {model_file}: {tok.vocab_size} pieces ({args.model_type})")
    else:
        if not os.path.isfile(args.model):
            raise FileNotFoundError(errno.ENOENT, "no such SentencePiece model file", args.model)
        tok = SentencePieceTokenizer(args.model)
        ids = tok.encode(args.text, allow_special=True)
        print(" ".join(tok.sp.id_to_piece(i) for i in ids))
        print(f"{len(ids)} tokens for {len(args.text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
