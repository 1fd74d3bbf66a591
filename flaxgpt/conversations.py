"""Chat helpers the trainers share: a prompt's messages, a conversation's reference answer, and a
conversation as a next-token example weighted on the assistant's tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flaxgpt.chat_template import render
from flaxgpt.data.packing import Example
from flaxgpt.data.tokenizers import Tokenizer

Conversation = list[dict]
# (prompt text, response) -> labeler score in [0, 1]: the embedded world's oracle, or None
Labeler = Callable[[str, str], float] | None


def chat_prompt(user: str, system: str = "") -> list[dict]:
    """The messages that ask `user` (after a system message, if any)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def record_prompt(record: dict) -> list[dict]:
    """The messages a rankings / pairs / feedback record's answers reply to: its system message,
    its "history" (the earlier turns of the chat, as `feedback export` writes them) and its prompt."""
    history = [{"role": m["role"], "content": m["content"]} for m in record.get("history") or []]
    system = record.get("system") or ""
    return ([{"role": "system", "content": system}] if system else []) + history + chat_prompt(record["prompt"])


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


def conversation_example(
    messages: Sequence[dict], tokenizer: Tokenizer, block_size: int, loss_on: str = "all"
) -> Example:
    """Next-token example of one conversation, weighted 1 on assistant tokens only.

    Rendered to at most block_size + 1 tokens (older turns dropped first); inputs are all
    but the last token and targets all but the first, so every assistant token (and its
    closing <|end|>) is predicted from everything before it.
    """
    rendered = render(messages, tokenizer, block_size + 1, add_generation_prompt=False)
    ids, mask = rendered.ids, list(rendered.assistant_mask)
    if loss_on == "last":  # keep only the final run of assistant tokens
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [1 if start <= i < end else 0 for i in range(len(mask))]
    return ids[:-1], ids[1:], [float(m) for m in mask[1:]]
