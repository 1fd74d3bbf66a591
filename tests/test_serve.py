"""The server: the slot engine against `generate`, the OpenAI API through the `openai` client,
the chat page's feedback rows, and their export. One tiny run and one server for the file."""

from __future__ import annotations

import threading

import jax
import pytest

from flaxgpt import generate
from flaxgpt.serve.engine import Overloaded, Request, RequestError, SlotEngine
from tests.conftest import init_params, tiny_model_config


def _collect(engine: SlotEngine, prompts, max_tokens, **kw) -> list[tuple[list[int], str]]:
    """Submit every prompt at once; wait for all answers."""
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
        engine.submit(Request(p, max_tokens, sink_for(i), **kw))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return [results[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def lone_model():
    cfg = tiny_model_config(block_size=32, vocab_size=50, init_std=0.5)  # peaked logits: context-dependent tokens
    return init_params(cfg)


def test_batched_greedy_tokens_equal_alone_and_generate(lone_model):
    model, params = lone_model
    engine = SlotEngine(model, params, pad_id=0, slots=3).start()
    try:
        prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3], [4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4, 9], [7, 8], [9, 2, 9]]
        alone = [_collect(engine, [p], 20, temperature=0.0)[0] for p in prompts]
        batched = _collect(engine, prompts, 20, temperature=0.0)  # 6 requests on 3 rows: rows are reused
        cfg = generate.DecodeConfig(max_new_tokens=20, temperature=0.0)
        ref = generate.completions(generate.generate(model, params, prompts, cfg, jax.random.PRNGKey(0), pad_id=0))
        for one, many, expected in zip(alone, batched, ref):
            assert one == many == (expected, "length")
        assert len({tuple(t) for t, _ in alone}) > 2  # the answers differ by prompt
        # sampling: a seed gives the same tokens alone and in a batch; another seed others
        sampled = _collect(engine, [prompts[0]] * 3, 12, temperature=1.0, seed=7)
        assert sampled[0] == sampled[1] == sampled[2] == _collect(engine, [prompts[0]], 12, temperature=1.0, seed=7)[0]
        assert _collect(engine, [prompts[0]], 12, temperature=1.0, seed=8)[0] != sampled[0]
        # a stop token ends the request without being reported
        first = alone[0][0]
        stopped = _collect(engine, [prompts[0]], 20, temperature=0.0, stop_tokens=(first[3],))[0]
        assert stopped == (first[: first.index(first[3])], "stop")
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
