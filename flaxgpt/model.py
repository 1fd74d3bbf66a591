"""The flaxgpt Transformer: a decoder-only language model in Flax linen.

One module covers two recipes, chosen by `ModelConfig.recipe` (and overridable
field by field):

  gpt2   learned positions, LayerNorm, GELU MLP, biases, tied embeddings
  llama  rotary positions, RMSNorm, SwiGLU MLP, no biases, untied head,
         grouped-query attention (n_kv_heads <= n_head; 1 = multi-query)

Fields of the config switch on what other open families add to the llama recipe: rotary
frequency scaling (rope_scaling: Llama 3.x), q/k/v biases (qkv_bias: Qwen2), q/k norms
(qk_norm: Qwen3), sliding-window attention on every layer or all but every k-th (sliding_window,
global_every: Mistral, Gemma 2), and Gemma's GeGLU, (1 + w) norms, scaled embeddings,
post-branch norms, soft-capping and query scale.

Every parameter carries *logical* axis names ("embed", "mlp", "heads", ...)
and activations are constrained by logical names too; `flaxgpt.sharding` maps
them onto mesh axes. Nothing here places data on devices; the one question asked of the
backend is which attention kernel can run (`model.attention`: cuDNN's fused kernel on NVIDIA
GPUs, the Pallas splash kernel on TPUs (`flaxgpt.tpu_attention`), or XLA's einsums).

With `lora_rank > 0` the projections named in `lora_targets` carry low-rank adapters
(`lora_a`, `lora_b`); `flaxgpt.lora` freezes the rest and folds adapters back in.

Batches may pack several documents per row: `segment_ids` keep them from
attending to each other (0 marks padding) and `positions` restart per document.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxgpt.config import ConfigError, ModelConfig
from flaxgpt.tpu_attention import splash_attention, splash_obstacle

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def _init(std: float, names: tuple) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _constrain(x: Array, names: tuple) -> Array:
    return nn.with_logical_constraint(x, names)


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama), scaled by w or (Gemma) 1 + w; statistics in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        pdtype = _DTYPES[cfg.param_dtype]
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        else:
            centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + cfg.norm_eps)
        if cfg.norm_plus_one:  # Gemma: the parameter is stored as an offset from 1, starting at 0
            y = y * (1.0 + self.param("scale", _zeros(("norm",)), (x.shape[-1],), pdtype).astype(jnp.float32))
        else:
            ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
            y = y * self.param("scale", ones, (x.shape[-1],), pdtype)
        if cfg.norm == "layernorm" and cfg.use_bias:
            y = y + self.param("bias", _zeros(("norm",)), (x.shape[-1],), pdtype)
        return y.astype(_DTYPES[cfg.dtype])


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim // 2] (float32, computed as transformers does),
    with `rope_scaling` applied: linear divides all by rope_factor; llama3 divides the low
    frequencies (wavelength > original context / low_freq_factor), keeps the high ones
    (wavelength < original context / high_freq_factor) and ramps smoothly between."""
    d = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
    if cfg.rope_scaling == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        context = cfg.rope_original_context
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > context / low, inv / factor, inv)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if cfg.rope_scaling == "yarn":
        return _yarn_frequencies(cfg, inv)
    return inv


def _yarn_frequencies(cfg: ModelConfig, inv: np.ndarray) -> np.ndarray:
    """YaRN: dimensions that rotate more than beta_fast times over the original context keep
    their frequency, those rotating fewer than beta_slow times are divided by rope_factor, a
    linear ramp between (the correction range rounded outwards, as transformers does)."""
    d, base, context = cfg.head_dim, cfg.rope_theta, cfg.rope_original_context

    def dim_of(rotations: float) -> float:
        return d * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(cfg.rope_beta_fast)), 0), min(math.ceil(dim_of(cfg.rope_beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return ((inv / np.float32(cfg.rope_factor)) * (1 - keep) + inv * keep).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN multiplies cos and sin by (1 otherwise)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    return cfg.rope_attention_factor or (0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0)


def rotary(x: Array, positions: Array, inv_freq: np.ndarray, scale: float = 1.0) -> Array:
    """Rotary position embedding, rotate-half convention (as Hugging Face Llama).

    x: [batch, length, heads, head_dim]; positions: [batch, length]; inv_freq from `rope_frequencies`;
    scale multiplies cos and sin (`rope_attention_factor`).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, half]
    cos = jnp.cos(angles)[:, :, None, :] * scale
    sin = jnp.sin(angles)[:, :, None, :] * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_mask(segment_ids: Array, branches: Array | None = None) -> Array:
    """[batch, q, k] boolean: causal by index, and only within one segment.

    branches [batch, length] (optional) share a prefix: within a segment, a token of branch
    b > 0 sees the branch-0 tokens (the shared prefix) and its own branch's only. GRPO packs a
    prompt and its group's answers this way, so the prompt is computed once for all of them."""
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    if branches is not None:
        same_segment &= (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return causal[None] & same_segment


class Linear(nn.Module):
    """y = x . kernel (+ bias), contracting the last `len(in_axes)` dims of x.

    The kernel keeps its real multi-dimensional shape (e.g. [embed, heads, head_dim])
    so every dimension carries its own logical axis name.
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    cfg: ModelConfig
    std: float
    use_bias: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        n_in = len(self.in_axes)
        shape = x.shape[-n_in:] + tuple(self.features)
        kernel = self.param("kernel", _init(self.std, self.in_axes + self.out_axes), shape, pdtype)
        # As one 2-D matmul: XLA:CPU runs the weight gradient of a matmul with several
        # contracting dims (batch and length) far slower than the flattened form.
        lead = x.shape[:-n_in]
        flat_in = x.reshape(-1, math.prod(x.shape[-n_in:])).astype(dtype)
        flat_out = flat_in @ kernel.reshape(flat_in.shape[1], -1).astype(dtype)
        if cfg.lora_rank and self.name in cfg.lora_targets:
            # LoRA: W + (alpha/r) A B with B = 0 at the start, so the adapted model begins as the base.
            a = self.param(
                "lora_a",
                _init(1.0 / math.sqrt(flat_in.shape[1]), self.in_axes + ("lora",)),
                x.shape[-n_in:] + (cfg.lora_rank,),
                pdtype,
            )
            b = self.param("lora_b", _zeros(("lora",) + self.out_axes), (cfg.lora_rank,) + tuple(self.features), pdtype)
            dropped = nn.Dropout(cfg.lora_dropout, deterministic=not self.train)(flat_in)
            low = dropped @ a.reshape(flat_in.shape[1], cfg.lora_rank).astype(dtype)
            flat_out = flat_out + (low @ b.reshape(cfg.lora_rank, -1).astype(dtype)) * (cfg.lora_alpha / cfg.lora_rank)
        y = flat_out.reshape(*lead, *self.features)
        if self.use_bias:
            y = y + self.param("bias", _zeros(self.out_axes), tuple(self.features), pdtype).astype(dtype)
        return y


def layer_windows(cfg: ModelConfig) -> np.ndarray:
    """Each layer's sliding window (0: it attends globally). With model.global_every = k, every
    k-th layer is global (Gemma 2 alternates, k = 2); 0 keeps the window on every layer."""
    k = cfg.global_every
    return np.array([0 if k and i % k == k - 1 else cfg.sliding_window for i in range(cfg.n_layer)], np.int32)


def within_window(cfg: ModelConfig, mask: Array, query_index: Array, key_index: Array, window: Array) -> Array:
    """`mask` [b, q, k] where a query also sees only the keys less than `window` positions
    back (0: all). The indices are [q] and [k] cache slots (decoding: rows only left-padded,
    so slot distance is position distance) or [b, q] and [b, k] positions."""
    if not cfg.sliding_window:
        return mask
    near = (window == 0) | (query_index[..., :, None] - key_index[..., None, :] < window)
    return mask & (near if near.ndim == 3 else near[None])


def einsum_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    dropout: Callable[[Array], Array] = lambda probs: probs,
    query_block: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> Array:
    """Attention in XLA einsums over [b, t, heads, d] queries, [b, s, kv_heads, d] keys and
    values and a [b, t, s] mask; softmax in float32, `dropout` applied to the probabilities.

    query_block > 0 (for a causal mask: no query sees a later key) takes the queries in blocks
    of that many rows, each against the keys up to its last row only. The blocks skip the
    masked triangle above the diagonal (about half the work at long sequences) and keep the
    scores cache-sized: GPT-2's T=1024 attention on a CPU runs 2.1x faster in blocks of 128.

    scale: of the scores (None: 1/sqrt(head_dim)); softcap > 0 bounds them as softcap * tanh(s / softcap)."""
    t = q.shape[1]
    if not 0 < query_block < t:
        return _einsum_attention(q, k, v, mask, dropout, scale, softcap)
    blocks = []
    for start in range(0, t, query_block):
        end = start + query_block  # this block's last row + 1: no later key is visible to it
        rows = (q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end])
        blocks.append(_einsum_attention(*rows, dropout, scale, softcap))
    return jnp.concatenate(blocks, axis=1)


def _einsum_attention(
    q: Array, k: Array, v: Array, mask: Array, dropout: Callable[[Array], Array], scale: float | None, softcap: float
) -> Array:
    b, t, h, d = q.shape
    kv = k.shape[2]
    # Group the query heads that share one key/value head: [b, t, kv, group, d].
    q = q.reshape(b, t, kv, h // kv, d) * jnp.asarray(scale or 1 / math.sqrt(d), q.dtype)
    if t == 1:
        return _one_query_attention(q[:, 0], k, v, mask[:, 0], dropout, softcap).reshape(b, t, h, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def _one_query_attention(
    q: Array, k: Array, v: Array, mask: Array, dropout: Callable[[Array], Array], softcap: float
) -> Array:
    """`_einsum_attention` for one query per row ([b, kv, group, d], scaled; mask [b, s]): a
    decode step. Products summed where the keys and values lie: XLA's CPU dots would first
    transpose every layer's whole cache."""
    f32 = lambda x: x.astype(jnp.float32)  # products in float32 too, as a dot accumulates them
    scores = jnp.sum(f32(q[:, None]) * f32(k[:, :, :, None]), axis=-1)  # [b, s, kv, group]
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=1).astype(q.dtype))
    return jnp.sum(f32(probs[..., None]) * f32(v[:, :, :, None]), axis=1).astype(q.dtype)


def attention_query_block(cfg: ModelConfig, length: int) -> int:
    """model.attention_block, or for 0 (auto) max(64, length // 8): measured best on a CPU at
    T=256 (64) and T=1024 (128); short sequences (shakespeare_char's 64) stay one block."""
    return cfg.attention_block or max(64, length // 8)


def fused_attention_obstacle(cfg: ModelConfig, train: bool) -> str | None:
    """Why cuDNN's fused attention cannot run this model here, or None when it can."""
    if jax.default_backend() != "gpu" or "nvidia" not in jax.devices()[0].device_kind.lower():
        return f"it needs an NVIDIA GPU, and the default backend is {jax.default_backend()}"
    if cfg.dtype != "bfloat16":
        return f"it needs bfloat16 compute, and model.dtype={cfg.dtype!r}"
    if cfg.head_dim > 128 or cfg.head_dim % 8:
        return f"it needs model.head_dim <= 128 and a multiple of 8, got {cfg.head_dim}"
    if train and cfg.dropout > 0:
        return f"it has no attention dropout, and model.dropout={cfg.dropout} while training"
    if cfg.attn_softcap:
        return f"it has no score soft-capping, and model.attn_softcap={cfg.attn_softcap}"
    return None


def use_fused_attention(cfg: ModelConfig, train: bool, decode: bool) -> bool:
    """Resolve model.attention at trace time (the same config runs on CPU, GPU and TPU)."""
    if cfg.attention == "xla" or decode:
        return False
    obstacle = fused_attention_obstacle(cfg, train)
    if cfg.attention == "cudnn" and obstacle:
        raise ConfigError(f"model.attention='cudnn' cannot be used: {obstacle}; use 'auto' or 'xla'")
    return obstacle is None


def use_tpu_attention(cfg: ModelConfig, train: bool, decode: bool, length: int) -> bool:
    """model.attention='auto' on a TPU: the Pallas splash kernel where it applies (not decoding)."""
    plain = not (cfg.sliding_window or cfg.attn_softcap or cfg.query_pre_attn_scalar)  # what the kernel computes
    return (
        cfg.attention == "auto"
        and plain
        and not decode
        and splash_obstacle(length, cfg.head_dim, cfg.dropout, train) is None
    )


def fused_attention(
    q: Array, k: Array, v: Array, mask: Array, implementation: str = "cudnn", scale: float | None = None
) -> Array:
    """jax.nn.dot_product_attention over [b, t, heads, d] queries and [b, s, kv_heads, d] keys and
    values, with the model's [b, t, s] mask. is_causal lets cuDNN skip the blocks above the
    diagonal. A batch of packed documents or padding needs the mask as well (cuDNN adds it as a
    bias: ~25% slower on GPT-2's shapes), so a batch whose mask is plain causal, the usual
    pretraining batch, takes the causal-only kernel; the choice is made on the device."""
    causal_only = lambda: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation=implementation
    )
    segmented = lambda: jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, is_causal=True, implementation=implementation
    )
    plain = jnp.all(mask == jnp.tril(jnp.ones(mask.shape[-2:], bool)))
    return jax.lax.cond(plain, causal_only, segmented)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when n_kv_heads=1).

    With decode=True, keys and values are also written into a pre-allocated cache
    ("cache" collection: cached_key, cached_value, cached_valid, cache_index) and the queries attend to every cached
    slot up to their own; rows are left-padded, so all rows share one write index.
    """

    cfg: ModelConfig
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, mask: Array, window: Array, segment_ids: Array | None = None
    ) -> Array:
        """`segment_ids` [b, t] (what `mask` was built from) feed the TPU kernel, which builds its own."""
        cfg = self.cfg
        h, kv, d = cfg.n_head, cfg.n_kv_heads, cfg.head_dim

        def project(name: str, heads: int, axis_name: str) -> Array:
            return Linear(
                (heads, d), ("embed",), (axis_name, "head_dim"), cfg, cfg.init_std, cfg.qkv_bias, self.train, name=name
            )(x)

        q = project("query", h, "heads")
        k = project("key", kv, "kv_heads")
        v = project("value", kv, "kv_heads")
        if cfg.qk_norm:  # Qwen3: each head's query and key normalised over head_dim
            q, k = Norm(cfg, name="query_norm")(q), Norm(cfg, name="key_norm")(k)
        if cfg.position == "rope":
            inv_freq, scale = rope_frequencies(cfg), rope_attention_factor(cfg)
            q, k = rotary(q, positions, inv_freq, scale), rotary(k, positions, inv_freq, scale)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = _constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = _constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))

        if self.decode:
            k, v, mask = self._update_cache(k, v, mask, window)
        else:
            mask = within_window(cfg, mask, positions, positions, window)

        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
        if use_fused_attention(cfg, self.train, self.decode):
            out = fused_attention(q, k, v, mask, scale=scale)
        elif segment_ids is not None and use_tpu_attention(cfg, self.train, self.decode, q.shape[1]):
            out = splash_attention(q, k, v, segment_ids)
        else:
            # KV-cache decoding: the cache's mask is not causal in the queries' rows, and one row has nothing to skip
            block = 0 if self.decode else attention_query_block(cfg, q.shape[1])
            dropout = nn.Dropout(cfg.dropout, deterministic=not self.train)
            out = einsum_attention(q, k, v, mask, dropout, block, scale, cfg.attn_softcap)
        out = checkpoint_name(out, "attention_out")

        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        return Linear(
            (cfg.d_model,), ("heads", "head_dim"), ("embed",), cfg, residual_std, cfg.use_bias, self.train, name="out"
        )(out)

    def _update_cache(self, k: Array, v: Array, valid: Array, window: Array) -> tuple[Array, Array, Array]:
        """Write this chunk at the cache index; return all cached keys/values and the mask.

        Here `valid` is [batch, chunk]: which new tokens are real (left padding is not).
        The cache's length is fixed by the first call (made with a full-length input).
        """
        batch, chunk = k.shape[:2]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, valid.shape, bool)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if self.is_initializing():
            index = jnp.arange(chunk)
            mask = attention_mask(valid.astype(jnp.int32)) & valid[:, None, :]
            return k, v, within_window(self.cfg, mask, index, index, window)
        i = index.value
        names = ("activation_batch", "activation_length", "activation_kv_heads", None)  # sharded like activations
        cached_k.value = _constrain(jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0)), names)
        cached_v.value = _constrain(jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0)), names)
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, i))
        index.value = i + chunk
        slots = jnp.arange(cached_k.value.shape[1])
        query_slots = i + jnp.arange(chunk)
        mask = (slots[None, :] <= query_slots[:, None])[None] & cached_valid.value[:, None, :]
        return cached_k.value, cached_v.value, within_window(self.cfg, mask, query_slots, slots, window)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """tanh-approximate GELU whose backward recomputes the derivative from x in one pass."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    c = math.sqrt(2 / math.pi)
    th = jnp.tanh(c * (x32 + 0.044715 * x32**3))
    slope = 0.5 * (1 + th) + 0.5 * x32 * (1 - th * th) * c * (1 + 3 * 0.044715 * x32 * x32)
    return ((g.astype(jnp.float32) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up, whose backward computes both gradients in one pass from gate and up
    (autodiff's keeps silu's intermediates and makes several passes over the [tokens, d_ff] arrays)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, g):
    gate, up = (x.astype(jnp.float32) for x in saved)
    g32, sig = g.astype(jnp.float32), jax.nn.sigmoid(gate)
    d_gate = g32 * up * sig * (1 + gate * (1 - sig))
    return d_gate.astype(saved[0].dtype), (g32 * gate * sig).astype(saved[1].dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    """GELU MLP (gpt2), SwiGLU (llama) or GeGLU (gemma: tanh-approximate GELU gate)."""

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        up = lambda name: Linear(
            (cfg.d_ff,), ("embed",), ("mlp",), cfg, cfg.init_std, cfg.use_bias, self.train, name=name
        )(x)
        if cfg.mlp == "swiglu":
            hidden = swiglu(up("gate"), up("up"))
        elif cfg.mlp == "geglu":
            hidden = gelu(up("gate")) * up("up")
        else:
            hidden = gelu(up("up"))
        hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        return Linear((cfg.d_model,), ("mlp",), ("embed",), cfg, residual_std, cfg.use_bias, self.train, name="down")(
            hidden
        )


class Block(nn.Module):
    """Pre-norm residual block (with post_norms, Gemma 2's, each branch's output normalised too).
    Signature (carry, *inputs) -> (carry, None) so it can be scanned; `window` is this layer's."""

    cfg: ModelConfig
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, mask: Array, window: Array, segment_ids: Array | None
    ) -> tuple[Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=not self.train)
        post = lambda y, name: Norm(cfg, name=name)(y) if cfg.post_norms else y
        attn = Attention(cfg, self.train, self.decode, name="attn")
        x = x + drop(post(attn(Norm(cfg, name="attn_norm")(x), positions, mask, window, segment_ids), "attn_post_norm"))
        x = x + drop(post(Mlp(cfg, self.train, name="mlp")(Norm(cfg, name="mlp_norm")(x)), "mlp_post_norm"))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class Transformer(nn.Module):
    """tokens [batch, length] -> logits [batch, length, vocab] (float32), or with
    `output="scalar"` one score per position [batch, length] (reward and value models)."""

    cfg: ModelConfig  # must be `ModelConfig.resolved()`

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
        branches: Array | None = None,
    ) -> Array:
        """decode=True reads and extends the KV cache (see `Attention`); `segment_ids` then
        marks real (1) versus left-padding (0) tokens of the new chunk. `branches` [batch,
        length] let a segment's branches share its branch-0 prefix (`attention_mask`)."""
        cfg = self.cfg
        dtype, pdtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=pdtype,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")),
            name="token_embed",
        )
        x = embed(tokens)
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(d_model)
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        if cfg.position == "learned":
            x = x + nn.Embed(
                cfg.block_size,
                cfg.d_model,
                dtype=dtype,
                param_dtype=pdtype,
                embedding_init=_init(cfg.init_std, ("position", "embed")),
                name="position_embed",
            )(positions)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        mask = (segment_ids != 0) if decode else attention_mask(segment_ids, branches)
        kernel_ids = segment_ids if branches is None else None  # the TPU kernel knows segments only
        windows = jnp.asarray(layer_windows(cfg))

        x = self._blocks(x, positions, mask, windows, kernel_ids, train, decode)
        x = Norm(cfg, name="final_norm")(x)
        if cfg.output == "scalar":  # reward / value model: one number per position
            score = Linear((1,), ("embed",), ("norm",), cfg, cfg.init_std, use_bias=True, name="score")(x)
            return score[..., 0].astype(jnp.float32)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear((cfg.vocab_size,), ("embed",), ("vocab",), cfg, cfg.init_std, name="lm_head")(x)
        logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return _final_logits(cfg, logits)

    def _blocks(self, x, positions, mask, windows, kernel_ids, train: bool, decode: bool) -> Array:
        """The n_layer blocks: one scanned module (compiles once whatever the depth) or unrolled."""
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, train, decode, name="layers")
            return layers(x, positions, mask, windows, kernel_ids)[0]
        for i in range(cfg.n_layer):
            x, _ = block(cfg, train, decode, name=f"layers_{i}")(x, positions, mask, windows[i], kernel_ids)
        return x


def _final_logits(cfg: ModelConfig, logits: Array) -> Array:
    """float32 logits, Gemma 2's soft cap applied and padding ids (vocab_multiple) never produced."""
    logits = logits.astype(jnp.float32)
    if cfg.logit_softcap:  # logits bounded as softcap * tanh(logits / softcap)
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    if 0 < cfg.valid_vocab < cfg.vocab_size:
        logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.valid_vocab, logits, -1e9)
    return logits


def stack_layers(params: dict, n_layer: int) -> dict:
    """Unrolled params (layers_0..layers_{n-1}) -> scanned layout (one 'layers' with a leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layer)])
    return out


def unstack_layers(params: dict) -> dict:
    """Scanned layout -> unrolled layout; inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n_layer = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n_layer):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


def count_params(params: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
