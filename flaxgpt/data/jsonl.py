"""JSONL and plain-text sources: reading user files with a file:line message for every fault.

JSONL holds one JSON object per line, in one of the documented schemas:

  text           {"text": "..."}                                          pretraining
  conversations  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   SFT
  rankings       {"prompt": "...", "responses": [best, ..., worst], "scores": [optional, ties allowed]}  RM
  pairs          {"prompt": "...", "chosen": "...", "rejected": "..."}   RM / DPO
  feedback       {"prompt": "...", "response": "...", "label": true|false}  thumbs up / down
  prompts        {"prompt": "..."}                                        PPO rollouts

rankings, pairs, feedback and prompts records may add "system": "..." (the system message the
prompt was asked under); the prompt is one user turn. Rankings, pairs and feedback records may
add "history": [{"role": "user"|"assistant", "content": "..."}, ...], the turns of the chat
before it (as `python -m flaxgpt.feedback export` writes them): the trainers render it before
the prompt.

Files are UTF-8 (a leading byte-order mark is accepted). A line that is not UTF-8, not valid
JSON (or nested too deeply), holds a lone surrogate escape such as "\\ud800" (text that cannot be
written back as UTF-8), or does not fit its schema stops the read with the file, the line number
and what is wrong, or, with on_error="skip", is skipped and counted.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from flaxgpt import fileio
from flaxgpt.errors import UserError

_SURROGATE = re.compile("[\ud800-\udfff]")
SCHEMAS = ("text", "conversations", "rankings", "pairs", "feedback", "prompts")
ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """Bad input data: the message names the file and line."""


@dataclass
class ReadReport:
    path: str
    unit: str = "records"  # what `records` counts, for the log
    records: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, for the log
    skip: str | None = "data.on_error=skip"  # the setting that skips a bad line, named in the error (None: none)

    def reject(self, where: str, on_error: str) -> None:
        """Raise DataError for a bad line or record, or count it (keeping the first few for the log)."""
        if on_error == "raise":
            raise DataError(where + (f" ({self.skip} skips it)" if self.skip else ""))
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(where)

    def summary(self) -> str:
        text = f"{self.path}: {self.records} {self.unit}"
        if self.skipped:
            text += f", {self.skipped} malformed skipped (first: {self.problems[0]})"
        return text


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _short(value: Any, limit: int = 200) -> str:
    """repr(value) cut to `limit` characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _keys(record: dict, first: int = 10) -> str:
    keys = sorted(record)
    return _short(keys[:first])[:-1] + (f", ... {len(keys) - first} more]" if len(keys) > first else "]")


def schema_problem(record: Any, schema: str) -> str | None:
    """What is wrong with `record` under `schema`, or None if it fits."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    required = {
        "text": ("text",),
        "conversations": ("messages",),
        "rankings": ("prompt", "responses"),
        "pairs": ("prompt", "chosen", "rejected"),
        "feedback": ("prompt", "response", "label"),
        "prompts": ("prompt",),
    }[schema]
    missing = [k for k in required if k not in record]
    if missing:
        return f"missing key(s) {missing} for schema '{schema}' (has {_keys(record)})"
    if schema == "text":
        return None if _is_text(record["text"]) else "'text' must be a string"
    if schema == "conversations":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not _is_text(m.get("content")):
                return f'messages[{i}] must be {{"role": one of {list(ROLES)}, "content": string}}, got {_short(m)}'
            if m["role"] == "system" and i != 0:
                return f"messages[{i}]: a system message may only come first"
        if not any(m["role"] == "assistant" for m in messages):
            return "a conversation needs at least one assistant message"
        return None
    if "system" in record and schema != "conversations" and not _is_text(record["system"]):
        return "'system' (the optional system message) must be a string"
    if "history" in record and schema in ("rankings", "pairs", "feedback"):
        history = record["history"]
        turn = lambda m: isinstance(m, dict) and m.get("role") in ("user", "assistant") and _is_text(m.get("content"))
        if not isinstance(history, list) or not all(map(turn, history)):
            return (
                '\'history\' (the earlier turns) must be a list of {"role": "user" or "assistant", "content": string}'
            )
    if schema == "rankings":
        responses, scores = record["responses"], record.get("scores")
        if not isinstance(responses, list) or len(responses) < 2 or not all(map(_is_text, responses)):
            return "'responses' must be a list of at least 2 strings, best first"
        if scores is not None:
            if (
                not isinstance(scores, list)
                or len(scores) != len(responses)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)
            ):
                return "'scores' must be a list of finite numbers (no NaN or Infinity), one per response"
            if any(a < b for a, b in zip(scores, scores[1:])):
                return "'scores' must not increase: responses are listed best first"
        return None if _is_text(record["prompt"]) else "'prompt' must be a string"
    if schema == "prompts":
        return None if _is_text(record["prompt"]) else "'prompt' must be a string"
    if schema == "pairs":
        bad = [k for k in required if not _is_text(record[k])]
        return f"{bad} must be strings" if bad else None
    if not (_is_text(record["prompt"]) and _is_text(record["response"])):
        return "'prompt' and 'response' must be strings"
    return None if isinstance(record["label"], bool) else "'label' must be true or false"


def _open_binary(path: str, what: str):
    """`path` opened for reading bytes; a missing file, a directory or an unreadable one is one line."""
    if not fileio.exists(path):
        raise FileNotFoundError(f"no such {what} file: {path}")
    if not fileio.is_remote(path) and os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a {what} file")
    try:
        return fileio.open_file(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); expected a readable {what} file") from e


def _decode(raw: bytes, first: bool) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 line (a byte-order mark dropped from the first), else (None, problem)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8"), None
    except UnicodeDecodeError as e:
        byte = raw[e.start : e.start + 1].hex()
        column = len(raw[: e.start].decode("utf-8", "replace")) + 1
        return None, f"not valid UTF-8 (byte 0x{byte} at column {column}); expected UTF-8 text"


def _decoded_lines(path: str, what: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None) for every line of `path`, read as UTF-8."""
    with _open_binary(path, what) as f:
        for number, raw in enumerate(f, start=1):
            text, problem = _decode(raw, number == 1)
            yield number, text, problem


def lone_surrogate(record: Any) -> bool:
    """Whether any key or string of a parsed JSON value holds half of a UTF-16 pair."""
    stack = [record]
    while stack:  # iterative: a value nested close to the parser's limit must not overflow here
        value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _parse(line: str, schema: str) -> tuple[Any, str | None]:
    """(record, problem or None) of one JSONL line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    except RecursionError:
        return None, "JSON nested too deeply; expected one flat record per line"
    if lone_surrogate(record):
        return None, "a string holds a lone surrogate escape (such as \\ud800); expected valid Unicode text"
    return record, schema_problem(record, schema)


def read_jsonl(
    path: str, schema: str, on_error: Literal["raise", "skip"] = "raise", skip: str | None = "data.on_error=skip"
) -> tuple[list[dict], ReadReport]:
    """Every record of `path` that fits `schema`; raises DataError naming file and line otherwise
    (and `skip`, the setting that would skip the line, if the caller has one)."""
    if schema not in SCHEMAS:
        raise DataError(f"unknown JSONL schema '{schema}'; schemas are {list(SCHEMAS)}")
    report, records = ReadReport(path, skip=skip), []
    for number, line, problem in _decoded_lines(path, "JSONL"):
        if line is not None:
            if not line.strip():
                continue
            record, problem = _parse(line, schema)
            if problem is None:
                records.append(record)
                continue
        report.reject(f"{path}:{number}: {problem}", on_error)
    report.records = len(records)
    if not records:
        raise DataError(
            f"{path}: no usable '{schema}' records"
            + (f" ({report.skipped} malformed lines skipped)" if report.skipped else "")
        )
    return records, report


def comparison_schema(path: str, default: str) -> str:
    """'rankings' when the first record of `path` lists "responses", 'pairs' when it has "chosen",
    else `default`: read_jsonl then names what is wrong (a missing file, a line that is not
    UTF-8 or JSON, a record that is not an object). A byte-order mark is dropped as read_jsonl does."""
    if not fileio.exists(path) or (not fileio.is_remote(path) and os.path.isdir(path)):
        return default
    with fileio.open_file(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"{}")
    try:
        record = json.loads(first.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return default
    if not isinstance(record, dict):
        return default
    return "rankings" if "responses" in record else "pairs" if "chosen" in record else default


def read_text(path: str, on_error: Literal["raise", "skip"] = "raise", what: str = "text") -> tuple[str, ReadReport]:
    """The UTF-8 text of `path` with universal newlines, as `open(path, encoding="utf-8")` reads it,
    but a byte-order mark dropped and a line that is not UTF-8 named (or skipped and counted)."""
    report = ReadReport(path, "lines")
    with _open_binary(path, what) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # the usual case, in one piece
    except UnicodeDecodeError:
        parts = []
        for number, line in enumerate(raw.splitlines(keepends=True), start=1):
            decoded, problem = _decode(line, number == 1)
            if decoded is None:
                report.reject(f"{path}:{number}: {problem}", on_error)
            else:
                parts.append(decoded)
        text = "".join(parts)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    report.records = text.count("\n") + (not text.endswith("\n") and bool(text))
    return text, report
