"""PPO: GAE, the clipped objectives, the KL controller and penalty, and tiny real runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_run_config

from flaxgpt import config as C
from flaxgpt import rlhf, runs
from flaxgpt.config import ConfigError
from flaxgpt.losses import adaptive_kl_coef, generalized_advantages, ppo_policy_loss, ppo_value_loss
from flaxgpt.model import count_params
from flaxgpt.pipeline import stage_config
from flaxgpt.train import load_experiment, run_trainer
from flaxgpt.trainers import grpo, ppo, reward, sft


def test_gae_matches_a_hand_computed_reference_with_episode_ends():
    rewards = np.array([[0.1, -0.2, 1.0, 0.0, 0.0], [0.5, 0.3, 0.0, -1.0, 2.0]], np.float32)
    values = np.array([[0.4, 0.2, 0.7, 9.0, 9.0], [0.1, -0.3, 0.6, 0.2, 0.5]], np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)  # row 0 ends after 3 tokens
    gamma, lam = 0.9, 0.8
    expected = np.zeros_like(rewards)
    for b in range(2):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0  # nothing past the episode's end
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            expected[b, t] = running
    advantages, returns = generalized_advantages(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam
    )
    np.testing.assert_allclose(np.asarray(advantages), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(returns), (expected + values) * mask, rtol=1e-5, atol=1e-6)


def test_clipped_objective_has_no_gradient_outside_the_clip_range():
    old = jnp.zeros((1, 4))
    advantages = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    mask = jnp.ones((1, 4))
    # ratios 1.5 (A>0: clipped), 1.1 (A>0: inside), 0.5 (A<0: clipped), 0.9 (A<0: inside)
    logp = jnp.log(jnp.array([[1.5, 1.1, 0.5, 0.9]]))
    grad = jax.grad(lambda lp: ppo_policy_loss(lp, old, advantages, mask, 0.2)["policy_loss"])(logp)
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 2]) == 0.0
    assert float(grad[0, 1]) != 0.0 and float(grad[0, 3]) != 0.0
    stats = ppo_policy_loss(logp, old, advantages, mask, 0.2)
    assert float(stats["clip_fraction"]) == 0.5
    # the value loss stops pulling a value that moved past value_clip away from the target
    values, old_values, returns = jnp.array([[0.5, 0.05]]), jnp.zeros((1, 2)), jnp.array([[-1.0, 1.0]])
    vgrad = jax.grad(lambda v: ppo_value_loss(v, old_values, returns, jnp.ones((1, 2)), 0.2)["value_loss"])(values)
    assert float(vgrad[0, 0]) != 0.0  # clipped value (0.2) is closer: the unclipped, larger loss is used
    np.testing.assert_allclose(float(vgrad[0, 1]), 0.5 * (0.05 - 1.0), rtol=1e-6)


def test_adaptive_kl_controller_update():
    # Ziegler et al.: error clipped to +-0.2, scaled by n_steps / horizon
    assert float(adaptive_kl_coef(jnp.float32(0.15), jnp.float32(12.0), 6.0, 10000.0, 64)) == pytest.approx(
        0.15 * (1 + 0.2 * 64 / 10000)
    )
    assert float(adaptive_kl_coef(jnp.float32(0.15), jnp.float32(6.6), 6.0, 10000.0, 500)) == pytest.approx(
        0.15 * (1 + 0.1 * 500 / 10000)
    )
    assert float(adaptive_kl_coef(jnp.float32(0.15), jnp.float32(0.0), 6.0, 100.0, 10)) == pytest.approx(
        0.15 * (1 - 0.2 * 10 / 100)
    )


def test_kl_penalty_and_score_land_on_the_right_tokens_under_padding():
    logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.1, -4.0, -4.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-0.4, -0.3, -9.0, -9.0]])
    lengths = jnp.array([3, 2])
    mask = (jnp.arange(4)[None] < lengths[:, None]).astype(jnp.float32)
    rewards, kl = rlhf.token_rewards(jnp.array([2.0, -1.0]), logp, ref, mask, lengths, jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(kl), [[0.5, -1.0, 0.0, 0.0], [0.2, 0.2, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), [[-0.05, 0.1, 2.0, 0.0], [-0.02, -0.02 - 1.0, 0.0, 0.0]], atol=1e-6)


# ----------------------------------------------------------------------------- tiny runs


def reward_letter_x(prompt: str, response: str) -> float:
    """Toy reward: 1 when the answer starts with 'x' (a character the policy rarely samples at first)."""
    return 1.0 if response.startswith("x") else 0.0


def reward_nan(prompt: str, response: str) -> float:
    return float("nan")


def write_policy_data(base: str) -> None:
    """Conversations that answer "say" with a random short word, and the prompts file."""
    rng = np.random.default_rng(0)
    with open(os.path.join(base, "chats.jsonl"), "w") as f:
        for _ in range(80):
            word = "".join(rng.choice(list("abcdefgxyz"), size=rng.integers(2, 5)))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": word}]})
                + "\n"
            )
    with open(os.path.join(base, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": "say"}) + "\n" for _ in range(40))


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory) -> str:
    """A tiny chat model trained from scratch on JSONL conversations: PPO's starting policy."""
    base = tmp_path_factory.mktemp("policy")
    write_policy_data(str(base))
    cfg = tiny_run_config(
        train={"trainer": "sft", "max_steps": 30},
        data={"source": "jsonl", "path": str(base / "chats.jsonl"), "packing": "pad"},
        sft={"eval_examples": 0},
        eval={"interval": 30, "iters": 1, "sample_tokens": 0},
    )
    workdir = str(base / "run")
    sft.run(cfg, workdir)
    return workdir


def ppo_config(policy: str, reward_function: str, max_steps: int, **ppo_fields):
    cfg = tiny_run_config(
        train={"trainer": "ppo", "init_from": policy, "max_steps": max_steps, "batch_size": 16, "log_interval": 1},
        data={"source": "jsonl", "path": "unused"},
        optimizer={"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "decay": "constant", "weight_decay": 0.0},
        eval={"interval": 1000},
        checkpoint={"every_steps": 2},
    )
    fields = dict(
        reward_function=reward_function,
        value_model="head",
        max_new_tokens=6,
        epochs=2,
        minibatches=2,
        kl_coef=0.05,
        prompts_path=os.path.join(os.path.dirname(policy), "prompts.jsonl"),
        eval_prompts=8,
    )
    fields.update(ppo_fields)
    for key, value in fields.items():
        setattr(cfg.ppo, key, value)
    return cfg


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_with_bounded_kl(policy_run, tmp_path):
    workdir = str(tmp_path / "ppo")
    result = ppo.run(ppo_config(policy_run, "test_ppo:reward_letter_x", 14), workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"score_mean"' in line]
    first, last = np.mean([r["score_mean"] for r in rows[:3]]), np.mean([r["score_mean"] for r in rows[-3:]])
    assert last > first + 0.3, (first, last)
    assert all(r["kl"] < 15.0 for r in rows) and result["kl"] == rows[-1]["kl"]  # the result is the last row
    for key in ("score_std", "entropy", "approx_kl", "explained_variance", "value_loss", "policy_loss"):
        assert math.isfinite(rows[-1][key])
    assert all(0.0 < r["response_length"] <= 6 for r in rows)  # ppo.max_new_tokens=6
    assert all(0.0 <= r["clip_fraction"] <= 1.0 for r in rows) and any(r["clip_fraction"] > 0 for r in rows)
    assert all(r["rollout_seconds"] > 0 and r["update_seconds"] > 0 for r in rows)
    kl_coefs = [r["kl_coef"] for r in rows]
    assert kl_coefs[0] != kl_coefs[-1]  # the adaptive controller moved beta (from 0.05)
    assert result["val_eval_reward"] > result["start_eval_reward"]  # held-out prompts, before vs after
    # held-out KL to the reference: none at the start (the policy is the reference), some after
    assert abs(result["start_kl"]) < 1e-4 and result["val_kl"] > 1e-3, (result["start_kl"], result["val_kl"])
    # the trained policy loads like any model (sample / chat)
    loaded = runs.load(workdir)
    assert loaded.model.cfg.output == "logits"


def test_ppo_resumes_exactly(policy_run, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    config = lambda steps: ppo_config(
        policy_run, "test_ppo:reward_letter_x", steps, value_model="separate", eval_prompts=0
    )
    ppo.run(config(4), straight)
    ppo.run(config(2), resumed)
    ppo.run(config(4), resumed)
    a, b = (runs.load(w).params for w in (straight, resumed))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    rows = lambda w: [r for r in (json.loads(line) for line in open(os.path.join(w, "metrics.jsonl")))]
    assert rows(straight) == [
        dict(r, rollout_seconds=s["rollout_seconds"], update_seconds=s["update_seconds"])
        for r, s in zip(rows(resumed), rows(straight))
    ]


@pytest.mark.parametrize("trainer", [ppo, grpo], ids=["ppo", "grpo"])
def test_with_lora_the_reference_is_the_base_with_adapters_off(policy_run, tmp_path, trainer):
    cfg = ppo_config(policy_run, "test_ppo:reward_letter_x", 2, eval_prompts=0)
    cfg.train.trainer, cfg.model.lora_rank = trainer.__name__.rsplit(".", 1)[1], 4
    if trainer is grpo:  # PPO's own settings are refused by GRPO
        cfg.ppo = C.PPOConfig(
            **{k: getattr(cfg.ppo, k) for k in ("reward_function", "max_new_tokens", "prompts_path", "eval_prompts")}
        )
    run = trainer.setup(cfg, str(tmp_path / "lora"))
    m, shardings = run.models, trainer.abstract_state(run)[1]
    state = trainer.initial_state(run, shardings)
    # adapters moved away from zero, as after some updates: the reference must not move with them
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if str(path[-1].key) == "lora_b" else x, state.params["policy"]
    )
    state = state.replace(params={**state.params, "policy": moved})
    base = runs.load(policy_run)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 20, (3, m.query_width + 4)), jnp.int32)
    inputs = (tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), jnp.ones_like(tokens))
    ref = rlhf.response_logprobs(m.policy, rlhf.reference_params(m, state), *inputs, m.query_width, 1.0)[0]
    want = rlhf.response_logprobs(base.model, base.params, *inputs, m.query_width, 1.0)[0]
    policy = rlhf.response_logprobs(m.policy, moved, *inputs, m.query_width, 1.0)[0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(policy), np.asarray(want), atol=1e-3)
    # one copy of the base weights in the whole state: no frozen reference beside the policy
    assert "reference" not in state.frozen
    no_adapters = lambda tree: {k: v for k, v in tree.items() if not k.startswith("lora_")}
    strip = lambda tree: {k: strip(v) if isinstance(v, dict) else v for k, v in no_adapters(tree).items()}
    held = count_params(strip(jax.tree.map(np.asarray, {**state.params, **state.frozen})))
    value_head = count_params(state.params.get("value", {}))
    assert held - value_head == count_params(base.params)


def test_chat_demo_rl_stage_runs_rloo_against_a_reward_model(policy_run, tmp_path):
    """The chat demo's RL stage on tiny settings: RLOO scored by a reward model (not a function),
    two steps, the held-out KL reported beside kl_target for summary.json."""
    rng = np.random.default_rng(1)
    word = lambda letters: "".join(rng.choice(list(letters), size=3))
    pairs = [{"prompt": "say", "chosen": word("xyz"), "rejected": word("abc")} for _ in range(40)]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    rm_cfg = tiny_run_config(
        train={"trainer": "reward", "init_from": policy_run, "max_steps": 2, "batch_size": 8},
        data={"source": "jsonl", "path": str(tmp_path / "pairs.jsonl")},
        eval={"interval": 1000, "iters": 1, "sample_tokens": 0},
    )
    reward.run(rm_cfg, str(tmp_path / "rm"))
    prompts = os.path.join(os.path.dirname(policy_run), "prompts.jsonl")
    tiny = ["train.max_steps=2", "train.batch_size=4", "grpo.group_size=2", "ppo.max_new_tokens=6"]
    tiny += ["ppo.eval_prompts=4", "data.source=jsonl", f"data.path={prompts}", f"ppo.prompts_path={prompts}"]
    stage = load_experiment("chat_demo", [f"rl.{s}" for s in tiny])[-1]
    assert (stage.name, stage.reward_from, stage.config.grpo.advantage) == ("rl", "rm", "rloo")
    cfg = stage_config(stage, str(tmp_path))
    cfg.train.init_from = policy_run
    result = run_trainer(cfg, str(tmp_path / "rl"))
    assert result["step"] == 2 and result["kl_target"] == stage.config.ppo.kl_target
    figures = {k: result[k] for k in ("start_eval_reward", "val_eval_reward", "val_kl", "start_kl")}
    assert all(np.isfinite(v) for v in figures.values()) and figures["start_kl"] == 0.0, figures
    assert figures["start_eval_reward"] != 0.0  # the reward model's scores (centred, not a constant)


def test_non_finite_reward_stops_before_any_checkpoint(policy_run, tmp_path):
    workdir = str(tmp_path / "nan")
    with pytest.raises(ConfigError, match="ppo.reward_function='test_ppo:reward_nan' returned nan"):
        ppo.run(ppo_config(policy_run, "test_ppo:reward_nan", 4, eval_prompts=0), workdir)
    steps = (
        os.listdir(os.path.join(workdir, "checkpoints")) if os.path.exists(os.path.join(workdir, "checkpoints")) else []
    )
    assert not [s for s in steps if s.isdigit()]


@pytest.mark.slow
def test_ppo_on_a_sharded_mesh_matches_pure_data_parallel(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, os.path.join("tests", "ppo_sharded_worker.py"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    dp, mixed = out["data4"], out["f2t2"]
    for a, b in zip(dp["rows"], mixed["rows"]):  # same rollouts, same updates on either mesh
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "entropy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)
    specs = mixed["specs"]
    assert specs["['layers_0']['mlp']['up']['kernel']"] == ["fsdp", "tensor"]
    assert specs["['token_embed']['embedding']"] == ["tensor", "fsdp"]
