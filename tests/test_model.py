"""The Transformer: shapes, causality, segments and positions, scan/remat equivalence, GQA/MQA."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import ConfigError
from flaxgpt.model import Transformer, count_params, stack_layers, unstack_layers
from tests.conftest import init_params, tiny_model_config

RECIPES = ["gpt2", "llama"]


def _tokens(cfg, batch=2, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, cfg.block_size), 0, cfg.vocab_size)


@pytest.mark.parametrize("recipe", RECIPES)
def test_logits_shape_and_dtype(recipe):
    cfg = tiny_model_config(recipe)
    model, params = init_params(cfg)
    logits = model.apply({"params": params}, _tokens(cfg, batch=3))
    assert logits.shape == (3, cfg.block_size, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_recipes_differ_as_documented():
    gpt2, llama = tiny_model_config("gpt2"), tiny_model_config("llama")
    _, p_gpt2 = init_params(gpt2)
    _, p_llama = init_params(llama)
    assert "position_embed" in p_gpt2 and "lm_head" not in p_gpt2  # learned positions, tied head
    assert "position_embed" not in p_llama and "lm_head" in p_llama  # rotary, untied head
    assert "bias" in p_gpt2["layers_0"]["attn"]["query"] and "bias" not in p_llama["layers_0"]["attn"]["query"]
    assert set(p_llama["layers_0"]["mlp"]) == {"gate", "up", "down"}  # SwiGLU
    assert set(p_gpt2["layers_0"]["mlp"]) == {"up", "down"}
    assert set(p_gpt2["final_norm"]) == {"scale", "bias"} and set(p_llama["final_norm"]) == {"scale"}


def test_parameter_count_matches_formula():
    cfg = tiny_model_config("gpt2", use_bias=False)
    _, params = init_params(cfg)
    d, v, t, L = cfg.d_model, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_layer = 4 * d * d + 2 * d * cfg.d_ff + 2 * d  # attention, MLP, two LayerNorm scales
    assert count_params(params) == v * d + t * d + L * per_layer + d


@pytest.mark.parametrize("recipe", RECIPES)
def test_causal_later_tokens_do_not_change_earlier_logits(recipe):
    cfg = tiny_model_config(recipe)
    model, params = init_params(cfg)
    tokens = _tokens(cfg)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % cfg.vocab_size)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


@pytest.mark.parametrize("recipe", RECIPES)
def test_packed_segments_equal_separate_documents(recipe):
    """Two documents packed in one row, positions restarting, give each document's own logits."""
    cfg = tiny_model_config(recipe)
    model, params = init_params(cfg)
    tokens = _tokens(cfg, batch=1)
    n1 = 6
    n2 = cfg.block_size - n1
    segments = jnp.array([[1] * n1 + [2] * n2])
    positions = jnp.array([list(range(n1)) + list(range(n2))])
    packed = model.apply({"params": params}, tokens, positions, segments)
    first = model.apply({"params": params}, tokens[:, :n1])
    second = model.apply({"params": params}, tokens[:, n1:])
    np.testing.assert_allclose(np.asarray(packed[:, :n1]), np.asarray(first), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[:, n1:]), np.asarray(second), atol=1e-5)


def test_segment_isolation_changing_one_document_leaves_the_other():
    cfg = tiny_model_config("llama")
    model, params = init_params(cfg)
    tokens = _tokens(cfg, batch=1)
    segments = jnp.array([[1] * 8 + [2] * 8])
    changed = tokens.at[:, :8].set((tokens[:, :8] + 3) % cfg.vocab_size)
    a = model.apply({"params": params}, tokens, None, segments)
    b = model.apply({"params": params}, changed, None, segments)
    np.testing.assert_array_equal(np.asarray(a[:, 8:]), np.asarray(b[:, 8:]))


def test_rotary_depends_only_on_relative_position():
    """Shifting every position by a constant leaves a RoPE model's logits unchanged."""
    cfg = tiny_model_config("llama")
    model, params = init_params(cfg)
    tokens = _tokens(cfg, batch=1)
    positions = jnp.arange(cfg.block_size)[None]
    a = model.apply({"params": params}, tokens, positions)
    b = model.apply({"params": params}, tokens, positions + 5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_scan_over_layers_equals_unrolled(recipe):
    cfg = tiny_model_config(recipe, n_layer=3)
    model, params = init_params(cfg)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    scan_model, scan_params = init_params(scan_cfg)
    stacked = stack_layers(params, cfg.n_layer)
    assert jax.tree.structure(stacked) == jax.tree.structure(scan_params)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scan_params)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        np.asarray(scan_model.apply({"params": stacked}, tokens)),
        np.asarray(model.apply({"params": params}, tokens)),
        atol=1e-5,
    )
    restored = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, restored, params))


@pytest.mark.parametrize("policy", ["full", "dots", "save_attention_out"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_equals_plain_in_value_and_gradient(policy, scan):
    cfg = tiny_model_config("llama", scan_layers=scan)
    model, params = init_params(cfg)
    remat_model = Transformer(dataclasses.replace(cfg, remat=policy))
    tokens = _tokens(cfg)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens) ** 2)

    v0, g0 = jax.value_and_grad(lambda p: loss(model, p))(params)
    v1, g1 = jax.value_and_grad(lambda p: loss(remat_model, p))(params)
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7), g0, g1)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(n_kv_heads):
    """GQA (and MQA when n_kv_heads=1) is MHA whose key/value heads are shared within a group."""
    cfg = tiny_model_config("llama", n_head=4, n_kv_heads=n_kv_heads)
    model, params = init_params(cfg)
    assert params["layers_0"]["attn"]["key"]["kernel"].shape == (cfg.d_model, n_kv_heads, cfg.head_dim)
    mha_cfg = dataclasses.replace(cfg, n_kv_heads=4)
    mha_model = Transformer(mha_cfg)
    group = 4 // n_kv_heads

    def expand(p):
        p = jax.tree.map(lambda x: x, p)
        for name in [k for k in p if k.startswith("layers_")]:
            for proj in ("key", "value"):
                k = p[name]["attn"][proj]["kernel"]
                p[name]["attn"][proj]["kernel"] = jnp.repeat(k, group, axis=1)
        return p

    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, tokens)),
        np.asarray(mha_model.apply({"params": expand(params)}, tokens)),
        atol=1e-5,
    )


def test_dropout_is_active_only_in_training():
    cfg = tiny_model_config("gpt2", dropout=0.5)
    model, params = init_params(cfg)
    tokens = _tokens(cfg)
    eval_a = model.apply({"params": params}, tokens)
    eval_b = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b = model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    cfg = tiny_model_config("llama")
    model, params = init_params(cfg)
    bf16 = Transformer(dataclasses.replace(cfg, dtype="bfloat16"))
    tokens = _tokens(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ref = np.asarray(model.apply({"params": params}, tokens))
    low = np.asarray(bf16.apply({"params": params}, tokens))
    assert low.dtype == np.float32
    assert np.max(np.abs(low - ref)) < 0.05 * np.max(np.abs(ref)) + 0.05


def test_parameters_carry_logical_axis_names():
    cfg = tiny_model_config("llama", scan_layers=True)
    model = Transformer(cfg)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.block_size), jnp.int32))
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["token_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["layers"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["attn"]["key"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["layers"]["mlp"]["down"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["layers"]["attn_norm"]["scale"]) == ("layers", "norm")


def test_padded_vocabulary_ids_are_never_produced():
    """vocab_multiple pads the vocabulary; valid_vocab keeps the padding out of every distribution."""
    from flaxgpt.generate import DecodeConfig, generate

    cfg = tiny_model_config(vocab_size=64, valid_vocab=50)
    model, params = init_params(cfg)
    logits = jax.jit(model.apply)({"params": params}, jnp.ones((2, 8), jnp.int32))
    assert bool(jnp.all(logits[..., 50:] == -1e9)) and bool(jnp.all(logits[..., :50] > -1e3))
    out = generate(
        model,
        params,
        [[1, 2, 3]] * 8,
        DecodeConfig(max_new_tokens=12, temperature=5.0),
        jax.random.PRNGKey(0),
        pad_id=0,
    )
    assert int(jnp.max(out.tokens)) < 50


def _numpy_attention(q, k, v, segment_ids):
    """An independent reference: float64 softmax attention, causal and within one segment."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("n_kv_heads,packed", [(4, True), (2, True), (2, False)])
def test_both_attention_paths_match_an_independent_reference(n_kv_heads, packed):
    """The einsum path, and the layout, scale and mask handed to jax.nn.dot_product_attention
    (cuDNN's path on a GPU, checked here through its XLA implementation): packed documents and
    padding (the masked kernel), plain rows (the causal-only kernel), GQA; one query row at a
    time (a decode step's own path)."""
    from flaxgpt.model import attention_mask, einsum_attention, fused_attention

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (2, 12, 4, 8))
    k, v = (jax.random.normal(key, (2, 12, n_kv_heads, 8)) for key in keys[1:])
    segment_ids = np.ones((2, 12), np.int32)
    if packed:  # two documents in one row; the other row padded
        segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    mask = attention_mask(jnp.asarray(segment_ids))
    reference = _numpy_attention(q, k, v, segment_ids)
    np.testing.assert_allclose(np.asarray(fused_attention(q, k, v, mask, implementation="xla")), reference, atol=1e-5)
    np.testing.assert_allclose(np.asarray(einsum_attention(q, k, v, mask)), reference, atol=1e-5)
    blocked = jax.jit(einsum_attention, static_argnames="query_block")
    # query blocks against the keys up to their last row (1: every block is one query, the decoding
    # step's path); 12 rows: a short last block
    for block in (1, 5):
        np.testing.assert_allclose(np.asarray(blocked(q, k, v, mask, query_block=block)), reference, atol=1e-5)
    for t in (0, 6, 11):  # one query (a decode step's path): each row alone against all keys
        one = einsum_attention(q[:, t : t + 1], k, v, mask[:, t : t + 1])
        np.testing.assert_allclose(np.asarray(one), reference[:, t : t + 1], atol=1e-5)


def test_query_blocks_change_neither_logits_nor_gradients():
    """model.attention_block only regroups the work: the loss and its gradients match one block,
    with dropout off; a negative block is refused by name."""
    cfg = tiny_model_config("llama", n_layer=1, n_kv_heads=2, block_size=8)
    model, params = init_params(cfg)
    tokens = _tokens(cfg)

    def loss(params, block):
        blocked = Transformer(dataclasses.replace(cfg, attention_block=block))
        return jnp.mean(blocked.apply({"params": params}, tokens) ** 2)

    loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    one_block = loss_and_grads(params, cfg.block_size)
    blocked = loss_and_grads(params, 3)  # 8 rows: blocks of 3, 3 and 2
    for ours, reference in zip(jax.tree.leaves(blocked), jax.tree.leaves(one_block)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=2e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="model.attention_block=-1"):
        dataclasses.replace(cfg, attention_block=-1).resolved()


def test_attention_setting_resolves_per_backend():
    """auto is XLA's einsum path on CPU (bit for bit); cudnn where it cannot run names why."""
    cfg = tiny_model_config("gpt2")
    model, params = init_params(cfg)
    tokens = _tokens(cfg)
    xla = Transformer(dataclasses.replace(cfg, attention="xla")).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, tokens)), np.asarray(xla))
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match=r"model.attention='cudnn' cannot be used: it needs an NVIDIA GPU"):
            Transformer(dataclasses.replace(cfg, attention="cudnn")).apply({"params": params}, tokens)


def test_gelu_backward_matches_autodiff():
    """The GELU's hand-written backward (slope recomputed from the input) equals autodiff's."""
    from flaxgpt.model import gelu

    x = 4 * jax.random.normal(jax.random.PRNGKey(5), (257,))
    cotangent = jax.random.normal(jax.random.PRNGKey(6), (257,))
    ours = jax.vjp(gelu, x)[1](cotangent)[0]
    reference = jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x)[1](cotangent)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=True)))


def test_swiglu_backward_matches_autodiff():
    """SwiGLU's hand-written backward (both gradients from the saved gate and up) equals autodiff's."""
    from flaxgpt.model import swiglu

    gate, up = 4 * jax.random.normal(jax.random.PRNGKey(7), (2, 257))
    cotangent = jax.random.normal(jax.random.PRNGKey(8), (257,))
    ours = jax.vjp(swiglu, gate, up)[1](cotangent)
    reference = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)[1](cotangent)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(swiglu(gate, up)), np.asarray(jax.nn.silu(gate) * up))
