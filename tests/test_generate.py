"""The generation engine: the KV cache is exact against full recomputation, every strategy does
what it says, rows stop on their own, beam search finds the best sequence."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.generate import (
    DecodeConfig,
    _prefill,
    _step,
    choose_token,
    completions,
    generate,
    generate_batched,
    left_pad,
    process_logits,
    sliding_window_sample,
)
from flaxgpt.model import Transformer, stack_layers
from tests.conftest import init_params, tiny_model_config

PAD = 0
CASES = [("gpt2", {}), ("llama", {"n_kv_heads": 2}), ("llama", {"n_kv_heads": 1})]


_COMPILED: dict = {}


def _forward(model, params, tokens):
    """The plain full-sequence forward pass (jitted once per model): the reference."""
    if model not in _COMPILED:
        _COMPILED[model] = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return _COMPILED[model](params, tokens)


def _full_logits(model, params, tokens):
    return np.asarray(_forward(model, params, jnp.asarray([tokens]))[0])


@pytest.mark.parametrize("recipe, extra", CASES)
def test_cached_logits_equal_full_recompute_at_every_position(recipe, extra):
    cfg = tiny_model_config(recipe, vocab_size=40, block_size=24, **extra)
    model, params = init_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 40, n)) for n in (7, 3, 5)]  # different lengths: left padding
    follow = rng.integers(1, 40, (3, 8))
    tokens, mask = left_pad(prompts, PAD)
    last, cache, position = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(mask), tokens.shape[1] + 8)
    stepped = [np.asarray(last)]
    for t in range(8):
        logits, cache = _step(model, params, cache, jnp.asarray(follow[:, t], jnp.int32), position + t)
        stepped.append(np.asarray(logits))
    for row, prompt in enumerate(prompts):
        full = _full_logits(model, params, prompt + list(follow[row]))
        expected = full[len(prompt) - 1 : len(prompt) + 8]
        got = np.stack([s[row] for s in stepped])
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def _greedy_reference(model, params, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(_full_logits(model, params, tokens)[-1])))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("recipe, extra", CASES)
def test_greedy_generation_equals_full_recompute(recipe, extra):
    cfg = tiny_model_config(recipe, vocab_size=40, block_size=24, **extra)
    model, params = init_params(cfg)
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    out = generate(
        model, params, prompts, DecodeConfig(max_new_tokens=10, temperature=0.0), jax.random.PRNGKey(0), pad_id=PAD
    )
    assert completions(out) == [_greedy_reference(model, params, p, 10) for p in prompts]
    single = generate(
        model, params, prompts[:1], DecodeConfig(max_new_tokens=10, temperature=0.0), jax.random.PRNGKey(0), pad_id=PAD
    )  # no padding at all
    assert completions(single)[0] == completions(out)[0]


def test_scanned_model_decodes_like_the_unrolled_one():
    cfg = tiny_model_config("llama", vocab_size=40, block_size=24, n_kv_heads=2)
    model, params = init_params(cfg)
    scan_model = Transformer(dataclasses.replace(cfg, scan_layers=True))
    prompts, decode = [[3, 4, 5], [6]], DecodeConfig(max_new_tokens=8, temperature=0.0)
    a = generate(model, params, prompts, decode, jax.random.PRNGKey(0), pad_id=PAD)
    b = generate(scan_model, stack_layers(params, cfg.n_layer), prompts, decode, jax.random.PRNGKey(0), pad_id=PAD)
    assert completions(a) == completions(b)
    beams = dataclasses.replace(decode, num_beams=3)
    assert completions(generate(model, params, prompts, beams, jax.random.PRNGKey(0), pad_id=PAD)) == completions(
        generate(scan_model, stack_layers(params, cfg.n_layer), prompts, beams, jax.random.PRNGKey(0), pad_id=PAD)
    )


def test_log_probabilities_match_the_model_and_the_sampling_distribution():
    cfg = tiny_model_config("gpt2", vocab_size=40, block_size=24)
    model, params = init_params(cfg)
    prompt = [3, 1, 4, 1, 5]
    decode = DecodeConfig(max_new_tokens=6, temperature=0.7, top_k=10)
    out = generate(model, params, [prompt], decode, jax.random.PRNGKey(3), pad_id=PAD)
    new = completions(out)[0]
    full = _full_logits(model, params, prompt + new)
    for t, token in enumerate(new):
        logits = full[len(prompt) - 1 + t]
        raw = jax.nn.log_softmax(logits)[token]
        sampled = jax.nn.log_softmax(process_logits(jnp.asarray(logits)[None], decode)[0])[token]
        np.testing.assert_allclose(float(out.raw_logprobs[0, t]), float(raw), atol=1e-4)
        np.testing.assert_allclose(float(out.logprobs[0, t]), float(sampled), atol=1e-4)


def test_sampling_is_seeded_and_filters_do_what_they_say():
    cfg = tiny_model_config("gpt2", vocab_size=40, block_size=24)
    model, params = init_params(cfg)
    prompts = [[7, 8, 9], [1, 2]]
    run = lambda decode, seed: completions(
        generate(model, params, prompts, decode, jax.random.PRNGKey(seed), pad_id=PAD)
    )
    hot = DecodeConfig(max_new_tokens=12, temperature=1.5)
    assert run(hot, 1) == run(hot, 1) and run(hot, 1) != run(hot, 2)
    greedy = run(DecodeConfig(max_new_tokens=12, temperature=0.0), 0)
    assert run(DecodeConfig(max_new_tokens=12, temperature=1.5, top_k=1), 5) == greedy
    assert run(DecodeConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6), 5) == greedy
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.asarray(process_logits(logits, DecodeConfig(temperature=1.0, top_p=0.7)) > -1e30)[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, then 0.8 >= 0.7: nucleus {0, 1}
    picks = {
        int(
            choose_token(
                jnp.tile(jnp.arange(10.0), (1, 1)), jax.random.PRNGKey(i), DecodeConfig(temperature=5.0, top_k=3)
            )[0][0]
        )
        for i in range(200)
    }
    assert picks == {7, 8, 9}


def test_rows_stop_independently_at_stop_tokens():
    cfg = tiny_model_config("llama", vocab_size=40, block_size=24)
    model, params = init_params(cfg)
    prompts = [[5, 6, 7], [9, 9], [20]]
    free = completions(
        generate(
            model, params, prompts, DecodeConfig(max_new_tokens=10, temperature=0.0), jax.random.PRNGKey(0), pad_id=PAD
        )
    )
    stop = free[0][2]  # a token row 0 emits third
    out = generate(
        model,
        params,
        prompts,
        DecodeConfig(max_new_tokens=10, temperature=0.0),
        jax.random.PRNGKey(0),
        pad_id=PAD,
        stop_tokens=[stop],
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, full in enumerate(free):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert lengths[row] == len(expected) and list(tokens[row, : len(expected)]) == expected
        assert np.all(tokens[row, len(expected) :] == PAD) and np.all(
            np.asarray(out.logprobs)[row, len(expected) :] == 0
        )
    assert completions(out, [stop])[0] == free[0][:2]


def test_the_last_rows_running_continue_alone_as_in_the_whole_batch():
    """Once a quarter of a batch of 12 is left running, only those rows continue: greedy rows
    give what each gives alone, and the longest sampled row's tokens carry the model's
    log-probabilities."""
    cfg = tiny_model_config("llama", vocab_size=40, block_size=24)
    model, params = init_params(cfg)
    prompts = [[5 + i, 6 + i % 4, 7] for i in range(12)]
    greedy = DecodeConfig(max_new_tokens=10, temperature=0.0)
    free = completions(generate(model, params, prompts, greedy, jax.random.PRNGKey(0), pad_id=PAD))
    runners = sorted(range(len(free)), key=lambda r: len(set(free[r])))[:3]  # never stopped
    banned = {t for r in runners for t in free[r]}
    stops = sorted({next(t for t in free[r][1:] if t not in banned) for r in range(len(free)) if r not in runners})
    run = lambda rows, decode: generate(
        model, params, rows, decode, jax.random.PRNGKey(1), pad_id=PAD, stop_tokens=stops
    )
    out = run(prompts, greedy)
    lengths = np.sort(np.asarray(out.lengths))[::-1]
    assert lengths[3] < lengths[0]  # the longest row ran on after 3 rows were left
    for row, prompt in enumerate(prompts):
        alone = run([prompt], greedy)
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(out.tokens)[row])
        np.testing.assert_allclose(np.asarray(alone.logprobs)[0], np.asarray(out.logprobs)[row], atol=1e-5)
    sampled = run(prompts, DecodeConfig(max_new_tokens=10, temperature=1.0))
    row = int(np.argmax(np.asarray(sampled.lengths)))
    new = completions(sampled)[row]
    full = jax.nn.log_softmax(_full_logits(model, params, prompts[row] + new))
    want = [float(full[len(prompts[row]) - 1 + t, token]) for t, token in enumerate(new)]
    np.testing.assert_allclose(np.asarray(sampled.raw_logprobs)[row, : len(new)], want, atol=1e-4)


def test_batched_generation_pads_prompts_to_the_width_asked_for_with_the_same_answers(monkeypatch):
    cfg = tiny_model_config("llama", vocab_size=40, block_size=24)
    model, params = init_params(cfg)
    prompts = [[5, 6, 7], [9, 9], [20], [3, 4, 5, 6]]
    decode = DecodeConfig(max_new_tokens=6, temperature=0.0)
    default = generate_batched(model, params, prompts, decode, jax.random.PRNGKey(0), batch_size=3, pad_id=PAD)
    widths = []

    def spy(*args, prompt_width=None, **kwargs):
        widths.append(prompt_width)
        return generate(*args, prompt_width=prompt_width, **kwargs)

    monkeypatch.setattr("flaxgpt.generate.generate", spy)
    narrow = generate_batched(
        model, params, prompts, decode, jax.random.PRNGKey(0), batch_size=3, pad_id=PAD, prompt_width=4
    )
    assert widths == [4, 4] and narrow == default  # two chunks, each 4 wide, not block - max_new = 18


def test_beam_search_finds_the_most_likely_sequence():
    cfg = tiny_model_config("gpt2", vocab_size=12, block_size=16)
    model, params = init_params(cfg, seed=4)
    prompt = [3, 4, 5]
    seqs = np.array(list(itertools.product(range(12), repeat=3)))  # every 3-token continuation
    logp = np.asarray(
        jax.nn.log_softmax(
            _forward(model, params, jnp.asarray(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1))), -1
        )
    )
    scores = sum(logp[np.arange(len(seqs)), len(prompt) - 1 + t, seqs[:, t]] for t in range(3))
    best, best_score = list(seqs[np.argmax(scores)]), float(np.max(scores))
    out = generate(
        model,
        params,
        [prompt],
        DecodeConfig(max_new_tokens=3, num_beams=12, length_penalty=0.0),
        jax.random.PRNGKey(0),
        pad_id=PAD,
    )
    assert completions(out)[0] == best
    np.testing.assert_allclose(float(jnp.sum(out.raw_logprobs)), best_score, atol=1e-4)
    greedy = generate(
        model, params, [prompt], DecodeConfig(max_new_tokens=3, temperature=0.0), jax.random.PRNGKey(0), pad_id=PAD
    )
    assert float(jnp.sum(greedy.raw_logprobs)) <= best_score + 1e-5


def test_too_long_requests_and_empty_prompts_are_clear_errors():
    cfg = tiny_model_config("gpt2", vocab_size=40, block_size=16)
    model, params = init_params(cfg)
    with pytest.raises(ValueError, match="exceeds the model's block_size 16"):
        generate(model, params, [[1] * 10], DecodeConfig(max_new_tokens=7), jax.random.PRNGKey(0), pad_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[1], []], DecodeConfig(max_new_tokens=2), jax.random.PRNGKey(0), pad_id=PAD)


def test_sliding_window_continues_past_the_context_like_stepwise_argmax():
    cfg = tiny_model_config("gpt2", vocab_size=40, block_size=16)
    model, params = init_params(cfg)
    prompt = [3, 1, 4, 1, 5]
    got = sliding_window_sample(
        model, params, prompt, DecodeConfig(max_new_tokens=20, temperature=0.0), jax.random.PRNGKey(0)
    )
    tokens = list(prompt)
    for _ in range(20):
        tokens.append(int(np.argmax(_full_logits(model, params, tokens[-16:])[-1])))
    assert got == tokens[len(prompt) :]
