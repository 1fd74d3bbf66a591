"""The HTTP app: OpenAI's API (chat completions, completions, models), health, and the chat
page with its feedback endpoints, over one SlotEngine."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from flaxgpt import chat_template
from flaxgpt.serve import params
from flaxgpt.serve.engine import Overloaded, RequestError, SlotEngine
from flaxgpt.serve.engine import Request as EngineRequest
from flaxgpt.serve.params import BadParam, Settings
from flaxgpt.serve.text import AnswerText

MAX_BODY = 1 << 20  # bytes of one request body
_IDS = itertools.count()
_ID_BASE = secrets.token_hex(8)  # response ids: this process's random part, then a counter


class Mailbox:
    """Events from the engine's thread to the event loop's queues, handed over in batches: the
    loop is woken once for all the tokens of an engine step, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items = loop, threading.Lock(), []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            first = len(self.items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class Service:
    """What the endpoints share: the engine, the tokenizer, the served model's name."""

    def __init__(
        self, engine: SlotEngine, tokenizer: Any, name: str, *, api_key: str | None = None, store=None, placement=None
    ):
        self.engine, self.tokenizer, self.name, self.api_key, self.store = engine, tokenizer, name, api_key, store
        self.placement = placement  # (mesh, logical axis rules) of the served parameters: where reloads go
        self.created = int(time.time())
        self._mailbox: Mailbox | None = None

    def mailbox(self) -> Mailbox:
        """The running event loop's mailbox (made on first use: the loop starts after the service)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    def chat_prompt(self, messages: list[dict], settings: Settings) -> list[int]:
        """The rendered conversation (oldest turns dropped to fit), leaving room for the answer."""
        room = settings.max_tokens or min(256, self.block_size // 2)
        if room >= self.block_size:
            raise _too_long(self.block_size, room)
        try:
            return chat_template.render(messages, self.tokenizer, self.block_size - room).ids
        except ValueError as e:
            message = f"This model's maximum context length is {self.block_size} tokens: {e}"
            raise BadParam("messages", message, code="context_length_exceeded") from None


def _too_long(block: int, asked: int) -> BadParam:
    return BadParam(
        "max_tokens",
        f"This model's maximum context length is {block} tokens; max_tokens {asked} leaves no room for the prompt",
        code="context_length_exceeded",
    )


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}
    kind = kind.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Job:
    """The n answers of one request, submitted to the engine at once (so a refusal comes before
    any response is started); `events()` yields (choice, "text" | "done", new text | finish
    reason) as they grow. Leaving `events()` early (a client gone) cancels what still runs."""

    def __init__(self, service: Service, prompt: list[int], settings: Settings, stops: tuple[int, ...]):
        self.service, self.prompt, self.settings = service, prompt, settings
        self.mailbox, self.queue = service.mailbox(), asyncio.Queue()
        tok, n = service.tokenizer, settings.n
        max_tokens = settings.max_tokens or service.block_size - len(prompt)
        settings.check_min_tokens(max_tokens)
        self.answers = [
            AnswerText(
                tok,
                settings.stop,
                settings.logprobs,
                settings.top_logprobs,
                settings.min_tokens,
                settings.skip_special_tokens,
            )
            for _ in range(n)
        ]
        seeds = [(settings.seed + i) % 2**32 for i in range(n)]
        self.requests = [
            EngineRequest(
                prompt,
                max_tokens,
                functools.partial(self._sink, i),
                settings.temperature,
                settings.top_p,
                seeds[i],
                () if settings.ignore_eos else stops,
                settings.min_tokens,
                settings.top_logprobs,
            )
            for i in range(n)
        ]
        try:
            for r in self.requests:
                service.engine.submit(r)
        except Exception:
            self.cancel()
            raise

    running = 0  # answers not yet finished, while `events()` runs

    def _sink(self, i: int, kind: str, payload: Any) -> None:
        self.mailbox.post(self.queue, (i, kind, payload))

    def cancel(self) -> None:
        for r in self.requests:
            self.service.engine.cancel(r)

    @property
    def step(self) -> int | None:
        return self.requests[0].step

    async def events(self) -> AsyncIterator[tuple[int, str, str]]:
        try:
            self.running = len(self.requests)
            while self.running:
                i, kind, payload = await self.queue.get()
                answer = self.answers[i]
                if kind == "token":
                    piece = answer.add(*payload)
                    if answer.stopped:
                        self.service.engine.cancel(self.requests[i])
                    if piece:
                        yield i, "text", piece
                    continue
                self.running -= 1
                if payload == "error":
                    raise RuntimeError("the engine failed while decoding this request")
                tail = answer.flush()
                if tail:
                    yield i, "text", tail
                yield i, "done", "stop" if answer.stopped or payload == "stop" else payload
        finally:
            self.cancel()

    async def finish_reasons(self) -> list[str]:
        """Wait for every answer; their finish reasons."""
        finish = {}
        async for i, kind, payload in self.events():
            if kind == "done":
                finish[i] = payload
        return [finish[i] for i in range(len(self.requests))]

    def head(self, prefix: str) -> dict:
        """The fields every response object starts with."""
        ident = f"{prefix}-{_ID_BASE}{next(_IDS):08x}"
        return {"id": ident, "created": int(time.time()), "model": self.service.name}

    def usage(self) -> dict:
        done = sum(len(a.tokens) for a in self.answers)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done, "total_tokens": len(self.prompt) + done}


async def read_body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadParam(None, f"the request body is larger than {MAX_BODY} bytes", status=413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadParam(None, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadParam(None, "the request body must be a JSON object")
    return body


def check_model(service: Service, body: dict) -> None:
    model = body.get("model")
    if model != service.name:
        raise BadParam(
            "model",
            f"The model '{model}' does not exist; this server serves '{service.name}'",
            status=404,
            code="model_not_found",
        )


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


async def joined(job: Job, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`chunks` joined while more are ready, sent when the job would wait for the engine (or it
    ends): one write to the socket for what one engine step produced, not one per chunk. Closing
    it (the client left) closes `chunks`, which cancels the job's requests."""
    ready = []
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            ready.append(chunk)
            if job.running and job.queue.empty():
                yield "".join(ready)
                ready = []
    if ready:
        yield "".join(ready)


class Chunks:
    """The server-sent chunks of one streamed response; the fields every chunk repeats (id,
    created, model, object) are serialised once."""

    def __init__(self, head: dict, kind: str):
        self.prefix = "data: " + json.dumps({**head, "object": kind})[:-1] + ', "choices": ['

    def __call__(self, *choices: dict, **fields: Any) -> str:
        more = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items())
        return f"{self.prefix}{', '.join(map(json.dumps, choices))}]{more}}}\n\n"


async def chat_completions(service: Service, request: Request):
    body = await read_body(request)
    check_model(service, body)
    messages, settings = params.messages(body), params.settings(body)
    prompt = service.chat_prompt(messages, settings)
    job = Job(service, prompt, settings, tuple(chat_template.stop_tokens(service.tokenizer)))
    head = job.head("chatcmpl")
    if settings.stream:
        return StreamingResponse(joined(job, _chat_stream(job, head)), media_type="text/event-stream")
    finish = await job.finish_reasons()
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": a.text},
            "logprobs": {"content": a.logprobs} if settings.logprobs else None,
            "finish_reason": finish[i],
        }
        for i, a in enumerate(job.answers)
    ]
    return {**head, "object": "chat.completion", "choices": choices, "usage": job.usage()}


async def _chat_stream(job: Job, head: dict) -> AsyncIterator[str]:
    chunk = Chunks(head, "chat.completion.chunk")
    choice = lambda i, delta, finish=None, logprobs=None: chunk(
        {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    )
    for i in range(len(job.answers)):
        yield choice(i, {"role": "assistant", "content": ""})
    sent = [0] * len(job.answers)
    try:
        async for i, kind, payload in job.events():
            answer = job.answers[i]
            logprobs = {"content": answer.logprobs[sent[i] :]} if job.settings.logprobs else None
            sent[i] = len(answer.logprobs)
            if kind == "text":
                yield choice(i, {"content": payload}, logprobs=logprobs)
            else:
                yield choice(i, {}, payload, logprobs=logprobs)
    except RuntimeError as e:
        yield _stream_error(e)
        return
    if job.settings.include_usage:
        yield chunk(usage=job.usage())
    yield sse("[DONE]")


def _stream_error(e: RuntimeError) -> str:
    return sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})


async def completions(service: Service, request: Request):
    body = await read_body(request)
    check_model(service, body)
    settings = params.settings(body, top_logprobs_name="logprobs")
    for name in ("echo", "suffix"):  # OpenAI options this server does not implement: refused, not ignored
        if body.get(name) not in (None, False):
            raise BadParam(name, f"'{name}' is not supported by this server (leave it out)")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadParam("prompt", "'prompt' must be a non-empty string (one prompt per request)")
    settings.max_tokens = settings.max_tokens or 16  # OpenAI's default for completions
    ids = service.tokenizer.encode_prompt(prompt)
    job = Job(service, ids, settings, (service.tokenizer.eos_id,))
    head = job.head("cmpl")
    if settings.stream:
        return StreamingResponse(joined(job, _completion_stream(job, head)), media_type="text/event-stream")
    finish = await job.finish_reasons()
    choices = [
        {"index": i, "text": a.text, "logprobs": _legacy_logprobs(a), "finish_reason": finish[i]}
        for i, a in enumerate(job.answers)
    ]
    return {**head, "object": "text_completion", "choices": choices, "usage": job.usage()}


def _legacy_logprobs(answer: AnswerText) -> dict | None:
    """The completions endpoint's older logprobs shape."""
    if not answer.want_logprobs:
        return None
    entries = answer.logprobs
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


async def _completion_stream(job: Job, head: dict) -> AsyncIterator[str]:
    chunk = Chunks(head, "text_completion")
    try:
        async for i, kind, payload in job.events():
            text, finish = (payload, None) if kind == "text" else ("", payload)
            yield chunk({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
    except RuntimeError as e:
        yield _stream_error(e)
        return
    yield sse("[DONE]")


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, with its status."""

    @app.exception_handler(BadParam)
    async def bad_param(request: Request, e: BadParam):
        return error(e.status, str(e), e.param, e.code)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError):
        param = "prompt" if request.url.path == "/v1/completions" else "messages"
        return error(400, str(e), param, "context_length_exceeded")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        return error(503, str(e))

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # a bug: the traceback goes to the server's log
        return error(500, f"the server failed on this request ({type(e).__name__})")

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error(400, f"invalid request: {e.errors()[0].get('msg', e)}")


class Guard:
    """The API key and request size checks, as plain ASGI middleware (Starlette's
    `@app.middleware("http")` would pass every streamed chunk through a task group of its own)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        refusal = _refusal(self.service, scope) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)


def _refusal(service: Service, scope: dict) -> JSONResponse | None:
    headers = dict(scope["headers"])
    if service.api_key and scope["path"].startswith(("/v1/", "/api/")):
        if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {service.api_key}":
            return error(401, "Incorrect API key provided (send 'Authorization: Bearer KEY')", code="invalid_api_key")
    if int(headers.get(b"content-length") or 0) > MAX_BODY:
        return error(413, f"the request body is larger than {MAX_BODY} bytes")
    return None


def create_app(service: Service) -> FastAPI:
    """The app: OpenAI's endpoints under /v1, /health, and the chat page at / (see `page`)."""
    from flaxgpt.serve import page

    app = FastAPI(title="flaxgpt", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Guard, service=service)
    add_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(service, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(service, request)

    @app.get("/v1/models")
    async def models():
        card = {"id": service.name, "object": "model", "created": service.created, "owned_by": "flaxgpt"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, **service.engine.stats()}

    page.add_routes(app, service)
    return app
