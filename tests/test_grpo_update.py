"""GRPO's update computes what the straightforward one does: each prompt once per group, its answers
packed after it as branches sharing it, the old log-probabilities from the first epoch, no
reference pass at beta 0 — against full-width forwards with separate old and reference passes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from flaxgpt import generate, rlhf
from flaxgpt.losses import grpo_loss
from flaxgpt.model import Transformer
from flaxgpt.trainers import grpo

ARGS = argparse.Namespace(batch=4, group=2, new_tokens=8, epochs=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(GRPO run on a 1-layer model, its initial state, a rollout-shaped host batch)."""
    spec = importlib.util.spec_from_file_location("grpo_speed", os.path.join(REPO, "benchmarks", "grpo_speed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_dir = bench.random_run(str(tmp_path_factory.mktemp("grpo_update") / "run"), tiny=True)
    run = grpo.setup(bench.grpo_config(ARGS, run_dir), str(tmp_path_factory.mktemp("work")))
    shardings = grpo.abstract_state(run)[1]
    return run, shardings, batch(run)


def batch(run) -> dict:
    """Groups of ARGS.group rows sharing a left-padded prompt (5, 40, 17 and 29 tokens), answers of
    1-3 of the 8 allowed tokens."""
    rng, q, r, n = np.random.default_rng(0), run.models.query_width, ARGS.new_tokens, ARGS.batch * ARGS.group
    answers = rng.integers(1, 4, n)
    answers[0] = 3
    prompts = np.repeat(rng.integers(1, 60, (ARGS.batch, q)), ARGS.group, 0)  # a group shares its prompt
    tokens = np.concatenate([prompts, rng.integers(1, 60, (n, r))], 1)
    cols, prompt_len = np.arange(q + r), np.repeat([5, 40, 17, 29], ARGS.group)
    mask = ((cols >= q - prompt_len[:, None]) & (cols < q + answers[:, None])).astype(np.int32)
    return {
        "tokens": np.where(mask, tokens, 0).astype(np.int32),
        "segments": mask,
        "resp_mask": mask[:, q:].astype(np.float32),
        "advantages": rng.normal(size=(n, 1)).astype(np.float32),
    }


def straightforward_update(m, cfg, optimizer, state, b):
    """GRPO's update as written first: full-width forwards, separate old and reference passes."""
    g, q, t = cfg.grpo, m.query_width, cfg.ppo.temperature
    inputs = (b["tokens"], (np.cumsum(b["segments"], 1) - 1).clip(0), b["segments"])
    logprobs = lambda params: rlhf.response_logprobs(m.policy, params, *inputs, q, t)[0]
    old, ref = logprobs(state.params["policy"]), logprobs(state.frozen["reference"])

    def epoch(carry, _):
        params, opt_state = carry

        def objective(p):
            args = (b["advantages"][:, 0], b["resp_mask"], g.clip_low, g.clip_high, g.beta, g.normalization)
            out = grpo_loss(logprobs(p["policy"]), old, ref, *args)
            return out["loss_sum"] / jnp.maximum(out["weight_sum"], 1.0), out["ratios"]

        (loss, ratios), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        stats = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        stats.update({k: num / jnp.maximum(den, 1.0) for k, (num, den) in ratios.items()})
        return (optax.apply_updates(params, updates), opt_state), stats

    (params, _), stats = jax.lax.scan(epoch, (state.params, state.opt_state), None, length=g.epochs)
    return params, jax.tree.map(jnp.mean, stats)


def test_pack_groups_writes_each_real_token_once(setup):
    run, _, host = setup
    q, r = run.models.query_width, ARGS.new_tokens
    weight = host["resp_mask"].copy()
    weight[2:4] = 0  # a group left out (dynamic sampling): none of its tokens is packed
    packed = grpo.pack_groups({**host, "resp_mask": weight}, q, ARGS.group, rows_multiple=2)
    assert packed["tokens"].shape == (2, 160)  # 4 groups of 6-46 tokens fit one row; rows rounded to 2
    prompts = host["segments"][::2, :q].sum(1)
    assert (packed["segments"] > 0).sum() == prompts.sum() - prompts[1] + weight.sum()
    flat = packed["tokens"].reshape(-1)
    for row in np.flatnonzero(weight.any(1)):
        n = int(weight[row].sum())
        before = np.concatenate([host["tokens"][row, q - 1 : q], host["tokens"][row, q : q + n - 1]])
        np.testing.assert_array_equal(flat[packed["source"][row, :n]], before)  # what predicts each token
        np.testing.assert_array_equal(packed["targets"][row, :n], host["tokens"][row, q : q + n])
    assert packed["targets"].shape == packed["source"].shape == (len(weight), r)


def test_packed_logprobs_and_gradients_match_per_row_ones(setup):
    """On a 2-layer model with a sliding window on every other layer (positions, not columns,
    measure its distance in the packed rows), random weights, left padding."""
    run, _, host = setup
    cfg = dataclasses.replace(run.models.policy.cfg, n_layer=2, sliding_window=6, global_every=2)
    model, q = Transformer(cfg), run.models.query_width
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    positions = (np.cumsum(host["segments"], 1) - 1).clip(0)
    packed = grpo.pack_groups(host, q, ARGS.group)
    mask = host["resp_mask"]

    def per_row(p):
        return rlhf.response_logprobs(model, p, host["tokens"], positions, host["segments"], q, 0.7)[0] * mask

    packed_logp = lambda p: rlhf.packed_response_logprobs(model, p, packed, 0.7) * mask
    for_loss = lambda logprobs: jax.jit(jax.value_and_grad(lambda p: jnp.sum(logprobs(p) ** 2)))
    (got, got_grads), (want, want_grads) = for_loss(packed_logp)(params), for_loss(per_row)(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    close = jax.tree.map(lambda x, y: np.allclose(x, y, rtol=1e-4, atol=1e-6), got_grads, want_grads)
    assert all(jax.tree.leaves(close)) and np.sum(mask) > 0


# beta 0 and Dr. GRPO's constant normalisation with one group left out (dynamic sampling: weight
# 0), beta > 0 with the sequence normalisation on every group
@pytest.mark.parametrize("beta, normalization, dropped", [(0.04, "sequence", False), (0.0, "constant", True)])
def test_update_matches_the_straightforward_one(setup, beta, normalization, dropped):
    run, shardings, host = setup
    cfg = dataclasses.replace(run.cfg, grpo=dataclasses.replace(run.cfg.grpo, beta=beta, normalization=normalization))
    if dropped:
        host = {**host, "resp_mask": host["resp_mask"] * (np.arange(len(host["tokens"])) // ARGS.group != 1)[:, None]}
    state = grpo.initial_state(run, shardings)
    want_params, want = jax.jit(functools.partial(straightforward_update, run.models, cfg, run.optimizer))(state, host)
    b = grpo.pack_groups(host, run.models.query_width, ARGS.group)
    new_state, got = jax.jit(functools.partial(grpo.update, run.models, cfg, run.optimizer))(state, b)
    assert set(got) == set(want) - ({"kl"} if beta == 0 else set())
    for key in got:
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=2e-4, atol=1e-6, err_msg=key)
    close = jax.tree.map(lambda x, y: np.allclose(x, y, rtol=1e-4, atol=1e-6), new_state.params, want_params)
    assert all(jax.tree.leaves(close))
    assert float(want["loss"]) != 0.0 and float(want["grad_norm"]) > 0.0


def test_grouped_rollout_samples_what_the_full_width_one_does(setup):
    """GRPO's rollout prefills each question once, at the longest prompt's width rounded up to 32
    (not query_width): the same tokens as every copy padded to query_width, for the same key."""
    run, shardings, _ = setup
    params, q = grpo.initial_state(run, shardings).params["policy"], run.models.query_width
    prompts = [pr for pr in run.prompts[0][: ARGS.batch] for _ in range(ARGS.group)]
    key = jax.random.PRNGKey(3)
    tokens, mask, got = rlhf.rollout(run, params, prompts, key, 1.0, ARGS.group)
    decode = generate.DecodeConfig(max_new_tokens=ARGS.new_tokens, temperature=1.0)
    ids = [[int(t) for t, m in zip(row, mask_row) if m] for row, mask_row in zip(tokens, mask)]
    pad = run.tokenizer.pad_id
    want = generate.generate(
        run.models.policy, params, ids, decode, key, pad_id=pad, stop_tokens=run.stops, prompt_width=q
    )
    assert max(map(len, ids)) <= 64 < q  # the rollout's prompt width was cut
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in np.asarray(got.tokens)[: ARGS.group]}) > 1  # a group's answers differ
