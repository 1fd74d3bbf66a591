"""Validation of OpenAI request bodies into decoding settings; a bad value is a 400 naming it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flaxgpt.errors import UserError

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


class BadParam(UserError):
    """An invalid request parameter (HTTP 400); `param` names it."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass
class Settings:
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    min_tokens: int = 0  # vLLM's: no end of turn / end of text and no stop string before this many tokens
    ignore_eos: bool = False  # vLLM's: the end of turn / end of text does not end the answer
    skip_special_tokens: bool = True  # vLLM's: special tokens are not part of the answer's text

    def check_min_tokens(self, max_tokens: int) -> None:
        """min_tokens against the answer's length limit (`max_tokens` or what the context leaves)."""
        if self.min_tokens > max_tokens:
            raise BadParam("min_tokens", f"'min_tokens' ({self.min_tokens}) must be at most max_tokens ({max_tokens})")

    def record(self) -> dict:
        """What the feedback database keeps of them."""
        keep = ("max_tokens", "temperature", "top_p", "seed", "stop", "min_tokens", "ignore_eos")
        return {k: getattr(self, k) for k in keep}


def _number(body: dict, name: str, default: float, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise BadParam(name, f"'{name}' must be {what} between {low} and {high}, got {value!r}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadParam(name, f"'{name}' must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise BadParam("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
    return stops


def settings(body: dict, *, top_logprobs_name: str = "top_logprobs") -> Settings:
    """The decoding settings of a chat or completions request body (OpenAI's parameters, and
    vLLM's `min_tokens`, `ignore_eos` and `skip_special_tokens`, which the openai client sends through `extra_body`)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 0, 1, 2**31, integer=True)
    logprobs = _flag(body, "logprobs") if top_logprobs_name == "top_logprobs" else body.get("logprobs") is not None
    top = _number(body, top_logprobs_name, 0, 0, 20, integer=True)
    if top and not logprobs and top_logprobs_name == "top_logprobs":
        raise BadParam("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(options, dict):  # [] or "" too
        raise BadParam("stream_options", "'stream_options' must be an object")
    seed = body.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    return Settings(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)) or 1e-6,
        n=_number(body, "n", 1, 1, MAX_N, integer=True),
        seed=_number({"seed": seed}, "seed", 0, -(2**63), 2**63 - 1, integer=True) % 2**32,
        stop=_stop(body),
        logprobs=logprobs,
        top_logprobs=top,
        stream=_flag(body, "stream"),
        include_usage=_flag(
            {"stream_options.include_usage": options.get("include_usage")}, "stream_options.include_usage"
        ),
        min_tokens=_number(body, "min_tokens", 0, 0, 2**31, integer=True),
        ignore_eos=_flag(body, "ignore_eos"),
        skip_special_tokens=_flag(body, "skip_special_tokens", default=True),
    )


def messages(body: dict) -> list[dict]:
    """The chat messages, as {"role", "content": str}; content parts of type text are joined."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadParam("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadParam(f"messages[{i}].role", f"messages[{i}]: role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise BadParam(f"messages[{i}].content", f"messages[{i}]: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadParam(f"messages[{i}].content", f"messages[{i}]: content must be a string")
        out.append({"role": role, "content": content})
    systems = [m["content"] for m in out if m["role"] == "system"]
    rest = [m for m in out if m["role"] != "system"]
    if not rest or rest[-1]["role"] != "user":
        raise BadParam("messages", "the last message must be the user's")
    return ([{"role": "system", "content": "\n".join(systems)}] if systems else []) + rest
