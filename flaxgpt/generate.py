"""The one generation engine: KV-cache decoding in a single jit, used by sampling, evaluation,
chat and PPO rollouts alike.

Prompts of different lengths are left-padded; each row's positions count only its real
tokens, so RoPE and learned positions see what a lone prompt would. One prefill pass fills
the cache, then a `lax.while_loop` emits one token per step for every row until each row
has produced a stop token or `max_new_tokens` (or the loop ends early when all have).

Strategies: greedy (temperature 0), temperature sampling with top-k and top-p (nucleus)
filtering, and beam search with a length penalty. Every generated token comes with its
log-probability under the sampling distribution (temperature-scaled, filtered: what PPO's
ratio needs) and under the raw model.

`sliding_window_sample` continues text past the context window by recomputing the last
`block_size` tokens each step (nanoGPT's way); it is also the reference the cache is
tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from flaxgpt.conversations import padded_chunks
from flaxgpt.sharding import host_value, replicated

Array = jax.Array


class _Stream:
    """Where tokens go while a streaming generation runs (host side; one at a time)."""

    callback = None

    @classmethod
    def emit(cls, tokens: np.ndarray) -> None:
        if cls.callback is not None:
            cls.callback(np.asarray(tokens))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    num_beams: int = 1  # > 1: beam search (deterministic; temperature / top-k / top-p unused)
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty


@flax.struct.dataclass
class Generation:
    tokens: Array  # [batch, max_new_tokens], pad after the stop token
    logprobs: Array  # [batch, max_new_tokens], under the sampling distribution (0 after the end)
    raw_logprobs: Array  # [batch, max_new_tokens], under the raw model (temperature 1, unfiltered)
    lengths: Array  # [batch], generated tokens including the stop token


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [batch, width], mask [batch, width]) with prompts aligned to the right;
    width defaults to the longest prompt (a fixed width keeps one compiled shape)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if width is not None and width < longest:
        raise ValueError(f"a prompt has {longest} tokens, more than the padded width {width}")
    width = width or longest
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    return tokens, mask


def process_logits(logits: Array, cfg: DecodeConfig) -> Array:
    """The sampling distribution's logits: temperature, then top-k, then top-p filtering."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature == 0.0:
        return logits
    logits = logits / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep_sorted = before < cfg.top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def choose_token(logits: Array, rng: Array, cfg: DecodeConfig) -> tuple[Array, Array, Array]:
    """(token, log p under the sampling distribution, log p under the raw model)."""
    processed = process_logits(logits, cfg)
    token = jnp.argmax(processed, -1) if cfg.temperature == 0.0 else jax.random.categorical(rng, processed, -1)
    pick = lambda lp: jnp.take_along_axis(lp, token[:, None], -1)[:, 0]
    return token, pick(jax.nn.log_softmax(processed)), pick(jax.nn.log_softmax(logits.astype(jnp.float32)))


def _empty_cache(model: nn.Module, batch: int, length: int) -> Any:
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32), decode=True)
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def mask_positions(mask: Any) -> Any:
    """Positions of tokens under a (left- or right-) padded attention mask [B, T] (numpy or jax)."""
    return (mask.astype(np.int32).cumsum(axis=1) - 1).clip(0)


def _prefill(model, params, tokens, mask, total):
    """(last position's logits, the cache of `total` columns holding the prompt, next position)."""
    cache = _empty_cache(model, tokens.shape[0], total)
    positions = mask_positions(mask)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens, positions, mask.astype(jnp.int32), decode=True, mutable=["cache"]
    )
    return logits[:, -1], variables["cache"], positions[:, -1] + 1


def group_prefill(model, params, tokens, mask, total, group: int = 1):
    """`_prefill` for rows in runs of `group` copies of one prompt (GRPO's answers to a question):
    each prompt is computed once and its cache row, last logits and position repeated."""
    if group == 1:
        return _prefill(model, params, tokens, mask, total)
    last, cache, position = _prefill(model, params, tokens[::group], mask[::group], total)
    return jnp.repeat(last, group, axis=0), repeat_cache_rows(model, cache, group), jnp.repeat(position, group)


def _step(model, params, cache, token, position):
    ones = jnp.ones_like(token)[:, None]
    logits, variables = model.apply(
        {"params": params, "cache": cache}, token[:, None], position[:, None], ones, decode=True, mutable=["cache"]
    )
    return logits[:, 0], variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "cfg", "stop_tokens", "pad_id", "stream", "group"))
def _sample(
    model,
    params,
    tokens,
    mask,
    rng,
    *,
    cfg: DecodeConfig,
    stop_tokens: tuple,
    pad_id: int,
    stream: bool = False,
    group: int = 1,
):
    batch, n = tokens.shape[0], cfg.max_new_tokens
    last, cache, position = group_prefill(model, params, tokens, mask, tokens.shape[1] + n, group)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    out = Generation(
        tokens=jnp.full((batch, n), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, n)),
        raw_logprobs=jnp.zeros((batch, n)),
        lengths=jnp.zeros((batch,), jnp.int32),
    )

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < n) & ~jnp.all(done)

    def body(rows, carry):  # a step of the batch's `rows`
        t, cache, last, position, done, out, rng = carry
        rng, key = jax.random.split(rng)
        token, logp, raw = choose_token(last, key, cfg)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        out = out.replace(
            tokens=out.tokens.at[rows, t].set(token),
            logprobs=out.logprobs.at[rows, t].set(jnp.where(done, 0.0, logp)),
            raw_logprobs=out.raw_logprobs.at[rows, t].set(jnp.where(done, 0.0, raw)),
            lengths=out.lengths.at[rows].add((~done).astype(jnp.int32)),
        )
        if stream:  # hand each step's tokens to the host as they are chosen
            jax.debug.callback(_Stream.emit, out.tokens[:, t], ordered=True)
        done = done | jnp.isin(token, stops)
        last, cache = _step(model, params, cache, token, position)
        return t + 1, cache, last, position + 1, done, out, rng

    # Most answers end early: once `few` rows are left, only those rows (and finished ones to
    # make up the count) continue, their cache rows taken out of the batch's.
    few, rows = (batch // 4 if batch >= 8 else 0), jnp.arange(batch)
    carry = (jnp.zeros((), jnp.int32), cache, last, position, jnp.zeros((batch,), bool), out, rng)
    carry = jax.lax.while_loop(lambda c: cond(c) & (jnp.sum(~c[4]) > few), functools.partial(body, rows), carry)
    if few:
        t, cache, last, position, done, out, rng = carry
        rows = jax.lax.top_k((~done).astype(jnp.int32), few)[1]
        carry = (t, take_cache_rows(model, cache, rows), last[rows], position[rows], done[rows], out, rng)
        carry = jax.lax.while_loop(cond, functools.partial(body, rows), carry)
    return carry[5]


@functools.partial(jax.jit, static_argnames=("model", "cfg", "stop_tokens", "pad_id"))
def _beam_search(model, params, tokens, mask, *, cfg: DecodeConfig, stop_tokens: tuple, pad_id: int):
    batch, beams, n = tokens.shape[0], cfg.num_beams, cfg.max_new_tokens
    repeat = lambda x: jnp.repeat(x, beams, axis=0)
    last, cache, position = _prefill(model, params, repeat(tokens), repeat(mask), tokens.shape[1] + n)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    neg = jnp.finfo(jnp.float32).min
    scores = jnp.tile(jnp.array([0.0] + [neg] * (beams - 1)), (batch, 1))  # only beam 0 is live at first
    history = jnp.full((batch, beams, n), pad_id, jnp.int32)
    raw_history = jnp.zeros((batch, beams, n))
    lengths = jnp.zeros((batch, beams), jnp.int32)
    done = jnp.zeros((batch, beams), bool)

    def body(t, carry):
        cache, last, position, scores, history, raw_history, lengths, done = carry
        logp = jax.nn.log_softmax(last.astype(jnp.float32)).reshape(batch, beams, -1)
        vocab = logp.shape[-1]
        # A finished beam may only continue with pad, at no cost, so it keeps its score.
        finished_row = jnp.full((vocab,), neg).at[pad_id].set(0.0)
        step_logp = jnp.where(done[..., None], finished_row, logp)
        total = (scores[..., None] + step_logp).reshape(batch, beams * vocab)
        scores, flat = jax.lax.top_k(total, beams)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        gather = lambda x: jnp.take_along_axis(x, parent.reshape(batch, beams, *([1] * (x.ndim - 2))), axis=1)
        was_done = gather(done)
        history = gather(history).at[:, :, t].set(token)
        raw = jnp.take_along_axis(gather(logp), token[..., None], -1)[..., 0]
        raw_history = gather(raw_history).at[:, :, t].set(jnp.where(was_done, 0.0, raw))
        lengths = gather(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | jnp.isin(token, stops)
        rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
        cache = _reorder_cache(cache, rows, axis=1 if model.cfg.scan_layers else 0)
        last, cache = _step(model, params, cache, token.reshape(-1), position[rows])
        return cache, last, position[rows] + 1, scores, history, raw_history, lengths, done

    carry = (cache, last, position, scores, history, raw_history, lengths, done)
    _, _, _, scores, history, raw_history, lengths, done = jax.lax.fori_loop(0, n, body, carry)
    normalised = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** cfg.length_penalty
    best = jnp.argmax(normalised, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best.reshape(batch, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]
    raw = pick(raw_history)
    return Generation(tokens=pick(history), logprobs=raw, raw_logprobs=raw, lengths=pick(lengths))


def take_cache_rows(model: nn.Module, cache: Any, rows: Array) -> Any:
    """The cache's `rows` (indices stay): some rows' continuation, the others dropped."""
    return _reorder_cache(cache, rows, _cache_axes(model)[0])


def _reorder_cache(cache: Any, rows: Array, axis: int) -> Any:
    """Pick cache rows (beam search follows each surviving beam's parent); indices stay."""

    def pick(path, leaf):
        return leaf if getattr(path[-1], "key", None) == "cache_index" else jnp.take(leaf, rows, axis=axis)

    return jax.tree_util.tree_map_with_path(pick, cache)


def generate(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    cfg: DecodeConfig,
    rng: Array,
    *,
    pad_id: int,
    stop_tokens: Sequence[int] = (),
    on_tokens: Callable[[np.ndarray], None] | None = None,
    prompt_width: int | None = None,
    group: int = 1,
) -> Generation:
    """Continue each prompt (token ids) under `cfg`; rows stop at any of `stop_tokens`.

    `on_tokens`, if given, receives each step's [batch] tokens as the loop produces them
    (streaming; sampling only), from inside the same compiled loop. `prompt_width` pads
    prompts to a fixed width, so calls with different prompts share one compilation. `group` > 1
    says the prompts come in runs of that many copies (sampling; see `group_prefill`)."""
    tokens, mask = left_pad(prompts, pad_id, prompt_width)
    if tokens.shape[1] + cfg.max_new_tokens > model.cfg.block_size:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
            f"model's block_size {model.cfg.block_size}; shorten the prompt or use sliding_window_sample"
        )
    tokens, mask, rng = on_params_mesh(params, tokens, mask, rng)
    kwargs = dict(cfg=cfg, stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))
    if cfg.num_beams > 1:
        return _beam_search(model, params, tokens, mask, **kwargs)
    if on_tokens is None:
        return _sample(model, params, tokens, mask, rng, group=group, **kwargs)
    _Stream.callback = on_tokens
    try:
        return jax.block_until_ready(_sample(model, params, tokens, mask, rng, stream=True, **kwargs))
    finally:
        jax.effects_barrier()
        _Stream.callback = None


def on_params_mesh(params: Any, *arrays: Any) -> tuple:
    """Replicate host inputs over the parameters' mesh, so generation runs when they span processes."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
        return tuple(jax.device_put(np.asarray(a), replicated(sharding.mesh)) for a in arrays)
    return tuple(jnp.asarray(a) for a in arrays)


def generate_batched(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    cfg: DecodeConfig,
    rng: Array,
    *,
    batch_size: int,
    pad_id: int,
    stop_tokens: Sequence[int] = (),
    prompt_width: int | None = None,
) -> list[list[int]]:
    """Completions (without the stop token) of any number of prompts, in chunks of one fixed shape
    (`batch_size` rows, prompts padded to `prompt_width`, by default block_size - max_new_tokens),
    so it compiles once. A caller that knows its prompts are short passes a narrower width: every
    chunk's prefill and attention then cost less."""
    width = prompt_width or model.cfg.block_size - cfg.max_new_tokens
    out: list[list[int]] = []
    for i, (chunk, real) in enumerate(padded_chunks(prompts, batch_size)):  # full chunks: one compiled shape
        gen = generate(
            model,
            params,
            chunk,
            cfg,
            jax.random.fold_in(rng, i * batch_size),
            pad_id=pad_id,
            stop_tokens=stop_tokens,
            prompt_width=width,
        )
        out += completions(gen, stop_tokens)[:real]
    return out


def completions(gen: Generation, stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Host lists of each row's generated ids, without a final stop token."""
    tokens, lengths = host_value(gen.tokens), host_value(gen.lengths)
    rows = [list(map(int, row[:n])) for row, n in zip(tokens, lengths)]
    return [row[:-1] if row and row[-1] in stop_tokens else row for row in rows]


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "max_new_tokens", "cfg"))
def _sliding_loop(model, params, buffer, rng, *, prompt_len, max_new_tokens, cfg):
    block = model.cfg.block_size

    def body(i, carry):
        buffer, rng = carry
        rng, key = jax.random.split(rng)
        cur = prompt_len + i
        start = jnp.maximum(0, cur - block)
        window = jax.lax.dynamic_slice(buffer, (0, start), (buffer.shape[0], block))
        logits = model.apply({"params": params}, window)
        last = jax.lax.dynamic_index_in_dim(logits, cur - start - 1, axis=1, keepdims=False)
        token = choose_token(last, key, cfg)[0].astype(buffer.dtype)
        return buffer.at[:, cur].set(token), rng

    return jax.lax.fori_loop(0, max_new_tokens, body, (buffer, rng))[0]


def sliding_window_sample(
    model: nn.Module, params: Any, prompt: Sequence[int], cfg: DecodeConfig, rng: Array, stop_token: int | None = None
) -> list[int]:
    """Continue one prompt by any number of tokens, recomputing the last block_size each step."""
    if len(prompt) == 0:
        raise ValueError("sampling needs a prompt of at least one token")
    block, n = model.cfg.block_size, cfg.max_new_tokens
    prompt = list(prompt)[-block:]
    buffer = np.zeros((1, max(len(prompt) + n, block)), np.int32)
    buffer[0, : len(prompt)] = prompt
    buffer, rng = on_params_mesh(params, buffer, rng)
    out = _sliding_loop(model, params, buffer, rng, prompt_len=len(prompt), max_new_tokens=n, cfg=cfg)
    new = [int(t) for t in host_value(out)[0, len(prompt) : len(prompt) + n]]
    return new[: new.index(stop_token)] if stop_token is not None and stop_token in new else new


# Serving: continuous batching over a fixed number of cache rows ("slots"). All rows share the
# cache's one write index (the model's cache design); each row's tokens occupy a contiguous run of
# columns ending at that index, and the mask hides everything else. Waiting prompts are
# prefilled together and each rolled into its row so that it ends at the shared index; when the index
# reaches the end, every row is rolled left together. Positions are explicit, so where a row's
# columns lie does not change what it computes, and nothing is compiled per request.

TOP_LOGPROBS = 20  # the most alternatives a served token reports (OpenAI's top_logprobs limit)


def slot_cache(model: nn.Module, slots: int) -> Any:
    """An empty KV cache of `slots` rows, each block_size long."""
    return _empty_cache(model, slots, model.cfg.block_size)


def _cache_axes(model: nn.Module) -> tuple[int, int]:
    """(row axis, column axis) of the cache's key/value/valid leaves (scanned layers lead)."""
    return (1, 2) if model.cfg.scan_layers else (0, 1)


def _is_cache_index(path) -> bool:
    return getattr(path[-1], "key", None) == "cache_index"


def repeat_cache_rows(model: nn.Module, cache: Any, times: int) -> Any:
    """Each cache row `times` times in a row: one prefilled prompt shared by several continuations."""
    row_axis = _cache_axes(model)[0]
    rep = lambda path, leaf: leaf if _is_cache_index(path) else jnp.repeat(leaf, times, axis=row_axis)
    return jax.tree_util.tree_map_with_path(rep, cache)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache", "last"))
def slot_prefill(model, params, cache, last, tokens, mask, slots, cursor):
    """Prefill P left-padded prompts ([P, width] tokens and mask) in one call, prompt p into row
    `slots[p]`, each ending at column `cursor` - 1 (the shared write index; `cursor` >= every
    prompt's length). A slot index out of range (>= the cache's rows) drops its prompt: the filler
    that pads P to a fixed size. Returns (cache, last logits of every row with the prefilled rows'
    replaced, each prompt's next position)."""
    width = tokens.shape[1]
    rows_last, rows, position = _prefill(model, params, tokens, mask, width)  # attends over `width` columns only
    row_axis = _cache_axes(model)[0]
    at_rows = (slice(None),) * row_axis + (slots,)
    # the prompt's columns end at cursor - 1 (those left of column 0 wrap around: left padding,
    # never valid); the row's other columns are emptied, as a new cache's are
    columns = (cursor - width + jnp.arange(width)) % model.cfg.block_size
    at_columns = (slice(None),) * row_axis + (slots[:, None], columns[None, :])

    def place(path, big, small):
        if _is_cache_index(path):
            return big
        big = big.at[at_rows].set(jnp.zeros((), big.dtype), mode="drop")
        return big.at[at_columns].set(small.astype(big.dtype), mode="drop")

    cache = jax.tree_util.tree_map_with_path(place, cache, rows)
    return cache, last.at[slots].set(rows_last.astype(last.dtype), mode="drop"), position


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def slot_shift(model, cache, shift):
    """Every row's columns moved `shift` to the left (right if negative), the write index with them."""
    col_axis = _cache_axes(model)[1]
    move = lambda path, leaf: leaf - shift if _is_cache_index(path) else jnp.roll(leaf, -shift, axis=col_axis)
    return jax.tree_util.tree_map_with_path(move, cache)


def choose_token_rows(logits: Array, keys: Array, temperature: Array, top_p: Array, nucleus: bool = True) -> Array:
    """Like `choose_token`'s choice, with each row's own temperature (0: greedy) and top-p, and
    its own key (so a row samples the same tokens whatever else is batched with it). `nucleus`
    False (static) skips the sort over the vocabulary, for steps where no row has top_p < 1."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    filtered = scaled
    if nucleus:
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]  # always keeps the most likely
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        filtered = jnp.where(keep, scaled, jnp.finfo(jnp.float32).min)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(greedy, jnp.argmax(logits, -1), sampled).astype(jnp.int32)


def ban_tokens(logits: Array, banned: Array) -> Array:
    """`logits` [rows, vocab] with each row's `banned` ids [rows, K] made impossible (an id >= vocab
    bans nothing: the filler); a stop token before a request's min_tokens."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, banned].set(jnp.finfo(logits.dtype).min, mode="drop")


@functools.partial(jax.jit, static_argnames=("model", "rows", "nucleus", "top"), donate_argnames=("cache", "last"))
def slot_step(
    model,
    params,
    cache,
    last,
    position,
    keys,
    counts,
    temperature,
    top_p,
    banned=None,
    *,
    rows=None,
    nucleus=True,
    top=True,
):
    """One token for each of the first `rows` rows (every row when None), fed back through the
    model at the shared write index; the other rows are left as they are (a step's cost grows
    with its rows: the engine keeps its requests in the lowest rows).

    Row r samples with key fold_in(keys[r], counts[r]), never one of its `banned` ids (when given;
    see `ban_tokens`). The static flags leave out work no row needs: `nucleus` the top-p sort,
    `top` the alternatives. Returns (cache, next logits, then for the first `rows` rows: tokens,
    their log-probabilities under the raw model, the TOP_LOGPROBS (0 without `top`) most likely
    ids and theirs)."""
    n = last.shape[0] if rows is None else rows
    row_axis = _cache_axes(model)[0]
    take = lambda path, leaf: leaf if _is_cache_index(path) else jax.lax.slice_in_dim(leaf, 0, n, axis=row_axis)
    part = jax.tree_util.tree_map_with_path(take, cache)
    step_keys = jax.vmap(jax.random.fold_in)(keys[:n], counts[:n])
    allowed = last[:n] if banned is None else ban_tokens(last[:n], banned[:n])
    token = choose_token_rows(allowed, step_keys, temperature[:n], top_p[:n], nucleus)
    raw = jax.nn.log_softmax(last[:n].astype(jnp.float32))
    chosen = jnp.take_along_axis(raw, token[:, None], -1)[:, 0]
    top_values, top_ids = jax.lax.top_k(raw, min(TOP_LOGPROBS, raw.shape[-1]) if top else 0)
    logits, part = _step(model, params, part, token, position[:n])
    put = lambda path, big, small: (
        small if _is_cache_index(path) else big.at[(slice(None),) * row_axis + (slice(0, n),)].set(small)
    )
    cache = jax.tree_util.tree_map_with_path(put, cache, part)
    return cache, last.at[:n].set(logits.astype(last.dtype)), token, chosen, top_ids, top_values
