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
from flaxgpt.rewards import padded_width, reward_function
from flaxgpt.rlhf import PPO, Models, PPOState, evaluate, load_prompts, rollout, scores, sequences
from flaxgpt.runs import inherit_model, params_from_run, read_run
from flaxgpt.sharding import host_value
from flaxgpt.trainers.scaffold import NonFiniteLoss, RunSpec, Runtime, fit


def setup(cfg: Config, workdir: str) -> PPO:
    reward_fn = reward_function(cfg)  # a bad ppo.reward_function fails before the workdir is made
    rt = Runtime.create(cfg, workdir)
    tc, p = cfg.train, cfg.ppo
    _, tokenizer = read_run(tc.init_from)
    if jax.process_index() == 0:
        tokenizer.save(workdir)
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


def update(
    m: Models, cfg: Config, optimizer, state: PPOState, batch: dict, split: tuple[int, int] | None = None
) -> tuple[PPOState, dict]:
    """grpo.epochs full-batch updates of the clipped objective; the ratio is to the rollout policy.

    The batch may be cut to fewer columns than block_size (`used_columns`): its prompt width is
    tokens' less resp_mask's; `split` (`answer_split`) runs the tail of the answers for the
    longest rows only (`rlhf.grouped_response_logprobs`). The rollout policy is the state's, so
    the first epoch's own forward gives the old log-probabilities (no separate pass), and beta = 0
    needs no reference pass (nor reports a kl figure)."""
    g, temperature = cfg.grpo, cfg.ppo.temperature
    start = batch["tokens"].shape[1] - batch["resp_mask"].shape[1]
    inputs = (batch["tokens"], batch["segments"], start, g.group_size, temperature, split)
    logprobs = lambda params: rlhf.grouped_response_logprobs(m.policy, params, *inputs)
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


def used_columns(host: dict, query_width: int, buckets: tuple[int, int] = (32, 16)) -> dict:
    """The batch cut to the columns some row uses, the prompt and answer widths rounded up to
    multiples of `buckets` (so few widths compile): left padding before the longest prompt and
    right padding after the longest answer cost the update as much as real tokens."""
    used = host["segments"].any(axis=0)
    prompt = query_width - int(np.argmax(used))
    answer = len(used) - query_width - int(np.argmax(used[::-1]))
    lo = query_width - padded_width(prompt, query_width, buckets[0])
    hi = query_width + padded_width(max(answer, 1), len(used) - query_width, buckets[1])
    cut = {k: host[k][:, lo:hi] for k in ("tokens", "segments")}
    return {**cut, "resp_mask": host["resp_mask"][:, : hi - query_width], "advantages": host["advantages"]}


def answer_split(lengths: np.ndarray, width: int, first: int = 8, rows: int = 16) -> tuple[int, int] | None:
    """(S, K) for `update`: every answer's first `first` tokens, the rest for the rows longer
    than first + 1 only, their count rounded up to a multiple of `rows` (few compiles); None
    when that would be every row."""
    longer = int(np.sum(lengths > first + 1))
    k = -(-longer // rows) * rows
    return None if width <= first + 1 or k >= len(lengths) else (first, k)


def make_step(run: PPO, order: PackedRows, shardings: Any):
    tc, p, g, m = run.cfg.train, run.cfg.ppo, run.cfg.grpo, run.models
    n = tc.batch_size * g.group_size
    jitted = jax.jit(functools.partial(update, m, run.cfg, run.optimizer), donate_argnums=0, static_argnames=("split",))
    widths: set[tuple] = set()  # the update's compiled shapes (one compile each)

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
        host = used_columns(host, m.query_width)
        split = answer_split(lengths, host["resp_mask"].shape[1])
        widths.add((host["tokens"].shape[1], host["resp_mask"].shape[1], split))
        state, stats = jitted(state, run.rt.place(host, n), split=split)
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
        f"{len(grpo.prompts[0])} prompts, mesh {dict(grpo.rt.mesh.shape)}",
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
