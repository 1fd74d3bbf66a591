"""The serving engine: continuous batching on the one generation engine's slot functions.

A thread owns the model and a KV cache of `slots` rows. Between decode steps it admits waiting
requests into the lowest free rows (all waiting prompts that fit prefilled in one call, each into
its row), then advances the active rows one token (the rows up to the highest active one, their
number padded to a bucket: a step's cost grows with its rows); a request arriving while others
decode joins them at the next step. Shapes never change, so nothing is compiled per request
(prompts are padded to a few bucket widths, and their number to a few bucket counts).
Each request samples with its own seed, temperature and top-p, so its tokens do not depend on
what it was batched with. A step leaves out the work no active row asks for (the top-p sort, the
alternatives behind top_logprobs, banning stop tokens before a request's min_tokens): each such
combination is one more program per row bucket, at most eight.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from flaxgpt import generate
from flaxgpt.errors import UserError
from flaxgpt.sharding import host_value

MAX_STOP_TOKENS = 4  # stop tokens a request with min_tokens may have banned (a fixed shape)


def spans_processes(params: Any) -> bool:
    """Whether the parameters lie on a mesh over several processes (read when they are set, not
    on every step: host inputs must then be placed on that mesh)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return isinstance(sharding, NamedSharding) and not sharding.is_fully_addressable


class RequestError(UserError):
    """A request the engine cannot serve as asked (HTTP 400)."""


class Overloaded(Exception):
    """The waiting queue is full (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. `sink(kind, payload)` receives ("token", (id, logprob, [(id, logprob)...]
    when top_logprobs else [])) per generated token and finally ("done", reason: "stop" | "length"
    | "cancelled" | "error"), from the engine's thread."""

    prompt: list[int]
    max_tokens: int
    sink: Callable[[str, Any], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    min_tokens: int = 0  # no stop token before this many tokens (they are banned from sampling)
    top_logprobs: int = 0  # > 0: each token comes with the TOP_LOGPROBS most likely alternatives
    generated: int = 0
    step: int | None = None  # the checkpoint step that answers (set when admitted)
    cancelled: bool = False


def bucket(length: int, block_size: int) -> int:
    """The padded prefill width of a prompt: 8, 12, 16, 24, 32, 48, 64, 96, ... (powers of two and
    the halfway points between them, at most block_size). A prefill's cost grows with its width,
    padding included: this wastes under a third, with still few widths (each compiled once)."""
    width = 8
    while width < length:
        width = width // 3 * 4 if width & (width - 1) else width * 3 // 2
    return min(width, block_size)


def batch_bucket(count: int, slots: int) -> int:
    """The padded number of prompts prefilled in one call: 1, 2, 4, 8, ... (at most `slots`). A
    prefill's cost grows with its rows, filler included, so the buckets are close together; each
    is compiled once (beside each prompt width used)."""
    size = 1
    while size < count:
        size *= 2
    return min(size, slots)


def prng_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` (threefry's [high, low] 32-bit words) made on the host: a JAX
    call per admitted request would wait for the prefill in flight."""
    return np.asarray([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


class SlotEngine:
    def __init__(
        self,
        model: Any,
        params: Any,
        *,
        pad_id: int,
        step: int = 0,
        slots: int = 8,
        max_queue: int = 64,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model, self.params, self.step, self.pad_id = model, params, step, pad_id
        self._spans_processes = spans_processes(params)
        self.block_size, self.slots, self.max_queue, self.context = model.cfg.block_size, slots, max_queue, context
        self._rows: list[Request | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._pending: tuple[Any, int] | None = None
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        # since start: prefill calls, the rows they computed (filler included) and the prompts among
        # them, decode steps, the rows those steps advanced, and seconds spent in both
        self.work = dict.fromkeys(("prefills", "prefill_rows", "prompts", "steps", "step_rows", "busy_s"), 0)
        self._programs: set = set()  # shapes used, each a program: prefill (prompts, width), step rows
        self._reset_host_state()

    def _reset_host_state(self) -> None:
        s = self.slots
        self.cursor = 0
        self.starts, self.positions, self.counts = (np.zeros(s, np.int32) for _ in range(3))
        self.keys = np.zeros((s, 2), np.uint32)
        self.temperature, self.top_p = np.zeros(s, np.float32), np.ones(s, np.float32)

    # ---- the API side (any thread) ----
    def submit(self, request: Request) -> None:
        """Queue a request; raises RequestError (does not fit the context) or Overloaded."""
        n = len(request.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if request.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if request.min_tokens and len(request.stop_tokens) > MAX_STOP_TOKENS:
            raise ValueError(f"min_tokens can ban at most {MAX_STOP_TOKENS} stop tokens")
        if n + request.max_tokens > self.block_size:
            raise RequestError(
                f"This model's maximum context length is {self.block_size} tokens. However, you requested "
                f"{n + request.max_tokens} tokens ({n} in the prompt, {request.max_tokens} in the completion)."
            )
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the server is busy ({len(self._waiting)} requests waiting); retry shortly")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (a stop string was seen, or its client left); its row frees at the next step."""
        request.cancelled = True

    def reload(self, params: Any, step: int) -> None:
        """Serve `params` from now on: requests in flight finish on the old ones first."""
        with self._wake:
            self._pending = (params, step)
            self._wake.notify()

    @property
    def pending_step(self) -> int | None:
        """The step of parameters waiting to be swapped in, if any."""
        pending = self._pending
        return None if pending is None else pending[1]

    def start(self) -> SlotEngine:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="flaxgpt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> dict:
        return {
            "slots": self.slots,
            "active": sum(r is not None for r in self._rows),
            "waiting": len(self._waiting),
            "step": self.step,
            **self.work,
            "programs": len(self._programs),
        }

    # ---- the engine's thread ----
    def _loop(self) -> None:
        with self.context():
            self._empty_cache()
            while True:
                with self._wake:
                    while self._running and not self._waiting and not self._active() and self._pending is None:
                        self._wake.wait()
                    if not self._running:
                        break
                start = time.perf_counter()
                try:
                    self._swap_params()
                    self._admit()
                    if self._active():
                        self._decode()
                    self.work["busy_s"] += time.perf_counter() - start
                except Exception:  # a bug: fail what is in flight, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all()
            self._fail_all("cancelled")

    def _active(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is not None]

    def _swap_params(self) -> None:
        if self._pending is not None and not self._active():
            with self._wake:
                (self.params, self.step), self._pending = self._pending, None
                self._spans_processes = spans_processes(self.params)

    def _admit(self) -> None:
        free = [i for i, r in enumerate(self._rows) if r is None]
        admitted, cancelled = [], []
        with self._wake:
            while self._pending is None and self._waiting and len(admitted) < len(free):
                request = self._waiting.popleft()
                (cancelled if request.cancelled else admitted).append(request)
        for request in cancelled:
            request.sink("done", "cancelled")
        if admitted:
            self._prefill(free[: len(admitted)], admitted)

    def _prefill(self, slots: list[int], requests: list[Request]) -> None:
        """One call for every admitted prompt; filler rows (a slot out of range) are dropped."""
        longest = max(len(r.prompt) for r in requests)
        if self.cursor < longest:  # make room to the left of the write index
            self._shift(self.cursor - longest)
        filler = batch_bucket(len(requests), self.slots) - len(requests)
        prompts = [r.prompt for r in requests] + [requests[-1].prompt] * filler
        tokens, mask = generate.left_pad(prompts, self.pad_id, bucket(longest, self.block_size))
        rows = np.asarray(slots + [self.slots] * filler, np.int32)
        self._programs.add(tokens.shape)
        self._count(prefills=1, prefill_rows=len(rows), prompts=len(requests))
        tokens, mask, rows = self._inputs(tokens, mask, rows)
        self.cache, self.last, _ = generate.slot_prefill(
            self.model, self.params, self.cache, self.last, tokens, mask, rows, self.cursor
        )
        for slot, request in zip(slots, requests):
            n = len(request.prompt)
            self.starts[slot], self.positions[slot], self.counts[slot] = self.cursor - n, n, 0
            self.keys[slot] = prng_key(request.seed)
            self.temperature[slot], self.top_p[slot] = request.temperature, request.top_p
            request.step = self.step
            self._rows[slot] = request

    def _inputs(self, *arrays: np.ndarray) -> tuple:
        """Host arrays for the slot programs: replicated over the parameters' mesh when it spans
        processes, else as they are (jit places numpy arrays itself, for less than a device_put of
        each: on every decode step that was a sixth of the engine thread's time)."""
        if self._spans_processes:
            return generate.on_params_mesh(self.params, *arrays)
        return arrays

    def _count(self, **amounts: int) -> None:
        for k, v in amounts.items():
            self.work[k] += v

    def _shift(self, shift: int) -> None:
        self.cache = generate.slot_shift(self.model, self.cache, shift)
        self.cursor -= shift
        self.starts -= shift

    def _decode(self) -> None:
        for i in self._active():
            if self._rows[i].cancelled:
                self._finish(i, "cancelled")
        active = self._active()
        if not active:
            return
        if self.cursor == self.block_size:  # the write index is at the end: move every row left
            self._shift(int(min(self.starts[i] for i in active)))
        live = np.zeros(self.slots, bool)
        live[active] = True
        banned = self._banned(active)
        host = (np.where(live, self.positions, 0), self.keys, self.counts, self.temperature, self.top_p)
        inputs = self._inputs(*host, *([] if banned is None else [banned]))
        rows = batch_bucket(active[-1] + 1, self.slots)  # requests are admitted into the lowest free rows
        # work no active row needs is left out of the step (each combination a program, compiled once)
        nucleus = bool(np.any((self.temperature[active] > 0) & (self.top_p[active] < 1)))
        top = any(self._rows[i].top_logprobs for i in active)
        self._programs.add((rows, nucleus, top, banned is not None))
        self.cache, self.last, *out = generate.slot_step(
            self.model, self.params, self.cache, self.last, *inputs, rows=rows, nucleus=nucleus, top=top
        )
        self.cursor += 1
        self._count(steps=1, step_rows=len(active))
        tokens, logprobs, top_ids, top_values = (x.tolist() for x in host_value(out))  # Python numbers at once
        for i in active:
            self._deliver(i, tokens[i], logprobs[i], top_ids[i], top_values[i])

    def _banned(self, active: list[int]) -> np.ndarray | None:
        """[slots, MAX_STOP_TOKENS] ids each row may not sample now (its stop tokens before its
        min_tokens; vocab_size: none), or None when no row bans any."""
        rows = [i for i in active if self.counts[i] < self._rows[i].min_tokens and self._rows[i].stop_tokens]
        if not rows:
            return None
        banned = np.full((self.slots, MAX_STOP_TOKENS), self.model.cfg.vocab_size, np.int32)
        for i in rows:
            stops = self._rows[i].stop_tokens
            banned[i, : len(stops)] = stops
        return banned

    def _deliver(self, slot: int, token: int, logprob: float, top_ids: list[int], top_values: list[float]) -> None:
        request = self._rows[slot]
        self.positions[slot] += 1
        self.counts[slot] += 1
        if token in request.stop_tokens:
            return self._finish(slot, "stop")
        request.generated += 1
        request.sink("token", (token, logprob, list(zip(top_ids, top_values))))
        if request.generated >= request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        request, self._rows[slot] = self._rows[slot], None
        request.sink("done", reason)

    def _fail_all(self, reason: str = "error") -> None:
        for i in self._active():
            self._finish(i, reason)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.sink("done", reason)
        if reason == "error":  # the cache may be half-updated: start from an empty one
            self._reset_host_state()
            self._empty_cache()

    def _empty_cache(self) -> None:
        self.cache = generate.slot_cache(self.model, self.slots)
        vocab = np.zeros((self.slots, self.model.cfg.vocab_size), np.float32)
        self.last = generate.on_params_mesh(self.params, vocab)[0]
