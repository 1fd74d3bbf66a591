"""Chat helpers the trainers share: a prompt's messages, and a conversation's reference answer."""

from __future__ import annotations

from collections.abc import Sequence


def chat_prompt(user: str, system: str = "") -> list[dict]:
    """The messages that ask `user` (after a system message, if any)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def prompt_and_reference(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """Everything before the last assistant turn, and that turn's content (the reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(messages[:last]), messages[last]["content"]


def padded_chunks(items: Sequence, size: int):
    """(chunk of `size` items, how many are real): the last chunk is padded with its first item,
    so every batch has one shape (one compilation)."""
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        real = len(chunk)
        yield chunk + [chunk[0]] * (size - real), real
