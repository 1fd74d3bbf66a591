"""The chat page at / and the endpoints it uses, each event stored in the feedback database.

POST /api/chat   {conversation_id?, parent_id?, content, system?, regenerate?, edit_of?, settings...}
                 streams {"type": "start" | "delta" | "done" | "error", ...} as server-sent events;
                 the answer's row is committed before "done" reaches the browser
POST /api/rate   {message_id, rating: 1 | -1, comment?} -> {"id": rating row}, after the commit
GET  /api/conversations/{id} -> the branch ending at its newest message, with latest ratings
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from flaxgpt import chat_template
from flaxgpt.data.jsonl import lone_surrogate
from flaxgpt.serve import params
from flaxgpt.serve.params import BadParam

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


def _id(body: dict, name: str, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise BadParam(name, f"'{name}' must be a message or conversation id (an integer below 2**63)")
    return value


def _text(body: dict, name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or lone_surrogate(value):
        raise BadParam(name, f"'{name}' must be a string of Unicode text (no lone surrogate such as \\ud800)")
    return value


@dataclasses.dataclass(frozen=True)
class _Turn:
    """What a chat request asks for, read and checked before anything is stored."""

    conversation: int | None  # None: a new conversation
    parent: int | None  # the answer the user turn follows (None: the conversation's start)
    content: str | None  # the user's message; None for a regeneration, whose user turn exists
    system: str
    kind: str  # of the answer: "message" or "regeneration"
    user: int | None = None  # a regeneration's existing user turn
    revises: int | None = None  # the answer a regeneration replaces
    edit_of: int | None = None  # the user turn an edit replaces


def _read_turn(store, body: dict) -> _Turn:
    regenerate, edit_of = _id(body, "regenerate"), _id(body, "edit_of")
    if regenerate is not None:
        answer = _row(store, regenerate, "assistant")
        user = _row(store, answer["parent_id"], "user")
        conversation, system = answer["conversation_id"], user["system"]
        return _Turn(conversation, user["parent_id"], None, system, "regeneration", user["id"], regenerate)
    content, system = _text(body, "content"), _text(body, "system")
    if not content.strip():
        raise BadParam("content", "the message is empty")
    if edit_of is not None:
        old = _row(store, edit_of, "user")
        return _Turn(old["conversation_id"], old["parent_id"], content, system, "message", edit_of=edit_of)
    parent, conversation = _id(body, "parent_id"), _id(body, "conversation_id")
    if parent is not None:
        conversation = _row(store, parent, "assistant")["conversation_id"]
    elif conversation is not None and not store.query("SELECT id FROM conversations WHERE id = ?", (conversation,)):
        raise BadParam("conversation_id", f"no conversation {conversation}", status=404)
    return _Turn(conversation, parent, content, system, "message")


def _store_turn(store, turn: _Turn) -> tuple[int, int]:
    """(conversation, user turn): the user's message is stored once its answer has been accepted."""
    if turn.content is None:
        return turn.conversation, turn.user
    kind = "message" if turn.edit_of is None else "edit"
    return store.add_turn(
        turn.conversation, turn.parent, turn.content, system=turn.system, kind=kind, revises_id=turn.edit_of
    )


def _row(store, message_id: int, role: str) -> dict:
    row = store.message(message_id)
    if row is None or row["role"] != role:
        raise BadParam(None, f"no {role} message {message_id}", status=404)
    return row


def history(store, user_id: int) -> list[dict]:
    """The conversation up to a user turn, as chat messages, under that turn's system message."""
    path = store.path(user_id)
    return _as_chat(path, path[-1]["system"])


def _as_chat(path: list[dict], system: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"]} for m in path
    ]


def _messages(store, turn: _Turn) -> list[dict]:
    """The chat messages the answer continues, the user's new message included (not stored yet)."""
    if turn.content is None:
        return history(store, turn.user)
    path = store.path(turn.parent) + [{"role": "user", "content": turn.content}]
    return _as_chat(path, turn.system)


def _read_request(store, body: dict) -> tuple[_Turn, list[dict]]:
    turn = _read_turn(store, body)
    return turn, _messages(store, turn)


async def _answer(service, store, body: dict):
    """Check the request and submit its answer; only then store the user's turn (a refused
    request leaves no row), and the answer when it is done."""
    from flaxgpt.serve.app import Job, sse

    settings = params.settings({**body, "n": 1, "stream": True, "stop": None})
    turn, messages = await asyncio.to_thread(_read_request, store, body)
    prompt = service.chat_prompt(messages, settings)
    job = Job(service, prompt, settings, tuple(chat_template.stop_tokens(service.tokenizer)))
    try:
        conversation, user_id = await asyncio.to_thread(_store_turn, store, turn)
    except BaseException:
        job.cancel()
        raise

    async def events():
        yield sse({"type": "start", "conversation_id": conversation, "user_id": user_id})
        try:
            async for _, what, payload in job.events():
                if what == "text":
                    yield sse({"type": "delta", "text": payload})
                    continue
                answer = await asyncio.to_thread(  # the commit waits for the disk, not the event loop
                    store.add_message,
                    conversation,
                    user_id,
                    "assistant",
                    job.answers[0].text,
                    kind=turn.kind,
                    revises_id=turn.revises,
                    step=job.step,
                    settings=settings.record(),
                    finish_reason=payload,
                )
                yield sse({"type": "done", "message_id": answer, "step": job.step, "finish_reason": payload})
        except RuntimeError as e:
            yield sse({"type": "error", "message": str(e)})

    return StreamingResponse(events(), media_type="text/event-stream")


def conversation(store, conversation_id: int) -> dict[str, Any]:
    newest = store.query(
        "SELECT id FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT 1", (conversation_id,)
    )
    if not newest:
        raise BadParam(None, f"no conversation {conversation_id}", status=404)
    path = store.path(newest[0]["id"])
    ratings = {
        r["message_id"]: r
        for r in store.query(
            "SELECT r.* FROM ratings r JOIN messages m ON m.id = r.message_id WHERE m.conversation_id = ?"
            " ORDER BY r.id",
            (conversation_id,),
        )
    }
    for m in path:
        rating = ratings.get(m["id"])
        m["rating"] = rating and rating["rating"]
        m["comment"] = rating and rating["comment"]
    system = next((m["system"] for m in reversed(path) if m["role"] == "user"), "")
    return {"id": conversation_id, "system": system, "messages": path}


def add_routes(app: FastAPI, service) -> None:
    from flaxgpt.serve.app import read_body

    @app.get("/", response_class=HTMLResponse)
    async def index():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    def store():
        if service.store is None:
            raise BadParam(None, "this server keeps no feedback database", status=404)
        return service.store

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await read_body(request)
        return await _answer(service, store(), body)

    @app.post("/api/rate")
    async def rate(request: Request):
        body = await read_body(request)
        message = _row(store(), _id(body, "message_id", required=True), "assistant")
        rating = body.get("rating")
        if type(rating) is not int or rating not in (1, -1):  # not True, not 1.0
            raise BadParam("rating", "'rating' must be 1 (thumbs up) or -1 (thumbs down)")
        return {"id": await asyncio.to_thread(store().rate, message["id"], rating, _text(body, "comment"))}

    @app.get("/api/conversations/{conversation_id}")
    async def get_conversation(conversation_id: int):
        return conversation(store(), _id({"conversation_id": conversation_id}, "conversation_id"))
