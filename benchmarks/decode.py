"""Decode throughput: the KV-cache engine versus recomputing the whole sequence every step.

    python benchmarks/decode.py

A 4-layer, 256-wide LLaMA-recipe model (random weights: speed does not depend on them),
a 16-token prompt and 256 new tokens, greedy, at batch 1 and 32. "Full recompute" is the
jitted loop without a cache: every step re-runs the model over the fixed 272-token buffer
(static shapes, as a compiled loop must), the way nanoGPT's `generate` does within its
window. Compile time is excluded (each path runs once before timing). Prints a table and
appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt.generate import DecodeConfig, _prefill, _sliding_loop, generate, left_pad  # noqa: E402
from flaxgpt.model import Transformer, count_params  # noqa: E402

PROMPT, NEW = 16, 256


def timed(fn, repeats: int = 2) -> float:
    jax.block_until_ready(fn())  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def main() -> None:
    cfg = C.ModelConfig(
        recipe="llama", vocab_size=256, block_size=PROMPT + NEW, n_layer=4, n_head=8, n_kv_heads=4, d_model=256
    ).resolved()
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.block_size), jnp.int32))["params"])
    decode = DecodeConfig(max_new_tokens=NEW, temperature=0.0)
    lines = [
        f"## decode — {datetime.date.today()} — {platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}; {count_params(params) / 1e6:.1f}M params, prompt {PROMPT}, {NEW} new tokens",
        "command: `python benchmarks/decode.py`",
        "",
        "| batch | KV cache tokens/s | prefill ms | decode ms | full recompute tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        prompts = np.random.default_rng(0).integers(1, 256, (batch, PROMPT)).tolist()
        tokens, mask = left_pad(prompts, 0)
        cached = timed(lambda: generate(model, params, prompts, decode, jax.random.PRNGKey(0), pad_id=0).tokens)
        prefill = jax.jit(lambda p, t, m: _prefill(model, p, t, m, PROMPT + NEW)[0])
        prefill_s = timed(lambda: prefill(params, jnp.asarray(tokens), jnp.asarray(mask)), repeats=5)
        buffer = jnp.zeros((batch, PROMPT + NEW), jnp.int32).at[:, :PROMPT].set(jnp.asarray(tokens))
        full = timed(
            lambda: _sliding_loop(
                model, params, buffer, jax.random.PRNGKey(0), prompt_len=PROMPT, max_new_tokens=NEW, cfg=decode
            ),
            repeats=1,
        )
        n = batch * NEW
        lines.append(
            f"| {batch} | {n / cached:,.0f} | {prefill_s * 1e3:.1f} | {(cached - prefill_s) * 1e3:.0f} | "
            f"{n / full:,.0f} | {full / cached:.1f}x |"
        )
        print(lines[-1], flush=True)
    record("\n".join(lines))


if __name__ == "__main__":
    main()
