"""cuDNN fused attention (`model.attention`) against XLA's einsum path: numerics and speed.

    python benchmarks/attention.py          # on an NVIDIA GPU

1. Numerics, on the same weights: a GPT-2-shaped model (2 layers, 768 wide, 12 heads,
   sequence 1024) in bfloat16 with attention="cudnn" and with attention="xla", both against
   the float32 XLA model, on a batch with packed documents and padding. Reports
   ||out - ref|| / ||ref|| for the logits and the parameter gradients of the loss.
2. Speed of the attention op alone (forward + backward, bfloat16, GPT-2 124M's shapes):
   XLA's implementation, cuDNN with the model's segment mask (what the model runs), and cuDNN
   with the causal mask alone (the floor: what an unpacked batch could skip).
Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt.losses import token_cross_entropy  # noqa: E402
from flaxgpt.model import Transformer, attention_mask, fused_attention, fused_attention_obstacle  # noqa: E402


def relative_error(out, ref) -> float:
    out, ref = (np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)]) for t in (out, ref))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def numerics() -> list[str]:
    base = C.ModelConfig(recipe="gpt2", vocab_size=50304, block_size=1024, n_layer=2, n_head=12, d_model=768).resolved()
    model = Transformer(base)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, base.block_size), 0, base.vocab_size)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
    segments = np.ones((4, base.block_size), np.int32)
    segments[0, 300:] = 2  # two documents packed in a row
    segments[1, 700:] = 0  # a padded row
    positions = np.tile(np.arange(base.block_size), (4, 1))
    positions[0, 300:] -= 300

    def run(cfg):
        def loss(p):
            logits = Transformer(cfg).apply({"params": p}, tokens, positions, segments)
            sums = token_cross_entropy(logits[:, :-1], tokens[:, 1:], segments[:, 1:] > 0)
            return sums["loss_sum"] / sums["weight_sum"], logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    ref_logits, ref_grads = run(base)
    lines = ["| compute | attention | logits rel. error | gradients rel. error |", "|---|---|---|---|"]
    for attention in ("xla", "cudnn"):
        logits, grads = run(dataclasses.replace(base, dtype="bfloat16", attention=attention))
        lines.append(
            f"| bfloat16 | {attention} | {relative_error(logits, ref_logits):.2e} | "
            f"{relative_error(grads, ref_grads):.2e} |"
        )
        print(lines[-1], flush=True)
    return lines


def timed_ms(fn, *args, repeats: int = 50) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def speed(batch: int = 16, length: int = 1024, heads: int = 12, head_dim: int = 64) -> list[str]:
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v, cotangent = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
    mask = attention_mask(jnp.ones((batch, length), jnp.int32))
    variants = {
        "xla (segment mask)": lambda q, k, v: fused_attention(q, k, v, mask, implementation="xla"),
        "cudnn (segment mask)": lambda q, k, v: fused_attention(q, k, v, mask),
        "cudnn (causal only)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        ),
    }
    # causal attention's useful FLOPs: half of 4 b h t^2 d forward, 2.5x that with the backward
    flops = 3.5 * 4 * batch * heads * length**2 * head_dim / 2
    lines = [
        f"| attention op, fwd+bwd, {batch}x{length}, {heads} heads of {head_dim} | ms | TFLOP/s (causal) |",
        "|---|---|---|",
    ]
    for name, attend in variants.items():
        step = jax.jit(lambda q, k, v, attend=attend: jax.vjp(attend, q, k, v)[1](cotangent))
        ms = timed_ms(step, q, k, v)
        lines.append(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    probe = C.ModelConfig(head_dim=64, dtype="bfloat16").resolved()
    obstacle = fused_attention_obstacle(probe, train=True)
    if obstacle:
        print(f"cuDNN fused attention cannot run here: {obstacle}")
        return 1
    device = jax.devices()[0]
    text = (
        "\n".join(
            [
                f"## attention — {datetime.date.today()} — {device.device_kind}, jax {jax.__version__}",
                "command: `python benchmarks/attention.py`",
                "",
                *numerics(),
                "",
                *speed(),
            ]
        )
        + "\n"
    )
    print("\n" + text)
    record(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
