"""Model FLOPs and model FLOPs utilisation (MFU): what the training loop logs as `mfu`, and
what `benchmarks/train_throughput.py` reports.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s of the devices). Model FLOPs
count what the model needs, not what the hardware ran (remat's recomputation is not credited):
6 N per token for the forward and backward matmuls of N parameters, plus attention's
12 L T d (PaLM's appendix B; nanoGPT's `estimate_mfu`). When only N_trained of them train
(LoRA), the frozen weights' gradients are never computed: 4 N + 2 N_trained. Hardware FLOPs
(what `flaxgpt.compile`'s roofline divides by the peak) add remat's recomputed forward. The
peak is the vendor's dense figure for the compute dtype where the device is known, and
otherwise (CPUs, unknown devices) a matmul measured on the device itself.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from flaxgpt.config import ModelConfig

# Dense peak FLOP/s per device (one TPU chip / one GPU), bfloat16 (TPU v4+ and GPUs) and float32.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
}


def _attention_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of attention's scores and weighted values per token (2 matmuls of T x H d)."""
    return 4.0 * cfg.n_layer * cfg.block_size * cfg.n_head * cfg.head_dim


def flops_per_token(cfg: ModelConfig, n_params: int, n_trained: int | None = None) -> float:
    """Model FLOPs of one trained token: forward 2 N; backward 2 N for the activation gradients (they
    flow through every layer, frozen or not) and 2 N_trained for the weight gradients (all N by
    default: 6 N); attention 3 x its forward (12 L T d)."""
    trained = n_params if n_trained is None else n_trained
    return 3 * forward_flops_per_token(cfg, n_params) - 2.0 * (n_params - trained)


def forward_flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Model FLOPs of one token's forward pass: 2 N + attention's 4 L T d."""
    return 2.0 * n_params + _attention_per_token(cfg)


def remat_flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Hardware FLOPs remat adds to a trained token, never model FLOPs: `full` runs the forward
    again in the backward pass; `save_attention_out` keeps attention's output but recomputes the
    projections; the `dots` policies keep every matmul's output (no matmul runs twice)."""
    if cfg.remat == "full":
        return forward_flops_per_token(cfg, n_params)
    return 2.0 * n_params if cfg.remat == "save_attention_out" else 0.0


def known_peak(device: Any, dtype: str) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if kind.startswith(name) or kind.replace("-", " ").startswith(name):
            return PEAK_FLOPS[name][dtype]
    return None


@functools.cache
def measured_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device: the attainable matmul peak.

    Random operands: constant ones or zeros can run faster than real data (power, not speed)."""
    jdtype = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jdtype)
    b = (jax.random.normal(jax.random.PRNGKey(1), (size, size)) / size**0.5).astype(jdtype)
    mm = jax.jit(lambda a, b: (a @ b) @ b)
    mm(a, b).block_until_ready()
    warm_until = time.perf_counter() + 0.5  # an idle GPU clocks down: let it ramp up first
    while time.perf_counter() < warm_until:
        mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 2 * size**3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    known = known_peak(device, dtype)
    if known is not None:
        return known, f"{device.device_kind} {dtype} datasheet"
    return measured_peak(dtype), f"measured {dtype} matmul on {device.device_kind or device.platform}"
