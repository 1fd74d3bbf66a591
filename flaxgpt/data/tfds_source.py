"""TensorFlow Datasets: read catalog datasets by name and split, and turn local files into one.

Reading goes through `tfds.data_source` (random access over array_record files), which
needs no TensorFlow. Catalog datasets prepared in TFDS's default tfrecord format (most
copies on GCS) do need TensorFlow: `pip install tensorflow-cpu`, or prepare an array_record
copy once. TFDS is the optional extra `tfds` (`pip install '.[tfds]'`), since the core
trainer needs none of its dependencies.

    python -m flaxgpt.data.tfds_source build --train a.jsonl b.txt --validation c.jsonl --data-dir DIR

builds the dataset `flaxgpt_text` into DIR; an experiment then reads it with
data.source=tfds data.tfds_name=flaxgpt_text data.tfds_data_dir=DIR.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Literal

from flaxgpt import cli
from flaxgpt.data.jsonl import DataError, ReadReport, lone_surrogate, read_jsonl, read_text


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("data.source=tfds needs tensorflow-datasets: pip install 'flaxgpt[tfds]'") from e
    return tfds


def _documents(paths: Sequence[str]) -> Iterator[str]:
    """A .jsonl file gives one document per record ("text" schema); any other file is one document."""
    for path in paths:
        if path.endswith(".jsonl"):
            yield from (r["text"] for r in read_jsonl(path, "text")[0])
        else:
            yield read_text(path)[0]


def _builder_class():
    tfds = _tfds()
    if hasattr(_builder_class, "cls"):
        return _builder_class.cls

    class FlaxgptText(tfds.core.GeneratorBasedBuilder):
        """Local text and JSONL files as a TFDS dataset with 'train' and 'validation' splits."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Documents from local text / JSONL files."}

        def __init__(self, *, train_files: Sequence[str] = (), validation_files: Sequence[str] = (), **kwargs):
            self._files = {"train": list(train_files), "validation": list(validation_files)}
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(files) for split, files in self._files.items() if files}

        def _generate_examples(self, files):
            for index, text in enumerate(_documents(files)):
                yield index, {"text": text}

    _builder_class.cls = FlaxgptText
    return FlaxgptText


def build_dataset(train_files: Sequence[str], validation_files: Sequence[str], data_dir: str) -> str:
    """Prepare `flaxgpt_text` from local files into data_dir (array_record, no TensorFlow); returns its name."""
    if not train_files:
        raise DataError("building a TFDS dataset needs at least one --train file")
    builder = _builder_class()(
        train_files=train_files, validation_files=validation_files, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    return builder.name


def read_documents(
    name: str, split: str, data_dir: str | None, text_key: str = "text", on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[str], ReadReport]:
    """Every document of a prepared TFDS dataset split (e.g. 'train', 'validation[:10%]'); a record
    whose text is not UTF-8 or holds a lone surrogate raises DataError, or is skipped and counted."""
    tfds = _tfds()
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises several types for a missing / unprepared / tfrecord-only dataset
        raise DataError(
            f"TFDS dataset '{name}' split '{split}' in data_dir {data_dir or '(default)'} cannot be "
            f"read without downloading or TensorFlow: {e}"
        ) from e
    report, documents = ReadReport(f"tfds {name}[{split}]", "documents"), []
    for index, record in enumerate(source):
        if text_key not in record:
            raise DataError(
                f"TFDS dataset '{name}' has no feature '{text_key}' (has {sorted(record)}); set data.tfds_text_key"
            )
        text, problem = _text_of(record[text_key])
        if problem is None:
            documents.append(text)
            continue
        where = f"TFDS dataset '{name}' split '{split}' record {index}: feature '{text_key}' {problem}"
        report.reject(where, on_error)
    report.records = len(documents)
    if not documents:
        raise DataError(f"TFDS dataset '{name}' split '{split}' has no usable documents ({report.skipped} skipped)")
    return documents, report


def _text_of(value) -> tuple[str | None, str | None]:
    """(text, None) of a TFDS text feature, or (None, what is wrong with it)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"is not valid UTF-8 (byte 0x{value[e.start : e.start + 1].hex()} at offset {e.start})"
    text = str(value)
    if lone_surrogate(text):
        return None, "holds a lone surrogate; expected valid Unicode text"
    return text, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.data.tfds_source", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="turn local text / JSONL files into the TFDS dataset flaxgpt_text", description=__doc__
    )
    build.add_argument("--train", nargs="+", required=True, help="text or .jsonl files")
    build.add_argument("--validation", nargs="*", default=[], help="text or .jsonl files")
    build.add_argument("--data-dir", required=True, help="where the dataset is written")
    args = parser.parse_args(argv)
    # Under `python -m` this module is __main__; TFDS needs the builder's real package to find it.
    from flaxgpt.data.tfds_source import build_dataset as build

    for path in args.train + args.validation:  # before TFDS starts writing
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
    name = build(args.train, args.validation, args.data_dir)
    print(f"built TFDS dataset '{name}' in {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
