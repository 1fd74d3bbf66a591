"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): RL from a reward without a value
model. Each step samples grpo.group_size answers to each of train.batch_size prompts with the
generation engine, scores them (the reward model of ppo.reward_from, or ppo.reward_function),
and takes as advantage each answer's reward relative to its group (`losses.group_advantages`);
grpo.epochs updates of the clipped objective with the k3 KL to the reference (`losses.grpo_loss`)
follow. Prompts, reward, lengths and temperature are the ppo section's; the run state is PPO's
(`rlhf.PPOState`, without a value model), so held-out evaluation is PPO's too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt import lora, rlhf
from flaxgpt.config import Config
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.world import WorldTask
from flaxgpt.losses import group_advantages, grpo_loss
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer
from flaxgpt.rewards import reward_function
from flaxgpt.rlhf import PPO, Models, PPOState, evaluate, load_prompts, rollout, scores, sequences
from flaxgpt.runs import inherit_model, params_from_run, read_run
from flaxgpt.sharding import host_value
from flaxgpt.trainers.scaffold import NonFiniteLoss, RunSpec, Runtime, fit


def setup(cfg: Config, workdir: str) -> PPO:
    reward_fn = reward_function(cfg)  # a bad ppo.reward_function fails before the workdir is made
    rt = Runtime.create(cfg, workdir)
    tc, p = cfg.train, cfg.ppo
    _, tokenizer = read_run(tc.init_from)
    rt.tokenizer = tokenizer  # saved once the checkpoint agreed
    source = read_run(tc.init_from)[0].model
    policy_cfg = inherit_model(dataclasses.replace(cfg.model, output="logits"), source, tc.init_from)
    cfg = dataclasses.replace(cfg, model=policy_cfg)
    reward_cfg = rlhf.reward_model_config(cfg, tokenizer.vocab_size)
    width = rlhf.query_width(p, policy_cfg.block_size)
    policy = Transformer(policy_cfg)
    models = Models(policy, policy, Transformer(reward_cfg) if reward_cfg else None, False, width)
    mask = lora.trainable_mask if policy_cfg.lora_rank else None
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps * cfg.grpo.epochs, mask)
    labeler = WorldTask.from_config(cfg).label if cfg.data.source == "world" else None
    sources = {"policy": tc.init_from, "reward": p.reward_from}
    run = PPO(cfg, rt, tokenizer, models, sources, optimizer, reward_fn, labeler, None, [])
    run.prompts = load_prompts(cfg, run.notes.append)
    return run


def abstract_state(run: PPO) -> tuple[Any, Any]:
    m = run.models
    shape = lambda model: jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.cfg.block_size), jnp.int32))["params"]
    )
    trainable = {"policy": shape(m.policy)}
    frozen = {} if m.policy.cfg.lora_rank else {"reference": shape(m.policy)}
    if m.reward is not None:
        frozen["reward"] = shape(m.reward)
    return rlhf.abstract_state(run, trainable, frozen)


def initial_state(run: PPO, shardings: Any) -> PPOState:
    rt, tc, m = run.rt, run.cfg.train, run.models
    load = lambda source, step, model, sh: params_from_run(source, step, model.cfg, rt.mesh, rt.rules, tc.seed)(sh)
    policy = load(tc.init_from, tc.init_step, m.policy, shardings.params["policy"])
    frozen = {}
    if "reference" in shardings.frozen:  # with LoRA the reference is the policy with adapters off
        frozen["reference"] = load(tc.init_from, tc.init_step, m.policy, shardings.frozen["reference"])
    if m.reward is not None:
        frozen["reward"] = load(run.sources["reward"], None, m.reward, shardings.frozen["reward"])

    return rlhf.initial_state(run, {"policy": policy}, frozen, run.cfg.grpo.beta, shardings)


def update(m: Models, cfg: Config, optimizer, state: PPOState, batch: dict) -> tuple[PPOState, dict]:
    """grpo.epochs full-batch updates of the clipped objective; the ratio is to the rollout policy.

    The batch is `pack_groups`' layout: each prompt runs once for its group, and only real tokens
    (and the packing's padding) are computed. The rollout policy is the state's, so the first
    epoch's own forward gives the old log-probabilities (no separate pass), and beta = 0 needs
    no reference pass (nor reports a kl figure)."""
    g, temperature = cfg.grpo, cfg.ppo.temperature
    logprobs = lambda params: rlhf.packed_response_logprobs(m.policy, params, batch, temperature)
    ref = jax.lax.stop_gradient(logprobs(rlhf.reference_params(m, state))) if g.beta else None
    adapters_only = bool(m.policy.cfg.lora_rank)

    def objective(params, old):
        params = lora.freeze_base(params) if adapters_only else params
        logp = logprobs(params["policy"])
        old = jax.lax.stop_gradient(logp) if old is None else old
        kl_to = jax.lax.stop_gradient(logp) if ref is None else ref
        args = (batch["advantages"][:, 0], batch["resp_mask"], g.clip_low, g.clip_high, g.beta, g.normalization)
        out = grpo_loss(logp, old, kl_to, *args, horizon=cfg.ppo.max_new_tokens)
        return out["loss_sum"] / jnp.maximum(out["weight_sum"], 1.0), (out["ratios"], old)

    def epoch(carry, old):
        params, opt_state = carry
        (loss, (ratios, old)), grads = jax.value_and_grad(objective, has_aux=True)(params, old)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        stats = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        stats.update(
            {k: num / jnp.maximum(den, 1.0) for k, (num, den) in ratios.items() if ref is not None or k != "kl"}
        )
        return (optax.apply_updates(params, updates), opt_state), stats, old

    def again(carry, _):
        carry, stats, _ = epoch(carry, old)
        return carry, stats

    carry, first, old = epoch((state.params, state.opt_state), None)
    (params, opt_state), rest = jax.lax.scan(again, carry, None, length=g.epochs - 1)
    stats = jax.tree.map(lambda a, b: (a + jnp.sum(b)) / g.epochs, first, rest)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats


PACKED = ("tokens", "positions", "segments", "branches")  # pack_groups' [rows, width] arrays


def packed_width(longest: int, min_width: int = 160) -> int:
    """`pack_groups`' row width for a longest group of `longest` tokens."""
    return max(min_width, -(-longest // 64) * 64)


def pack_groups(host: dict, query_width: int, group: int, rows_multiple: int = 2, min_width: int = 160) -> dict:
    """A rollout batch (`host`: left-padded prompts in tokens[:, :query_width], the answers
    after them, `resp_mask` their weights) packed for `rlhf.packed_response_logprobs`. Each
    group's prompt is written once, its answers after it as branches 1..group; whole groups
    are packed first-fit (longest first) into rows of the longest group's width rounded up to
    64, at least `min_width` (the attention's cost grows with the width, the packing's waste
    shrinks), the rows' count rounded up to `rows_multiple` (few compiled shapes). Left
    padding, answer padding and answers of weight 0 are not computed."""
    tokens, real, weight = host["tokens"], host["segments"].astype(bool), host["resp_mask"] > 0
    lengths = weight.sum(1)
    groups = [(r, real[r, :query_width].sum()) for r in range(0, len(tokens), group) if lengths[r : r + group].any()]
    sizes = [int(prompt + lengths[r : r + group].sum()) for r, prompt in groups]
    width = packed_width(max(sizes, default=1), min_width)
    used: list[int] = []  # each row's filled columns
    place = []  # (row, column) of each group
    for i in np.argsort(sizes, kind="stable")[::-1]:
        row = next((j for j, u in enumerate(used) if u + sizes[i] <= width), len(used))
        used += [0] * (row == len(used))
        place.append((i, row, used[row]))
        used[row] += sizes[i]
    rows = max(1, -(-len(used) // rows_multiple)) * rows_multiple
    out = {k: np.zeros((rows, width), np.int32) for k in PACKED}
    source = np.zeros(weight.shape, np.int32)
    for i, row, col in place:
        first, prompt = groups[i]
        spans = [(query_width - prompt, prompt, first, 0)]  # (start, length, rollout row, branch)
        spans += [(query_width, int(lengths[first + b]), first + b, b + 1) for b in range(group)]
        end = row * width + col + prompt - 1  # the prompt's last position predicts each answer's first token
        for start, n, r, branch in spans:
            cols = slice(col, col + n)
            out["tokens"][row, cols] = tokens[r, start : start + n]
            out["positions"][row, cols] = (prompt if branch else 0) + np.arange(n)
            out["segments"][row, cols], out["branches"][row, cols] = first + 1, branch
            if branch:
                source[r, :n] = np.concatenate([[end], row * width + col + np.arange(n - 1)])[:n]
            col += n
    rollout = {"targets": tokens[:, query_width:].astype(np.int32), "source": source}
    return {**out, **rollout, "resp_mask": host["resp_mask"], "advantages": host["advantages"]}


def make_step(run: PPO, order: PackedRows, shardings: Any):
    tc, p, g, m = run.cfg.train, run.cfg.ppo, run.cfg.grpo, run.models
    n = tc.batch_size * g.group_size
    jitted = jax.jit(functools.partial(update, m, run.cfg, run.optimizer), donate_argnums=0)
    widths: set[tuple] = set()  # the update's compiled shapes (one compile each)
    shards = n // run.rt.rows_sharding.shard_shape((n,))[0]  # the packed rows split as evenly as the batch

    def step_fn(state: PPOState, step: int) -> tuple[PPOState, dict]:
        picked = [run.prompts[0][int(i)] for i in order.batch(step, tc.batch_size)["index"][:, 0]]
        prompts = [prompt for prompt in picked for _ in range(g.group_size)]
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        tokens, mask, gen = rollout(run, state.params["policy"], prompts, key, p.temperature, g.group_size)
        full, full_mask, lengths, ended = sequences(run, tokens, mask, gen)
        rewards = scores(run, state, prompts, tokens, mask, gen) - p.missing_eos_penalty * (1.0 - ended)
        advantages, informative = group_advantages(
            jnp.asarray(rewards.reshape(-1, g.group_size)), g.advantage, g.scale_rewards
        )
        keep = np.repeat(np.asarray(informative), g.group_size) if g.dynamic_sampling else np.ones(n, bool)
        resp_mask = full_mask[:, m.query_width :] * keep[:, None]
        host = {
            "tokens": full,
            "segments": full_mask.astype(np.int32),
            "resp_mask": resp_mask.astype(np.float32),
            "advantages": np.asarray(advantages, np.float32).reshape(-1, 1),
        }
        packed = pack_groups(host, m.query_width, g.group_size, math.lcm(2, shards))
        widths.add(packed["tokens"].shape)
        rows = {k: packed.pop(k) for k in PACKED}
        state, stats = jitted(state, {**run.rt.place(packed, n), **run.rt.place(rows, len(rows["tokens"]))})
        stats = {k: float(v) for k, v in host_value(stats).items()}
        if not all(np.isfinite(v) for v in stats.values()):
            raise NonFiniteLoss(f"GRPO step {step + 1}: non-finite {stats}; stopping before this update is saved")
        figures = {
            **stats,
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "response_length": float(np.mean(lengths)),
            "informative_groups": float(np.mean(np.asarray(informative))),
            "update_compiles": float(len(widths)),
        }
        if run.labeler is not None:
            texts = rlhf.responses(run, gen)
            figures["accuracy"] = float(np.mean([run.labeler(pr.text, a) == 1.0 for pr, a in zip(prompts, texts)]))
        return state, figures

    return step_fn


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """GRPO or RLOO to `train.max_steps` (resuming if possible); returns the final figures."""
    grpo = setup(cfg, workdir)
    cfg, tc, g = grpo.cfg, grpo.cfg.train, grpo.cfg.grpo
    order = PackedRows({"index": np.arange(len(grpo.prompts[0]))[:, None]}, tc.seed)
    first: dict[str, float] = {}
    spec = RunSpec(
        describe=f"{g.advantage.upper()} (group {g.group_size}, beta {g.beta:g}, {g.normalization} normalisation), "
        f"{len(grpo.prompts[0])} prompts, reward {rlhf.describe_reward(cfg.ppo)}, mesh {dict(grpo.rt.mesh.shape)}",
        model_cfg=cfg.model,
        abstract_state=lambda: abstract_state(grpo),
        init_state=lambda shardings: initial_state(grpo, shardings),
        make_step=lambda shardings, start, message: make_step(grpo, order, shardings),
        row=lambda metrics: metrics,
        evaluate=lambda state: evaluate(grpo, state),
        position=lambda step: order.position(step, tc.batch_size),
        origin=f"from {tc.init_from}",
        begin=functools.partial(rlhf.begin, grpo, first),
        report=lambda state, logger: {"kl_target": cfg.ppo.kl_target, **rlhf.start_figures(first)},
        notes=grpo.notes,
    )
    return fit(cfg, grpo.rt, spec)
