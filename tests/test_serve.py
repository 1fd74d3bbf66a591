"""The server: the slot engine against `generate`, the OpenAI API through the `openai` client,
the chat page's feedback rows, and their export. One tiny run and one server for the file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import jax
import pytest

from flaxgpt import chat_template, generate
from flaxgpt.errors import UserError
from flaxgpt.serve.engine import Overloaded, Request, RequestError, SlotEngine, bucket, prng_key
from flaxgpt.serve.text import AnswerText
from flaxgpt.trainers import pretrain
from tests.conftest import REPO, free_port, init_params, serving, tiny_model_config, tiny_run_config


def _collect(engine: SlotEngine, prompts, max_tokens, start=False, each=None, **kw) -> list[tuple[list[int], str]]:
    """Submit every prompt at once (then start the engine if `start`: they all wait); wait for all
    answers. `each`: per prompt, settings beside `kw`."""
    results, done = {}, threading.Semaphore(0)

    def sink_for(i):
        tokens = []

        def sink(kind, payload):
            if kind == "token":
                tokens.append(payload[0])
            else:
                results[i] = (tokens, payload)
                done.release()

        return sink

    for i, p in enumerate(prompts):
        engine.submit(Request(p, max_tokens, sink_for(i), **kw, **(each[i] if each else {})))
    if start:
        engine.start()
    for _ in prompts:
        assert done.acquire(timeout=60)
    return [results[i] for i in range(len(prompts))]


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3], [4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4, 9], [7, 8], [9, 2, 9]]
NEW = 14  # 6 requests one after another pass the end of the 32-long cache: rows are moved left


def _greedy(model, params) -> list[list[int]]:
    """`generate`'s greedy answers to PROMPTS."""
    cfg = generate.DecodeConfig(max_new_tokens=NEW, temperature=0.0)
    return generate.completions(generate.generate(model, params, PROMPTS, cfg, jax.random.PRNGKey(0), pad_id=0))


@pytest.fixture(scope="module")
def lone_model():
    cfg = tiny_model_config(block_size=32, vocab_size=50, init_std=0.5)  # peaked logits: context-dependent tokens
    return init_params(cfg)


def test_batched_greedy_tokens_equal_alone_and_generate(lone_model):
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=3).start()
    try:
        prompts = PROMPTS
        alone = [_collect(engine, [p], NEW, temperature=0.0)[0] for p in prompts]
        batched = _collect(engine, prompts, NEW, temperature=0.0)  # 6 requests on 3 rows: rows are reused
        for one, many, expected in zip(alone, batched, _greedy(model, params)):
            assert one == many == (expected, "length")
        assert len({tuple(t) for t, _ in alone}) > 2  # the answers differ by prompt
        # sampling: a seed gives the same tokens alone and in a batch; another seed others
        sampled = _collect(engine, [prompts[0]] * 3, 12, temperature=1.0, seed=7)
        assert sampled[0] == sampled[1] == sampled[2] == _collect(engine, [prompts[0]], 12, temperature=1.0, seed=7)[0]
        assert _collect(engine, [prompts[0]], 12, temperature=1.0, seed=8)[0] != sampled[0]
        # a stop token ends the request without being reported
        first = alone[0][0]
        stopped = _collect(engine, [prompts[0]], NEW, temperature=0.0, stop_tokens=(first[3],))[0]
        assert stopped == (first[: first.index(first[3])], "stop")
    finally:
        engine.stop()


def test_min_tokens_bans_stop_tokens_for_its_row_only(lone_model):
    """A stop token the greedy answer meets at its 4th token cannot end it before min_tokens, while
    the row decoded beside it without min_tokens still stops there; the top-p sort skipped when
    no row needs it picks the same tokens as with it."""
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=3).start()
    try:
        first = _collect(engine, [PROMPTS[0]], NEW, temperature=0.0)[0][0]
        stop = first[3]
        cut = first.index(stop)
        each = [{"min_tokens": 0}, {"min_tokens": 8}]
        plain, held = _collect(engine, [PROMPTS[0]] * 2, NEW, each=each, temperature=0.0, stop_tokens=(stop,))
        assert plain == (first[:cut], "stop")
        tokens, reason = held
        assert stop not in tokens[:8] and tokens[:cut] == first[:cut] and len(tokens) >= 8
        assert (reason == "length") == (len(tokens) == NEW)
    finally:
        engine.stop()
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    temperature, top_p = jax.numpy.asarray([1.0, 0.0, 0.7, 1.5]), jax.numpy.ones(4)
    with_sort = generate.choose_token_rows(logits, keys, temperature, top_p, nucleus=True)
    assert (with_sort == generate.choose_token_rows(logits, keys, temperature, top_p, nucleus=False)).all()


def test_waiting_prompts_prefilled_together_keep_their_own_answers(lone_model):
    """Six queued requests on four rows: four different prompts share one prefill call, each must
    get its own answer (a wrong slot mapping swaps them), the rest follow as rows free."""
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=4)
    try:
        got = _collect(engine, PROMPTS, NEW, start=True, temperature=0.0)  # the first admission takes four
        assert got == [(expected, "length") for expected in _greedy(model, params)]
        # the last two share a prefill of two rows (no filler), each request is in NEW decode steps
        work = engine.stats()
        assert (work["prefills"], work["prefill_rows"], work["prompts"]) == (2, 6, 6)
        # programs: prefills of 4 prompts 12 wide and 2 prompts 8 wide, steps of rows 0-3, then 0-1
        assert work["programs"] == 4
        assert (work["steps"], work["step_rows"]) == (2 * NEW, 6 * NEW) and work["busy_s"] > 0
    finally:
        engine.stop()


def test_slot_prefill_writes_each_prompt_into_its_row_and_drops_filler(lone_model):
    """Twice into the same rows: at write index 20, then at 14 (the 16-wide prompts' first two
    padding columns wrap around to the row's end); what the first left must be gone."""
    model, params = lone_model
    a, b, filler = PROMPTS[1], PROMPTS[3], PROMPTS[0]
    tokens, mask = generate.left_pad([a, b, filler], 0, 16)
    cache, last = generate.slot_cache(model, 3), jax.numpy.full((3, 50), 7.0)
    slots = jax.numpy.asarray([2, 0, 3])  # 3 is out of range: the filler row must not land anywhere
    cache, last, _ = generate.slot_prefill(model, params, cache, last, tokens[::-1], mask[::-1], slots, 20)
    cache, last, position = generate.slot_prefill(model, params, cache, last, tokens, mask, slots, 14)
    expected, rows, _ = jax.jit(generate._prefill, static_argnums=(0, 4))(model, params, tokens, mask, 16)
    assert (last[2] == expected[0]).all() and (last[0] == expected[1]).all()
    assert (last[1] == 7.0).all() and list(position[:2]) == [len(a), len(b)]
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(rows)):
        if got.ndim > 1:  # key/value/valid leaves [rows, columns, ...]: each prompt ends at column 13
            want = jax.numpy.pad(want, [(0, 0), (0, 32 - 16)] + [(0, 0)] * (want.ndim - 2))
            want = jax.numpy.roll(want, 14 - 16, axis=1)
            assert (got[2] == want[0]).all() and (got[0] == want[1]).all() and not got[1].any()


def test_scanned_llama_layers_decode_like_generate():
    """Rotary positions and a cache with a leading layer axis (rows and columns one axis further)."""
    cfg = tiny_model_config("llama", block_size=32, vocab_size=50, init_std=0.5, scan_layers=True, n_kv_heads=2)
    model, params = init_params(cfg)
    engine = SlotEngine(model, params, pad_id=0, slots=3).start()
    try:
        got = _collect(engine, PROMPTS, NEW, temperature=0.0)
        assert [tokens for tokens, _ in got] == _greedy(model, params)
    finally:
        engine.stop()


def test_a_cancelled_request_frees_its_row(lone_model):
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=3).start()
    try:
        events, cancelled = [], threading.Event()

        def sink(kind, payload):  # on the engine's thread: the client leaves at its first token
            events.append((kind, payload))
            if kind == "token":
                engine.cancel(gone)  # what a client that disconnects causes
                cancelled.set()

        gone = Request(PROMPTS[0], NEW, sink)
        engine.submit(gone)
        assert cancelled.wait(30)
        later = _collect(engine, PROMPTS[:3], NEW, temperature=0.0)  # all three rows are free again
        assert [k for k, _ in events] == ["token", "done"] and events[-1][1] == "cancelled" and len(later) == 3
    finally:
        engine.stop()


def test_engine_refuses_too_long_and_overload(lone_model):
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=1, max_queue=1)  # not started: the queue fills
    with pytest.raises(RequestError, match="maximum context length is 32 tokens"):
        engine.submit(Request([1] * 30, 3, lambda *a: None))
    engine.submit(Request([1], 3, lambda *a: None))
    with pytest.raises(Overloaded):
        engine.submit(Request([1], 3, lambda *a: None))


def test_host_keys_equal_jax_keys_and_prompt_widths_waste_under_a_third():
    for seed in (0, 7, 2**31 + 5, 2**32 - 1):
        assert (prng_key(seed) == jax.random.PRNGKey(seed)).all()
    assert [bucket(n, 128) for n in (1, 9, 13, 17, 25, 33, 46, 49, 65, 97, 500)] == [
        8,
        12,
        16,
        24,
        32,
        48,
        48,
        64,
        96,
        128,
        128,
    ]
    assert all(n <= bucket(n, 256) <= max(8, 1.5 * n) for n in range(1, 257))


def test_events_ready_together_leave_in_one_write():
    """The engine's events reach the event loop in one hand-over per batch, and the chunks of a
    stream that are ready at once are joined (one socket write); the rest go as they come."""
    from flaxgpt.serve.app import Mailbox, joined

    class Counting:  # the loop, counting the wake-ups asked of it
        def __init__(self, loop):
            self.loop, self.calls = loop, 0

        def call_soon_threadsafe(self, fn):
            self.calls += 1
            self.loop.call_soon_threadsafe(fn)

    class Job:  # what `joined` reads of a job: its queue and its unfinished answers
        running = 1

    async def main():
        loop, job = Counting(asyncio.get_running_loop()), Job()
        box, job.queue = Mailbox(loop), asyncio.Queue()
        poster = threading.Thread(target=lambda: [box.post(job.queue, i) for i in range(3)])
        poster.start()
        poster.join()
        got = [await asyncio.wait_for(job.queue.get(), 30) for _ in range(3)]
        box.post(job.queue, 3)
        while job.queue.empty():  # handed over by the loop
            await asyncio.sleep(0.01)

        async def chunks():
            yield "a"  # one event still queued: joined with what follows
            await job.queue.get()
            yield "b"  # nothing queued: sent
            job.running = 0  # the last answer finished: the rest leave together
            yield "c"
            yield "d"

        return got, loop.calls, [c async for c in joined(job, chunks())]

    assert asyncio.run(main()) == ([0, 1, 2], 2, ["ab", "cd"])


# ---- the HTTP server on a tiny trained run ----


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, Service) of a server on a free localhost port, over a tiny world run."""
    pytest.importorskip("uvicorn")
    from flaxgpt.serve.__main__ import build_service

    workdir = str(tmp_path_factory.mktemp("serve") / "run")
    overrides = dict(
        model={"block_size": 64, "vocab_multiple": 8}, eval={"interval": 2, "iters": 1, "sample_tokens": 0}
    )
    pretrain.run(tiny_run_config(train={"max_steps": 2}, checkpoint={"every_steps": 2}, **overrides), workdir)
    service = build_service(workdir, slots=4, max_queue=8)
    with serving(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_chat_completions_through_the_openai_client(server, client):
    _, service = server
    (model,) = [m.id for m in client.models.list().data]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Question: where is the key?"}]
    greedy = dict(model=model, messages=messages, temperature=0, max_tokens=12, seed=1)
    out = client.chat.completions.create(**greedy, logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and out.usage.completion_tokens <= 12
    # the same answer as the one generation engine's greedy decoding of the rendered chat
    tok = service.tokenizer
    prompt = chat_template.render(messages, tok, 64 - 12).ids
    stops = chat_template.stop_tokens(tok)
    engine = service.engine
    ref = generate.generate(
        engine.model,
        engine.params,
        [prompt],
        generate.DecodeConfig(12, 0.0),
        jax.random.PRNGKey(0),
        pad_id=tok.pad_id,
        stop_tokens=stops,
    )
    assert choice.message.content == tok.decode(generate.completions(ref, stops)[0])
    lp = choice.logprobs.content
    assert "".join(t.token for t in lp) == choice.message.content and len(lp[0].top_logprobs) == 3
    assert all(t.logprob <= 0 and t.logprob >= t.top_logprobs[-1].logprob for t in lp)
    # streaming gives the same text; n > 1 with a seed reproduces, and differs from another seed
    chunks = client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True})
    chunks = list(chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == choice.message.content and len(pieces) > 2
    assert chunks[-1].usage == out.usage and len({c.id for c in chunks}) == 1 and chunks[0].id != out.id
    sampled = dict(model=model, messages=messages, temperature=1.0, max_tokens=10, n=3)
    a = client.chat.completions.create(**sampled, seed=5)
    b = client.chat.completions.create(**sampled, seed=5)
    c = client.chat.completions.create(**sampled, seed=6)
    texts = lambda r: [ch.message.content for ch in r.choices]
    assert texts(a) == texts(b) != texts(c) and len(set(texts(a))) > 1


def test_stop_strings_completions_and_concurrency(server, client):
    _, service = server
    model = service.name
    full = client.completions.create(model=model, prompt="Question:", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=model, prompt="Question:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    # several clients at once: each gets what it gets alone
    prompts = [f"Question: {w}" for w in ("who", "where is", "what", "the", "a b c", "key")]
    ask = lambda p: client.completions.create(model=model, prompt=p, max_tokens=15, temperature=0).choices[0].text
    alone = [ask(p) for p in prompts]
    results = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone


def test_ignore_eos_and_min_tokens_through_the_openai_client(server, client):
    """vLLM's sampling parameters (the openai client's extra_body): with ignore_eos or min_tokens
    every answer has max_tokens tokens, where without them some end early; the tokens and logprobs
    before that end are the same; bad values are a 400 naming them."""
    openai = pytest.importorskip("openai")
    _, service = server
    ask = dict(model=service.name, messages=[{"role": "user", "content": "Question: who?"}], temperature=1.5)
    ask.update(n=6, seed=3, max_tokens=16, logprobs=True)
    free = client.chat.completions.create(**ask)
    assert any(c.finish_reason == "stop" for c in free.choices)  # this seed's answers include early ends
    for extra in ({"ignore_eos": True}, {"min_tokens": 16}):
        full = client.chat.completions.create(**ask, extra_body=extra)
        assert full.usage.completion_tokens == 6 * 16
        for short, long in zip(free.choices, full.choices):
            assert long.finish_reason == "length" and len(long.logprobs.content) == 16
            same = long.logprobs.content[: len(short.logprobs.content)]
            assert [t.token for t in same] == [t.token for t in short.logprobs.content]
            assert [t.logprob for t in same] == pytest.approx([t.logprob for t in short.logprobs.content], abs=1e-5)
            assert long.message.content.startswith(short.message.content)
    bad = [
        {"min_tokens": -1},
        {"min_tokens": "3"},
        {"ignore_eos": "yes"},
        {"min_tokens": 17},
        {"skip_special_tokens": 1},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**ask, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra))
    done = client.completions.create(model=service.name, prompt="Q", max_tokens=9, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 9 and done.choices[0].finish_reason == "length"


def test_stop_strings_wait_for_min_tokens():
    """A stop string is looked for only in text that ends past the first min_tokens - 1 tokens'."""

    class Chars:
        specials: dict = {}
        decode = staticmethod(lambda ids: "".join(map(chr, ids)))

    def answer(min_tokens: int) -> tuple[str, bool]:
        text = AnswerText(Chars(), ["ab"], min_tokens=min_tokens)
        pieces = [text.add(ord(c), 0.0, []) for c in "xabyzabw"]
        return "".join(pieces) + text.flush(), text.stopped

    assert answer(0) == answer(3) == ("x", True)
    assert answer(4) == answer(7) == ("xaby" + "z", True)  # "ab" ends at the 7th token
    assert answer(8) == ("xabyzabw", False)


class _ByteFallback:
    """Bytes as tokens, decoded as SentencePiece's byte fallback does: each byte of a character
    not yet complete shows as one U+FFFD; 256 is a special token."""

    specials = {"<|eos|>": 256}

    @staticmethod
    def decode(ids) -> str:
        out, pending = "", b""
        for i in ids:
            if i == 256:
                out, pending = out + "\ufffd" * len(pending) + "<|eos|>", b""
                continue
            pending += bytes([i])
            try:
                out, pending = out + pending.decode(), b""
            except UnicodeDecodeError:
                pass
        return out + "\ufffd" * len(pending)


def test_multibyte_characters_split_over_tokens_and_special_tokens_in_answers():
    def answer(ids, stop=(), min_tokens=0, skip=True) -> tuple[str, bool]:
        text = AnswerText(_ByteFallback(), list(stop), min_tokens=min_tokens, skip_special_tokens=skip)
        pieces = [text.add(t, 0.0, []) for t in ids]
        return "".join(pieces) + text.flush(), text.stopped

    ids = lambda s: list(s.encode())
    assert answer(ids("price 5€ or 7€ total")) == ("price 5€ or 7€ total", False)
    assert answer(ids("5€! more"), ["!"]) == ("5€", True)
    assert answer(ids("€! more"), ["!"], min_tokens=3) == ("€", True)  # "!" is the 4th token
    assert answer(ids("€! more"), ["!"], min_tokens=5) == ("€! more", False)
    eos_between = ids("ab") + [256] + ids("cd")
    assert answer(eos_between) == ("abcd", False)  # an end of turn run past (ignore_eos) is not text
    assert answer(eos_between, skip=False) == ("ab<|eos|>cd", False)


def test_errors_have_openais_shape_and_the_server_keeps_serving(server, client):
    url, service = server
    openai, httpx = pytest.importorskip("openai"), pytest.importorskip("httpx")
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=service.name, messages=[{"role": "user", "content": "x" * 200}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=service.name, messages=msgs, temperature=7)
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model=service.name, messages=[{"role": "assistant", "content": "x"}])
    bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url + "/v1/completions", content=b"x" * (2 << 20), timeout=10).status_code == 413
    assert httpx.get(url + "/v1/nothing", timeout=10).json()["error"]["message"].startswith("no route")
    assert httpx.get(url + "/v1/chat/completions", timeout=10).status_code == 405
    assert httpx.get(url + "/api/conversations/abc", timeout=10).json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    bodies = [  # (endpoint, body, the parameter the 400 names)
        ("completions", {"prompt": "hi", "echo": True}, "echo"),
        ("completions", {"prompt": "hi", "stream_options": []}, "stream_options"),
        ("completions", {"prompt": "x" * 100, "max_tokens": 16}, "prompt"),  # 100 + 16 tokens > 64
        (
            "chat/completions",
            {"messages": msgs, "stream": True, "stream_options": {"include_usage": "no"}},
            "stream_options.include_usage",
        ),
    ]
    for endpoint, body, param in bodies:
        r = httpx.post(f"{url}/v1/{endpoint}", json={"model": service.name, **body}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.chat.completions.create(model=service.name, messages=msgs, max_tokens=3).choices[0].message


def _page_chat(url: str, **body) -> list[dict]:
    """The events of one /api/chat call (server-sent events)."""
    import httpx

    with httpx.stream("POST", url + "/api/chat", json={"max_tokens": 8, "temperature": 0, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        text = "".join(r.iter_text())
    return [json.loads(line[len("data: ") :]) for line in text.split("\n\n") if line]


def test_chat_page_rows_and_export(server, tmp_path):
    import httpx

    from flaxgpt import feedback
    from flaxgpt.data import jsonl

    url, service = server
    page = httpx.get(url + "/", timeout=10).text
    assert "<script>" in page and "http://" not in page and "https://" not in page  # nothing from the network
    first = _page_chat(url, content="Question: where?", system="be brief")
    start, done = first[0], first[-1]
    assert start["type"] == "start" and done["type"] == "done" and done["step"] == service.engine.step
    answer = "".join(e["text"] for e in first if e["type"] == "delta")
    cid, user, a1 = start["conversation_id"], start["user_id"], done["message_id"]
    again = _page_chat(url, regenerate=a1, temperature=1.0, seed=3)
    a2 = again[-1]["message_id"]
    rate = lambda m, v, c="": httpx.post(url + "/api/rate", json={"message_id": m, "rating": v, "comment": c}).json()
    rate(a1, 1)
    rate(a1, -1, "<b>wrong</b>")  # the later click counts
    rate(a2, 1)
    follow = _page_chat(url, parent_id=a2, content="I tried it: not great", system="be brief")
    edited = _page_chat(url, edit_of=user, content="Question: who?", system="")
    bad = httpx.post(url + "/api/rate", json={"message_id": user, "rating": 1})  # a user turn is not rated
    assert bad.status_code == 404 and bad.json()["error"]["message"] == f"no assistant message {user}"
    # a refused request stores nothing: not even the user's turn
    store = service.store
    count = lambda: store.query("SELECT COUNT(*) AS n FROM messages")[0]["n"]
    before = count()
    refused = [{"min_tokens": 50, "max_tokens": 3}, {"content": "x" * 200}, {"edit_of": user, "temperature": 7}]
    for extra in refused:
        r = httpx.post(url + "/api/chat", json={"content": "Question: who?", "parent_id": a2, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
    assert count() == before
    # the rows: every answer, regeneration, edit, follow-up and rating
    rows = store.query(
        "SELECT id, parent_id, role, kind, revises_id, step, content FROM messages WHERE conversation_id = ?", (cid,)
    )
    kinds = [(r["role"], r["kind"]) for r in rows]
    assert kinds == [
        ("user", "message"),
        ("assistant", "message"),
        ("assistant", "regeneration"),
        ("user", "message"),
        ("assistant", "message"),
        ("user", "edit"),
        ("assistant", "message"),
    ]
    assert rows[1]["content"] == answer and rows[2]["revises_id"] == a1 and rows[5]["revises_id"] == user
    assert rows[3]["parent_id"] == a2 and rows[5]["parent_id"] is None
    assert len(store.query("SELECT * FROM ratings")) == 3
    shown = httpx.get(f"{url}/api/conversations/{cid}").json()  # what a reload shows: the newest branch
    assert [m["id"] for m in shown["messages"]] == [rows[5]["id"], edited[-1]["message_id"]]
    assert follow[0]["user_id"] == rows[3]["id"]
    # export: the project's schemas, with ids
    counts = feedback.main(["export", "--db", store.file, "--out", str(tmp_path)])
    assert counts == 0
    fb, _ = jsonl.read_jsonl(str(tmp_path / "feedback.jsonl"), "feedback")
    assert [(r["response"], r["label"], r["comment"]) for r in fb] == [
        (answer, False, "<b>wrong</b>"),
        (rows[2]["content"], True, ""),
    ]
    assert fb[0]["prompt"] == "Question: where?" and fb[0]["system"] == "be brief"
    pairs, _ = jsonl.read_jsonl(str(tmp_path / "pairs.jsonl"), "pairs")
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [(a2, a1)]
    convs, _ = jsonl.read_jsonl(str(tmp_path / "conversations.jsonl"), "conversations")
    assert [c["id"] for c in convs] == [f"conversation-{a2}"]
    assert convs[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert len({r["id"] for r in fb + pairs + convs}) == len(fb + pairs + convs)


def test_chat_page_refusals_are_400s_naming_the_field_and_store_nothing(server):
    import httpx

    url, service = server
    count = lambda: [
        service.store.query(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in ("conversations", "messages")
    ]
    before = count()
    answer = _page_chat(url, content="Question: where?", max_tokens=2)[-1]["message_id"]
    stored = count()
    big = 10**23
    post = lambda path, body: httpx.post(url + path, content=json.dumps(body).encode(), timeout=60)
    refused = [  # (path, body, status, the field named)
        ("/api/chat", {"content": "hi\ud800"}, 400, "content"),
        ("/api/chat", {"content": "hi", "system": "\udfff"}, 400, "system"),
        ("/api/chat", {"content": "hi", "conversation_id": 99999}, 404, "conversation_id"),
        ("/api/chat", {"content": "hi", "conversation_id": big}, 400, "conversation_id"),
        ("/api/chat", {"content": "hi", "parent_id": -big}, 400, "parent_id"),
        ("/api/rate", {"message_id": big, "rating": 1}, 400, "message_id"),
        ("/api/rate", {"message_id": answer, "rating": 1, "comment": "\ud800"}, 400, "comment"),
        ("/api/rate", {"message_id": answer, "rating": 1.0}, 400, "rating"),
    ]
    for path, body, status, field in refused:
        r = post(path, {"max_tokens": 2, **body})
        assert (r.status_code, r.json()["error"]["param"]) == (status, field), (body, r.text)
    r = httpx.get(f"{url}/api/conversations/{big}", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation_id"
    with pytest.raises(UnicodeEncodeError):  # a failed insert leaves no empty conversation behind
        service.store.add_turn(None, None, "x\ud800")
    assert count() == stored and stored[0] == before[0] + 1
    assert not service.store.query("SELECT * FROM ratings WHERE message_id = ?", (answer,))


@contextlib.contextmanager
def _serve_cli(workdir: str, db: str):
    """`python -m flaxgpt.serve` in its own process; yields its URL once /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "flaxgpt.serve", "--workdir", workdir, "--db", db, "--port", str(port), "--slots", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    try:
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_sigkill_after_an_acknowledged_rating_loses_nothing(server, tmp_path):
    import httpx

    from flaxgpt.serve.app import Service, create_app
    from flaxgpt.serve.store import FeedbackStore

    _, service = server
    workdir, db = os.path.dirname(service.store.file), str(tmp_path / "feedback.sqlite")
    with _serve_cli(workdir, db) as (url, proc):
        events = _page_chat(url, content="Question: where?", max_tokens=3)
        answer = events[-1]["message_id"]
        assert (
            httpx.post(url + "/api/rate", json={"message_id": answer, "rating": -1, "comment": "no"}).status_code == 200
        )
        proc.send_signal(signal.SIGKILL)  # right after the acknowledgement
        proc.wait(timeout=30)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT role FROM messages ORDER BY id").fetchall() == [("user",), ("assistant",)]
        assert con.execute("SELECT message_id, rating, comment FROM ratings").fetchall() == [(answer, -1, "no")]
    # a restarted server (here the app in this process, on that database) continues the conversation
    restarted = Service(service.engine, service.tokenizer, service.name, store=FeedbackStore(db))

    async def calls():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(restarted)), base_url="http://t"
        ) as c:
            shown = (await c.get(f"/api/conversations/{events[0]['conversation_id']}")).json()
            return shown, (await c.post("/api/rate", json={"message_id": answer, "rating": 1})).json()

    shown, rated = asyncio.run(calls())
    assert [m["rating"] for m in shown["messages"]] == [None, -1] and rated == {"id": 2}
    restarted.store.close()


_SHARDED = """
import json, sys, threading
import jax
from flaxgpt import runs
from flaxgpt.config import MeshConfig
from flaxgpt.model import Transformer
from flaxgpt.serve.engine import Request, SlotEngine
from flaxgpt.sharding import logical_rules, make_mesh

cfg, tok = runs.read_run(sys.argv[1])
rules, mesh = logical_rules(cfg.mesh.rules), make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
params, step = runs.restore_params(sys.argv[1], cfg, None, cfg.model, mesh, rules)
loaded = runs.LoadedModel(cfg, Transformer(cfg.model), params, tok, step, rules, mesh)
engine = SlotEngine(loaded.model, params, pad_id=tok.pad_id, slots=4, context=lambda: runs.logical_context(loaded))
engine.start()
got, left = {i: [] for i in range(3)}, threading.Semaphore(0)
sink = lambda i: lambda kind, p: got[i].append(p[0]) if kind == "token" else left.release()
for i, p in enumerate(json.loads(sys.argv[2])):
    engine.submit(Request(p, 10, sink(i), temperature=0.0))
for _ in range(3):
    left.acquire(timeout=120)
engine.stop()
specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)})
print(json.dumps({"tokens": [got[i] for i in range(3)], "specs": specs}))
"""


def test_engine_on_a_sharded_model(server):
    """fsdp x tensor over 4 simulated devices: the same greedy tokens as generate on one device."""
    _, service = server
    tok, engine = service.tokenizer, service.engine
    prompts = [tok.encode(p) for p in ("Where", "Q", "who is")]  # one prefill width: one compilation
    ref = generate.generate(
        engine.model, engine.params, prompts, generate.DecodeConfig(10, 0.0), jax.random.PRNGKey(0), pad_id=tok.pad_id
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": REPO}
    args = [sys.executable, "-c", _SHARDED, os.path.dirname(service.store.file), json.dumps(prompts)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == generate.completions(ref)
    assert any("fsdp" in s for s in out["specs"]) and any("tensor" in s for s in out["specs"]), out["specs"]


def test_reload_lets_requests_in_flight_finish_on_the_old_parameters(lone_model):
    model, params = lone_model
    new_params = init_params(model.cfg, seed=1)[1]
    engine = SlotEngine(model, params, pad_id=0, slots=3, step=1).start()
    try:
        prompt, old, new = PROMPTS[0], _greedy(model, params)[0], _greedy(model, new_params)[0]
        assert old != new
        events, started = [], threading.Event()
        sink = lambda kind, payload: (events.append((kind, payload)), started.set())
        running = Request(prompt, NEW, sink, temperature=0.0)
        engine.submit(running)
        assert started.wait(30)
        engine.reload(new_params, 2)  # while `running` decodes
        after = _collect(engine, [prompt], NEW, temperature=0.0)[0]
        assert [p[0] for k, p in events if k == "token"] == old and running.step == 1
        assert after == (new, "length") and engine.step == 2 and engine.pending_step is None
    finally:
        engine.stop()


def test_a_newer_checkpoint_is_served_once_found(server):
    import httpx

    from flaxgpt.serve.__main__ import reload_newer

    url, service = server
    workdir = os.path.dirname(service.store.file)
    assert not reload_newer(service, workdir)  # nothing newer
    served = service.engine.step
    shutil.copytree(os.path.join(workdir, "checkpoints", str(served)), os.path.join(workdir, "checkpoints", "1000"))
    assert reload_newer(service, workdir)
    done = _page_chat(url, content="Question: where?", max_tokens=2)[-1]
    assert done["step"] == 1000 and httpx.get(url + "/health").json()["step"] == 1000


def test_stores_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    """The server and the online learner may create the database together: each migration must
    run once (not fail with "table already exists" in the second), and switching to WAL at once
    must not fail with "database is locked" (a few in a hundred did)."""
    from flaxgpt.serve.store import SCHEMA_VERSION, FeedbackStore

    for trial in range(20):
        db, start, failed = str(tmp_path / f"{trial}.sqlite"), threading.Barrier(4), []

        def open_store():
            start.wait()
            try:
                FeedbackStore(db).close()
            except Exception as e:
                failed.append(e)

        threads = [threading.Thread(target=open_store) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not failed
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_export_reads_only_feedback_databases_and_never_teaches_a_thumbs_down_answer(tmp_path):
    from flaxgpt import cli, feedback
    from flaxgpt.serve.store import FeedbackStore

    db = str(tmp_path / "f.sqlite")
    store = FeedbackStore(db)
    c = store.new_conversation()
    wrong = store.add_message(c, store.add_message(c, None, "user", "2+2?"), "assistant", "5")
    store.rate(wrong, -1)
    right = store.add_message(c, store.add_message(c, wrong, "user", "and 3+3?"), "assistant", "6")
    store.rate(right, 1)
    alone = store.add_message(c, store.add_message(c, None, "user", "1+1?"), "assistant", "2")
    store.rate(alone, 1)
    store.close()
    out = tmp_path / "out"
    assert feedback.export(db, str(out)) == {"feedback": 3, "pairs": 0, "conversations": 1}
    (kept,) = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert [m["content"] for m in kept["messages"]] == ["1+1?", "2"]  # not the path through "5"
    empty, other = tmp_path / "empty.sqlite", tmp_path / "other.sqlite"
    empty.touch()
    with contextlib.closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE t (x)")
    for wrong_db in (empty, other, tmp_path):  # an empty file, another SQLite database, a directory
        assert cli.run(feedback.main, ["export", "--db", str(wrong_db), "--out", str(tmp_path / "o")]) == 2
    assert empty.stat().st_size == 0 and not (tmp_path / "o").exists()  # nothing written to either
    with contextlib.closing(sqlite3.connect(other)) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["t"]
    with contextlib.closing(sqlite3.connect(db)) as con:  # a damaged database: a rating of a missing message
        con.execute("INSERT INTO ratings (message_id, rating, comment, created) VALUES (999, 1, '', 0)")
        con.commit()
    with pytest.raises(UserError, match=r"f.sqlite: rating 4 names message 999, which is missing"):
        feedback.export(db, str(out))
    damaged = {  # each a copy of the database edited by hand, and what export says of it
        "UPDATE messages SET content = x'ff00' WHERE id = 2": r"messages row 2: content is bytes .*expected text",
        "UPDATE messages SET parent_id = 2 WHERE id = 1": r"message 2 has parent 1, which descends from it",
        "UPDATE ratings SET rating = 'up' WHERE id = 1": r"ratings row 1: rating is str 'up', expected 1 or -1",
    }
    for n, (sql, message) in enumerate(damaged.items()):
        copy = str(tmp_path / f"damaged{n}.sqlite")
        shutil.copy(db, copy)
        with contextlib.closing(sqlite3.connect(copy)) as con:
            con.execute("DELETE FROM ratings WHERE id = 4")
            con.execute("PRAGMA ignore_check_constraints = ON")
            con.execute(sql)
            con.commit()
        with pytest.raises(UserError, match=rf"damaged{n}.sqlite: {message}"):
            feedback.export(copy, str(tmp_path / f"o{n}"))
        assert not (tmp_path / f"o{n}").exists()


def test_api_key_schema_version_and_cli_errors(server, tmp_path):
    import httpx

    from flaxgpt import cli, feedback
    from flaxgpt.serve.__main__ import main
    from flaxgpt.serve.app import Service, create_app
    from flaxgpt.serve.store import FeedbackStore, StoreError

    _, service = server
    guarded = Service(service.engine, service.tokenizer, service.name, api_key="sesame")
    transport = httpx.ASGITransport(app=create_app(guarded))

    async def calls():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            no = await c.get("/v1/models")
            yes = await c.get("/v1/models", headers={"Authorization": "Bearer sesame"})
            page = await c.get("/")
            return no, yes, page

    no, yes, page = asyncio.run(calls())
    full = SlotEngine(service.engine.model, service.engine.params, pad_id=0, max_queue=0)  # never started: no room
    busy = httpx.ASGITransport(app=create_app(Service(full, service.tokenizer, service.name)))

    async def overloaded():
        async with httpx.AsyncClient(transport=busy, base_url="http://t") as c:
            body = {"model": service.name, "messages": [{"role": "user", "content": "hi"}]}
            return await c.post("/v1/chat/completions", json=body)

    refused = asyncio.run(overloaded())
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error"
    assert no.status_code == 401 and no.json()["error"]["code"] == "invalid_api_key"
    assert yes.status_code == 200 and page.status_code == 200 and "innerHTML" not in page.text
    # a database from a newer flaxgpt is refused, not rewritten
    db = str(tmp_path / "f.sqlite")
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        FeedbackStore(db)
    assert cli.run(main, ["--workdir", str(tmp_path / "nothing")]) == 2
    run, reward = os.path.dirname(service.store.file), tmp_path / "reward"
    reward.mkdir()
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["output"] = "scalar"
    (reward / "config.json").write_text(json.dumps(cfg))
    shutil.copy(os.path.join(run, "tokenizer.json"), reward)
    assert cli.run(main, ["--workdir", str(reward)]) == 2  # a reward model is not served
    assert cli.run(feedback.main, ["export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path)]) == 2
    run_dir = os.path.dirname(service.store.file)
    engines = lambda: sum(t.name == "flaxgpt-engine" for t in threading.enumerate())
    running, notdb = engines(), tmp_path / "notdb.sqlite"
    notdb.write_text("not a database")
    for db in (notdb, tmp_path):  # the store is opened before the engine starts: no engine thread left
        assert cli.run(main, ["--workdir", run_dir, "--db", str(db)]) == 2
        assert engines() == running


def test_serve_flags_and_a_busy_port_are_one_line_before_the_url(server, capsys):
    from flaxgpt import cli
    from flaxgpt.serve.__main__ import main

    run_dir = os.path.dirname(server[1].store.file)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.run(main, ["--workdir", run_dir, "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert "http://" not in out.out and out.err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen")
    assert len(out.err.splitlines()) == 1
    for flag, value in [("--slots", "0"), ("--max-queue", "-1"), ("--reload-every", "nan"), ("--port", "99999")]:
        with pytest.raises(SystemExit) as e:
            main(["--workdir", run_dir, flag, value])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


def _browser():
    """A headless Chromium under selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_chat_page_in_a_headless_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, service = server
    browser = _browser()
    wait = WebDriverWait(browser, 60)
    answers = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    done = lambda n: wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant button.up")) == n)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "system").send_keys("brief")  # the context is 64
        browser.find_element(By.ID, "input").send_keys("Where <b>is</b>?")
        browser.find_element(By.ID, "send").click()
        done(1)
        first = answers()[0].find_element(By.CSS_SELECTOR, ".body").text
        browser.find_element(By.CSS_SELECTOR, ".msg.assistant button.down").click()
        alert = wait.until(expected_conditions.alert_is_present())
        alert.send_keys("not <i>helpful</i>")
        alert.accept()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "button.down.on"))
        browser.find_element(By.CSS_SELECTOR, ".msg.user button.edit").click()
        box = browser.find_element(By.CSS_SELECTOR, "textarea.edit")
        box.clear()
        box.send_keys("Who?")
        browser.find_element(By.CSS_SELECTOR, "button.resend").click()
        done(1)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "Who?")
        browser.refresh()  # the conversation comes back from the database
        done(1)
        users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .body")]
        assert users == ["Who?"] and browser.find_element(By.ID, "system").get_attribute("value") == "brief"
        browser.save_screenshot(str(tmp_path / "chat.png"))  # pytest --basetemp DIR keeps it to look at
        assert (tmp_path / "chat.png").stat().st_size > 1000
    finally:
        browser.quit()
    cid = service.store.query("SELECT MAX(conversation_id) AS c FROM messages")[0]["c"]
    rows = service.store.query("SELECT role, kind, content FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
    assert [(r["role"], r["kind"]) for r in rows] == [
        ("user", "message"),
        ("assistant", "message"),
        ("user", "edit"),
        ("assistant", "message"),
    ]
    assert rows[0]["content"] == "Where <b>is</b>?" and rows[1]["content"].strip() == first  # the page shows it trimmed
    rated = service.store.query(
        "SELECT rating, comment FROM ratings WHERE message_id = (SELECT id FROM messages "
        "WHERE conversation_id = ? AND role = 'assistant' ORDER BY id LIMIT 1)",
        (cid,),
    )
    assert rated == [{"rating": -1, "comment": "not <i>helpful</i>"}]
