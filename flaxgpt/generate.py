"""Text generation by full recomputation over a sliding window (nanoGPT's `generate`).

The whole loop is one jitted `fori_loop`. Each new token re-runs the model on
the last `block_size` tokens, which is simple and exact but O(length^2): the
KV-cache engine (prefill + one token per step) replaces it for speed, with
this function kept as its reference.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from flaxgpt.sharding import host_value, replicated


def choose_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy when temperature == 0, else sample from softmax(logits / T) restricted to the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "max_new_tokens", "temperature", "top_k"))
def _sample_loop(model, params, buffer, rng, *, prompt_len, max_new_tokens, temperature, top_k):
    block = model.cfg.block_size

    def body(i, carry):
        buffer, rng = carry
        rng, step_rng = jax.random.split(rng)
        cur = prompt_len + i
        start = jnp.maximum(0, cur - block)
        window = jax.lax.dynamic_slice(buffer, (0, start), (buffer.shape[0], block))
        logits = model.apply({"params": params}, window)
        last = jax.lax.dynamic_index_in_dim(logits, cur - start - 1, axis=1, keepdims=False)
        token = choose_token(last, step_rng, temperature, top_k).astype(buffer.dtype)
        return buffer.at[:, cur].set(token), rng

    buffer, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buffer, rng))
    return buffer


def sample(
    model: nn.Module,
    params: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 0.8,
    top_k: int = 0,
    stop_token: int | None = None,
) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens`; returns the new ids only,
    cut at `stop_token` if it is produced."""
    if len(prompt) == 0:
        raise ValueError("sampling needs a prompt of at least one token")
    block = model.cfg.block_size
    prompt = list(prompt)[-block:] if max_new_tokens else list(prompt)
    total = len(prompt) + max_new_tokens
    buffer = np.zeros((1, max(total, block)), np.int32)
    buffer[0, : len(prompt)] = prompt
    # Replicate the inputs over the parameters' mesh, so this also runs when they span processes.
    mesh_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(mesh_sharding, NamedSharding):
        buffer, rng = (jax.device_put(x, replicated(mesh_sharding.mesh)) for x in (buffer, rng))
    out = _sample_loop(model, params, jnp.asarray(buffer), rng, prompt_len=len(prompt),
                       max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k))
    new = [int(t) for t in host_value(out)[0, len(prompt): total]]
    if stop_token is not None and stop_token in new:
        new = new[: new.index(stop_token)]
    return new
