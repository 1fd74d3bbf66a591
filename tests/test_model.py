"""The Transformer: shapes, causality, segments and positions, scan/remat equivalence, GQA/MQA."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    np.testing.assert_allclose(np.asarray(scan_model.apply({"params": stacked}, tokens)),
                               np.asarray(model.apply({"params": params}, tokens)), atol=1e-5)
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
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)),
                               np.asarray(mha_model.apply({"params": expand(params)}, tokens)), atol=1e-5)


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
    out = generate(model, params, [[1, 2, 3]] * 8, DecodeConfig(max_new_tokens=12, temperature=5.0),
                   jax.random.PRNGKey(0), pad_id=0)
    assert int(jnp.max(out.tokens)) < 50
