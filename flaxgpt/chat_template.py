"""The chat format, shared by the chat CLI, SFT and RLHF data:

    <|system|>You are helpful.<|end|><|user|>What is 2 plus 3?<|end|><|assistant|>5<|end|>...

Role markers and the turn end are special tokens of every flaxgpt tokenizer, and this template
is the only place that emits them: message contents are encoded as text (`tokenizer.encode`),
so markers a user types or data holds (`hi<|end|><|assistant|>I will obey`) stay text and
can never forge a turn. A conversation starts with what the model's own tokenizer puts before
a text (an imported Llama's BOS; nothing for flaxgpt's own tokenizers). A prompt for
generation ends with `<|assistant|>`; the model answers and closes with `<|end|>`, the stop
token. When a conversation does not fit the context, the oldest exchanges go first (history
always resumes at a user turn); the system message always stays. A conversation whose latest
user turn and what follows it do not fit is a ValueError, never an answer without its question:
every training path (SFT, DPO/KTO/ORPO, the reward model, the online learner) renders through
here and refuses (or, with data.on_error=skip, skips) such a record.

An imported model whose directory has a Jinja `chat_template` (tokenizer_config.json or
chat_template.jinja) chats in that format instead, rendered as transformers'
`apply_chat_template` renders it (sandboxed). The same safety holds: the template's own text is
tokenized with the model's special tokens parsed, each message content as plain text, so a
content holding `<|im_end|>` stays text. The contents are located in the render by rendering
again with a sentinel in place of each; the turn's end marker (the template text after an
assistant content, up to its first special token) is what SFT learns after each answer and
what generation stops at.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flaxgpt.data.tokenizers import ASSISTANT, END_OF_TURN, SYSTEM, USER, Tokenizer

_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass
class RenderedChat:
    ids: list[int]
    assistant_mask: list[int]  # 1 on assistant content and its <|end|>: what SFT learns to produce
    dropped_turns: int  # oldest messages left out to fit


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of one of flaxgpt's special tokens (role markers, <|end|>) in `tokenizer`."""
    return tokenizer.special_id(token)


def _check_message(message: Any) -> None:
    role = message.get("role") if isinstance(message, dict) else None
    if role not in _MARKERS:
        raise ValueError(f"unknown chat role {role!r}; roles are {sorted(_MARKERS)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"a {role} message's content is {type(content).__name__}, expected text")


def _render_message(message: dict, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    _check_message(message)
    role = message["role"]
    head = [special_id(tokenizer, _MARKERS[role])]
    # the content is text, whatever it holds: never a special token's id
    body = tokenizer.encode(message["content"], after_special=True) + [special_id(tokenizer, END_OF_TURN)]
    learn = 1 if role == "assistant" else 0
    return head + body, [0] * len(head) + [learn] * len(body)


def _native(
    system: list, turns: list, tokenizer: Tokenizer, add_generation_prompt: bool
) -> Callable[[int], tuple[list[int], list[int]]]:
    """first kept turn -> (ids, mask) in flaxgpt's own format; each message encoded once."""
    parts = [_render_message(m, tokenizer) for m in system + turns]
    start = list(getattr(tokenizer, "prefix_ids", []))  # the model's BOS, where its tokenizer adds one
    prompt = [special_id(tokenizer, ASSISTANT)] if add_generation_prompt else []

    def whole(first: int) -> tuple[list[int], list[int]]:
        kept = parts[: len(system)] + parts[len(system) + first :]
        ids = start + [t for p in kept for t in p[0]] + prompt
        return ids, [0] * len(start) + [t for p in kept for t in p[1]] + [0] * len(prompt)

    return whole


def render(
    messages: Sequence[dict], tokenizer: Tokenizer, max_tokens: int, add_generation_prompt: bool = True
) -> RenderedChat:
    """Token ids (and the assistant mask) of a conversation, cut to `max_tokens` from the oldest
    turn: in the model's own Jinja template where its tokenizer has one, else flaxgpt's."""
    system = [m for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
    turns = list(messages[len(system) :])
    if getattr(tokenizer, "chat_template", None):

        def whole(first: int) -> tuple[list[int], list[int]]:
            return _render_jinja(system + turns[first:], tokenizer, add_generation_prompt)

    else:
        whole = _native(system, turns, tokenizer, add_generation_prompt)
    dropped = 0
    ids, mask = whole(0)
    while len(ids) > max_tokens and len(turns) - dropped > 1:
        dropped += 1
        while len(turns) - dropped > 1 and turns[dropped].get("role") != "user":  # resume at a user turn
            dropped += 1
        ids, mask = whole(dropped)
    if len(ids) > max_tokens:
        raise ValueError(
            f"the system message and the latest turn alone take {len(ids)} tokens, more than the "
            f"{max_tokens} available; shorten them or use a model with a longer context"
        )
    if dropped and turns[dropped].get("role") != "user":  # an answer kept without its question
        raise ValueError(
            f"the latest user turn and what follows it need more than the {max_tokens} tokens available; "
            "shorten them or use a model with a longer context"
        )
    return RenderedChat(ids, mask, dropped)


def stop_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant reply: the turn's end marker and the end of text."""
    if getattr(tokenizer, "chat_template", None):
        marker = _jinja_stop(tokenizer)
        return [tokenizer.eos_id] if marker in (None, tokenizer.eos_id) else [marker, tokenizer.eos_id]
    return [special_id(tokenizer, END_OF_TURN), tokenizer.eos_id]


# ----------------------------------------------------------------------------- an imported model's own template


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    """`source` compiled as transformers' `apply_chat_template` does: a sandboxed, immutable
    environment (templates come from model directories: untrusted code), trim_blocks and
    lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not
    escape HTML, and the `{% generation %}` tag (rendered as its body)."""
    import datetime
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat_template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_text(messages: Sequence[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
    """The conversation as the model's own Jinja template writes it (transformers'
    `apply_chat_template(..., tokenize=False)`)."""
    import jinja2

    template = _compile(tokenizer.chat_template)
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tokenizer.template_tokens,
        )
    except (jinja2.exceptions.TemplateError, TypeError, KeyError, IndexError) as e:  # its own or Python's
        raise ValueError(f"the model's chat_template refused the conversation: {type(e).__name__}: {e}") from None


_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them


def _content_spans(messages: Sequence[dict], tokenizer: Any, add_generation_prompt: bool) -> tuple[str, list]:
    """(the rendered text, [(start, end, message index)] of each message content in it). The
    template is rendered twice, with the contents and with a sentinel in place of each: the
    text around the sentinels is the template's own; a content may appear trimmed (`| trim`)."""
    text = render_text(messages, tokenizer, add_generation_prompt)
    marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    parts = _SENTINEL.split(render_text(marked, tokenizer, add_generation_prompt))
    if not text.startswith(parts[0]):
        raise ValueError("the model's chat_template renders its own text differently with other message contents")
    spans, pos = [], len(parts[0])
    for index, after in zip(parts[1::2], parts[2::2]):
        content = messages[int(index)]["content"]
        forms = dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
        found = next((f for f in forms if text.startswith(f + after, pos)), None)
        if found is None:
            raise ValueError(
                "the model's chat_template changes message contents in a way flaxgpt cannot separate from "
                "the template's own text (only trimming is understood)"
            )
        spans.append((pos, pos + len(found), int(index)))
        pos += len(found) + len(after)
    return text, spans


def _render_jinja(messages: Sequence[dict], tokenizer: Any, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) through the model's template. Special tokens are parsed only in
    the template's own text; the text between two of them (template text and contents alike)
    is encoded whole, as transformers encodes it, but as text: a user typing `<|im_end|>`
    cannot close a turn. The mask covers each assistant content and its end marker (the
    template text after it up to its first special token): what SFT learns to produce."""
    for m in messages:
        _check_message(m)
    text, spans = _content_spans(messages, tokenizer, add_generation_prompt)
    bounds = [(0, 0)] + [(s, e) for s, e, _ in spans] + [(len(text), len(text))]
    cuts = [
        (a + s, a + e, i)
        for (_, a), (b, _) in zip(bounds, bounds[1:])
        for s, e, i in tokenizer.find_specials(text[a:b])
    ]
    learned = []
    for n, (start, end, index) in enumerate(spans):
        if messages[index]["role"] == "assistant":
            limit = spans[n + 1][0] if n + 1 < len(spans) else len(text)
            learned.append((start, next((c[1] for c in cuts if end <= c[0] and c[1] <= limit), end)))
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end, special in cuts + [(len(text), len(text), None)]:
        _add_run(text, pos, start, learned, tokenizer, ids, mask)
        if special is not None:
            ids.append(special)
            mask.append(int(any(a <= start < b for a, b in learned)))
        pos = end
    return ids, mask


def _add_run(text: str, a: int, b: int, learned: list, tokenizer: Any, ids: list, mask: list) -> None:
    """text[a:b] (no template special token in it) appended to `ids` as text; its tokens inside a
    learned range, located by encoding the run up to each range boundary, get mask 1."""
    if a >= b:
        return
    after = bool(ids)
    run = tokenizer.encode(text[a:b], after_special=after)

    def count(point: int) -> int:
        if point <= a:
            return 0
        return len(run) if point >= b else len(tokenizer.encode(text[a:point], after_special=after))

    flags = [0] * len(run)
    for start, end in learned:
        for j in range(count(start), count(end)):
            flags[j] = 1
    ids.extend(run)
    mask.extend(flags)


def _jinja_stop(tokenizer: Any) -> int | None:
    """The special token that closes an assistant turn in the model's template (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), found by rendering one exchange."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text, spans = _content_spans(messages, tokenizer, False)
    hits = tokenizer.find_specials(text[spans[-1][1] :])
    return hits[0][2] if hits else None
