"""JSONL sources: one JSON object per line, in one of five documented schemas.

  text           {"text": "..."}                                          pretraining
  conversations  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   SFT
  rankings       {"prompt": "...", "responses": [best, ..., worst], "scores": [optional, ties allowed]}  RM
  pairs          {"prompt": "...", "chosen": "...", "rejected": "..."}   RM / DPO
  feedback       {"prompt": "...", "response": "...", "label": true|false}  thumbs up / down
  prompts        {"prompt": "..."}                                        PPO rollouts

rankings, pairs, feedback and prompts records may add "system": "..." (the system message the
prompt was asked under); the prompt is one user turn.

A line that is not valid JSON or does not fit its schema stops the read with the file,
the line number and what is wrong, or, with on_error="skip", is skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from flaxgpt import fileio
from flaxgpt.errors import UserError

SCHEMAS = ("text", "conversations", "rankings", "pairs", "feedback", "prompts")
ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """Bad input data: the message names the file and line."""


@dataclass
class ReadReport:
    path: str
    records: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, for the log

    def summary(self) -> str:
        text = f"{self.path}: {self.records} records"
        if self.skipped:
            text += f", {self.skipped} malformed lines skipped (first: {self.problems[0]})"
        return text


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


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
        return f"missing key(s) {missing} for schema '{schema}' (has {sorted(record)})"
    if schema == "text":
        return None if _is_text(record["text"]) else "'text' must be a string"
    if schema == "conversations":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not _is_text(m.get("content")):
                return f'messages[{i}] must be {{"role": one of {list(ROLES)}, "content": string}}, got {m!r}'
            if m["role"] == "system" and i != 0:
                return f"messages[{i}]: a system message may only come first"
        if not any(m["role"] == "assistant" for m in messages):
            return "a conversation needs at least one assistant message"
        return None
    if "system" in record and schema != "conversations" and not _is_text(record["system"]):
        return "'system' (the optional system message) must be a string"
    if schema == "rankings":
        responses, scores = record["responses"], record.get("scores")
        if not isinstance(responses, list) or len(responses) < 2 or not all(map(_is_text, responses)):
            return "'responses' must be a list of at least 2 strings, best first"
        if scores is not None:
            if (
                not isinstance(scores, list)
                or len(scores) != len(responses)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
            ):
                return "'scores' must be a list of numbers, one per response"
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


def read_jsonl(path: str, schema: str, on_error: Literal["raise", "skip"] = "raise") -> tuple[list[dict], ReadReport]:
    """Every record of `path` that fits `schema`; raises DataError naming file and line otherwise."""
    if schema not in SCHEMAS:
        raise DataError(f"unknown JSONL schema '{schema}'; schemas are {list(SCHEMAS)}")
    if not fileio.exists(path):
        raise FileNotFoundError(f"no such JSONL file: {path}")
    report, records = ReadReport(path), []
    with fileio.open_file(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = schema_problem(record, schema)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                records.append(record)
                continue
            where = f"{path}:{number}: {problem}"
            if on_error == "raise":
                raise DataError(where + " (data.on_error=skip skips such lines)")
            report.skipped += 1
            if len(report.problems) < 5:
                report.problems.append(where)
    report.records = len(records)
    if not records:
        raise DataError(
            f"{path}: no usable '{schema}' records"
            + (f" ({report.skipped} malformed lines skipped)" if report.skipped else "")
        )
    return records, report
