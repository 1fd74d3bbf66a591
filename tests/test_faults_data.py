"""Bad data input: each fault is one `file:line: what is wrong` DataError, or with
data.on_error=skip a skipped and counted line; never a traceback or a lost valid record."""

import json

import pytest

from flaxgpt import config as C
from flaxgpt.data.curation import load_blocklist, load_synonyms
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.text import build_text_data, source_text
from tests.conftest import run_cli

GOOD = b'{"text": "good one"}\n'
LAST = b'{"text": "good two"}\n'


def _jsonl(tmp_path, bad: bytes, name: str = "docs.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(GOOD + bad + b"\n" + LAST)
    return str(path)


def _one_line_error(match: str, read, *args):
    with pytest.raises(DataError, match=match) as e:
        read(*args)
    assert "\n" not in str(e.value)


def _skips_line_2(path: str):
    records, report = read_jsonl(path, "text", on_error="skip")
    assert [r["text"] for r in records] == ["good one", "good two"]
    assert report.skipped == 1 and report.problems[0].startswith(f"{path}:2: ")


def test_non_utf8_jsonl_line(tmp_path):
    path = _jsonl(tmp_path, b'{"text": "caf\xe9"}')
    _one_line_error(r"docs.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)", read_jsonl, path, "text")
    _skips_line_2(path)


def test_deeply_nested_json(tmp_path):
    path = _jsonl(tmp_path, b"[" * 100_000)
    _one_line_error(r"docs.jsonl:2: JSON nested too deeply", read_jsonl, path, "text")
    _skips_line_2(path)


def test_lone_surrogate_escape(tmp_path):
    path = _jsonl(tmp_path, b'{"text": "half \\ud800 a pair"}')
    _one_line_error(r"docs.jsonl:2: a string holds a lone surrogate", read_jsonl, path, "text")
    _skips_line_2(path)
    pair = _jsonl(tmp_path, b'{"text": "\\ud83d\\ude00"}', "pair.jsonl")  # a whole pair is one character
    assert read_jsonl(pair, "text")[0][1]["text"] == "\U0001f600"


def test_lone_surrogate_in_a_nested_key(tmp_path):
    path = _jsonl(tmp_path, b'{"text": "ok", "meta": [{"\\udfff": 1}]}')
    _one_line_error(r"docs.jsonl:2: a string holds a lone surrogate", read_jsonl, path, "text")


def test_byte_order_mark_keeps_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + LAST)
    for on_error in ("raise", "skip"):
        records, report = read_jsonl(str(path), "text", on_error)
        assert [r["text"] for r in records] == ["good one", "good two"] and report.skipped == 0


def test_directory_as_data_path(tmp_path):
    _one_line_error(r"is a directory; expected a JSONL file", read_jsonl, str(tmp_path), "text")
    cfg = C.Config(data=C.DataConfig(source="text", path=str(tmp_path)))
    _one_line_error(r"is a directory; expected a text file", source_text, cfg)


def test_text_source_non_utf8_line_raises_or_is_skipped(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline \xff two\nline three\n")
    cfg = C.Config(data=C.DataConfig(source="text", path=str(path)))
    _one_line_error(r"corpus.txt:2: not valid UTF-8 \(byte 0xff at column 6\)", source_text, cfg)
    cfg.data.on_error = "skip"
    assert source_text(cfg) == "line one\nline three\n"  # BOM dropped, newlines as text mode reads them


def test_text_source_with_nothing_readable(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xff\xfe\n\xc3\n")
    cfg = C.Config(data=C.DataConfig(source="text", path=str(path), on_error="skip"))
    _one_line_error(r"corpus.txt: no text to train on", source_text, cfg)
    assert "corpus.txt: 2 lines that are not UTF-8 skipped" in capsys.readouterr().out


def test_jsonl_pretraining_counts_skipped_lines_in_the_data_report(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i} is here"}).encode() for i in range(6)]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:3] + [b'{"text": "\xff"}', b"[" * 5000] + lines[3:]))
    cfg = C.Config(data=C.DataConfig(source="jsonl", path=str(path), on_error="skip", tokenizer="char"))
    _, data = build_text_data(cfg, str(tmp_path))
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["malformed_lines_skipped"] == 2 and report["input"] == 6


def test_curation_tables_name_their_file(tmp_path):
    blocklist = tmp_path / "block.txt"
    blocklist.write_bytes(b"\xef\xbb\xbfspam\nham \xff\n")
    _one_line_error(r"block.txt:2: not valid UTF-8", load_blocklist, str(blocklist))
    blocklist.write_bytes(b"\xef\xbb\xbfspam\n# note\neggs\n")
    assert load_blocklist(str(blocklist)) == ["spam", "eggs"]
    synonyms = tmp_path / "syn.json"
    synonyms.write_text('{"big": ["large",\n "huge"')
    _one_line_error(r"syn.json:2: not valid JSON", load_synonyms, str(synonyms))
    synonyms.write_text('{"big": "large"}')
    _one_line_error(r"syn.json: expected .* lists of strings", load_synonyms, str(synonyms))


def test_tfds_record_that_is_not_utf8(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is the optional extra")
    from flaxgpt.data.tfds_source import read_documents

    records = [{"text": b"fine"}, {"text": b"bad \xff"}, {"text": "half \ud800"}, {"text": b"also fine"}]
    monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: records)
    _one_line_error(
        r"'set' split 'train' record 1: feature 'text' is not valid UTF-8", read_documents, "set", "train", None
    )
    docs, report = read_documents("set", "train", None, on_error="skip")
    assert docs == ["fine", "also fine"] and report.skipped == 2
    assert "record 2: feature 'text' holds a lone surrogate" in report.problems[1]


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = run_cli("-e", "pretrain_jsonl", "--workdir", str(tmp_path / "run"), "--set", f"data.path={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {tmp_path}: is a directory; expected a JSONL file"
