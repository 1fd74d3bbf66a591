"""The end-of-run sampler: greedy equals a plain argmax loop; sampling is seeded and filtered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.generate import choose_token, sample
from tests.conftest import init_params, tiny_model_config


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_greedy_equals_stepwise_argmax_with_sliding_window(recipe):
    cfg = tiny_model_config(recipe)  # block_size 16: 20 new tokens after 5 slide the window
    model, params = init_params(cfg)
    prompt = [3, 1, 4, 1, 5]
    got = sample(model, params, prompt, 20, jax.random.PRNGKey(0), temperature=0.0)
    tokens = list(prompt)
    for _ in range(20):
        window = jnp.asarray([tokens[-cfg.block_size:]])
        tokens.append(int(jnp.argmax(model.apply({"params": params}, window)[0, -1])))
    assert got == tokens[len(prompt):]


def test_sampling_is_seeded_and_top1_is_greedy():
    cfg = tiny_model_config("gpt2")
    model, params = init_params(cfg)
    prompt = [7, 8, 9]
    a = sample(model, params, prompt, 12, jax.random.PRNGKey(1), temperature=1.0)
    b = sample(model, params, prompt, 12, jax.random.PRNGKey(1), temperature=1.0)
    c = sample(model, params, prompt, 12, jax.random.PRNGKey(2), temperature=1.0)
    assert a == b and a != c
    greedy = sample(model, params, prompt, 12, jax.random.PRNGKey(0), temperature=0.0)
    assert sample(model, params, prompt, 12, jax.random.PRNGKey(5), temperature=1.0, top_k=1) == greedy
    stop = greedy[3]
    assert sample(model, params, prompt, 12, jax.random.PRNGKey(0), temperature=0.0,
                  stop_token=stop) == greedy[: greedy.index(stop)]


def test_top_k_never_picks_outside_the_k_best():
    logits = jnp.tile(jnp.arange(10.0), (4000, 1))
    picks = np.asarray(choose_token(logits, jax.random.PRNGKey(0), temperature=5.0, top_k=3))
    assert set(picks.tolist()) == {7, 8, 9}
