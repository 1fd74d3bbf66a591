"""PPO (InstructGPT step 3): improve the SFT policy against a reward, held near the SFT model.

Four models: the policy (from the SFT run, trained), the value model (from the reward model,
trained; or a value head on the policy), and two frozen ones: the reference (the SFT model)
and the reward model (or a Python reward function). Each step samples responses to
train.batch_size prompts, scores them and updates policy and value (`flaxgpt.rlhf`). The
whole PPO state (parameters, optimizer state, frozen models, beta, RNG, round) is one
checkpointed pytree, run by the scaffold like every other trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import host_allocator, lora, rlhf
from flaxgpt.config import Config
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.text import build_text_data
from flaxgpt.data.world import WorldTask
from flaxgpt.lora import LORA_SETTINGS
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer
from flaxgpt.rewards import centered, rankings_of, reference_items, retrain, reward_function, score, world_rankings
from flaxgpt.rlhf import PPO, Models, PPOState, evaluate, function_scores, load_prompts, ptx_batch, rollout, sequences
from flaxgpt.runs import inherit_model, params_from_run, read_run
from flaxgpt.sharding import host_value, sharded_abstract
from flaxgpt.trainers.scaffold import NonFiniteLoss, RunSpec, Runtime, fit


def setup(cfg: Config, workdir: str) -> PPO:
    reward_fn = reward_function(cfg)  # a bad ppo.reward_function fails before the workdir is made
    rt = Runtime.create(cfg, workdir)
    tc, p = cfg.train, cfg.ppo
    sft_cfg, tokenizer = read_run(tc.init_from)
    rt.tokenizer = tokenizer  # saved once the checkpoint agreed
    policy_cfg = inherit_model(dataclasses.replace(cfg.model, output="logits"), sft_cfg.model, tc.init_from)
    cfg = dataclasses.replace(cfg, model=policy_cfg)
    reward_cfg = rlhf.reward_model_config(cfg, tokenizer.vocab_size)
    # a separate value model starts from the reward model (else from the SFT run); a value head
    # lives on the policy's trunk. With LoRA it carries the policy's adapters (its head trains too)
    from_rm = reward_cfg is not None and p.value_model == "separate"
    value_cfg = dataclasses.replace(
        reward_cfg if from_rm else policy_cfg,
        output="scalar",
        dropout=0.0,
        **{k: getattr(policy_cfg, k) for k in LORA_SETTINGS},
    )
    query_width = rlhf.query_width(p, policy_cfg.block_size)
    models = Models(
        Transformer(policy_cfg),
        Transformer(value_cfg),
        Transformer(reward_cfg) if reward_cfg else None,
        p.value_model == "head",
        query_width,
    )
    updates = tc.max_steps * p.epochs * p.minibatches
    optimizer = build_optimizer(cfg.optimizer, updates, lora.trainable_mask if policy_cfg.lora_rank else None)
    sources = {"policy": tc.init_from, "value": p.reward_from if from_rm else tc.init_from, "reward": p.reward_from}
    labeler = WorldTask.from_config(cfg).label if cfg.data.source == "world" else None
    ptx = build_text_data(cfg, workdir)[1] if p.ptx_coef > 0 else None
    run = PPO(cfg, rt, tokenizer, models, sources, optimizer, reward_fn, labeler, ptx, [])
    run.prompts = load_prompts(cfg, run.notes.append)
    return run


def abstract_state(run: PPO) -> tuple[Any, Any]:
    return rlhf.abstract_state(run, *rlhf.boxed_params(run.models))


def initial_state(run: PPO, shardings: Any) -> PPOState:
    """Policy and reference from the SFT run, value from the RM (or SFT), reward from the RM."""
    rt, tc, m, src = run.rt, run.cfg.train, run.models, run.sources
    load = lambda source, step, model, sh: params_from_run(source, step, model.cfg, rt.mesh, rt.rules, tc.seed)(sh)
    policy = load(src["policy"], tc.init_step, m.policy, shardings.params["policy"])
    if m.head_only_value:
        value_tree = jax.eval_shape(lambda: m.value.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        full = sharded_abstract(value_tree["params"], rt.mesh, rt.rules)[1]
        value = {"score": load(src["value"], tc.init_step, m.value, full)["score"]}
    else:
        value = load(src["value"], None, m.value, shardings.params["value"])
    frozen = {}
    if "reference" in shardings.frozen:  # with LoRA the reference is the policy with adapters off
        frozen["reference"] = load(src["policy"], tc.init_step, m.policy, shardings.frozen["reference"])
    if m.reward is not None:
        frozen["reward"] = load(src["reward"], None, m.reward, shardings.frozen["reward"])

    return rlhf.initial_state(run, {"policy": policy, "value": value}, frozen, run.cfg.ppo.kl_coef, shardings)


def make_step(run: PPO, order: PackedRows, shardings: Any, start: int, message: Callable[[str], None]):
    """The host step: (new round,) rollout, score, update; stops on anything non-finite."""
    tc, p, m = run.cfg.train, run.cfg.ppo, run.models
    score_rollout = jax.jit(functools.partial(rlhf.score_rollout, m, p))
    rows = run.rt.rows_sharding
    update = jax.jit(
        functools.partial(rlhf.update, m, p, run.optimizer),
        in_shardings=(shardings, rows, None, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    per_round = tc.max_steps // p.rounds

    def step_fn(state: PPOState, step: int) -> tuple[PPOState, dict]:
        if p.rounds > 1 and step > 0 and step % per_round == 0 and int(host_value(state.round)) < step // per_round:
            state = new_round(run, state, step // per_round, message)
        prompts = [run.prompts[0][int(i)] for i in order.batch(step, tc.batch_size)["index"][:, 0]]
        clock = time.time()
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        tokens, mask, gen = rollout(run, state.params["policy"], prompts, key, p.temperature)
        full, full_mask, lengths, ended = sequences(run, tokens, mask, gen)
        fn = function_scores(run, prompts, gen) if run.reward_fn else np.zeros(len(prompts), np.float32)
        host = {"tokens": full, "mask": full_mask, "lengths": lengths[:, None], "ended": ended[:, None]}
        batch, roll = score_rollout(state, **run.rt.place({**host, "scores": fn[:, None]}, tc.batch_size))
        roll = host_value(roll)
        rollout_time, clock = time.time() - clock, time.time()
        ptx = ptx_batch(run, step) if run.ptx is not None else None
        if step == start and (advice := host_allocator.host_allocator_advice(update, state, batch, ptx, roll["kl"])):
            message(advice)
        state, stats = update(state, batch, ptx, roll["kl"])
        stats = host_value(stats)
        if not bool(stats.pop("finite")) or not all(np.isfinite(v) for v in roll.values()):
            bad = {k: float(v) for k, v in {**roll, **stats}.items() if not np.isfinite(v)}
            raise NonFiniteLoss(f"PPO step {step + 1}: non-finite {bad}; stopping before this update is saved")
        return state, {
            **{k: float(v) for k, v in {**roll, **stats}.items()},
            "kl_coef": float(host_value(state.kl_coef)),
            "rollout_seconds": rollout_time,
            "update_seconds": time.time() - clock,
            "round": int(host_value(state.round)),
        }

    return step_fn


def new_round(run: PPO, state: PPOState, index: int, message: Callable[[str], None]) -> PPOState:
    """Iterated RLHF: comparisons from the current policy, ranked by the labeler, retrain the RM."""
    cfg, m, seed = run.cfg, run.models, run.cfg.train.seed + index
    d, block = cfg.data, m.reward.cfg.block_size
    records = world_rankings(
        WorldTask.from_config(cfg),
        run.tokenizer,
        m.policy,
        state.params["policy"],
        n=d.world_rankings,
        k=d.world_ranking_k,
        max_new=cfg.sft.max_new_tokens,
        temperature=d.world_ranking_temperature,
        write_correct=d.world_ranking_write_correct,
        seed=seed,
        log=message,
    )
    rankings = rankings_of(records, run.tokenizer, block, f"round {index} comparisons", "skip", message)
    params, accuracy = retrain(cfg, run.rt, m.reward, state.frozen["reward"], run.tokenizer, rankings, seed)
    offset = float(np.mean(score(m.reward, params, run.tokenizer, reference_items(cfg, rankings), 16)))
    message(
        f"round {index}: {len(rankings)} new comparisons from the current policy; reward model retrained "
        f"{len(accuracy)} steps (train pairwise accuracy {np.mean(accuracy[-10:]):.3f}), offset {offset:+.3f}"
    )
    return state.replace(frozen={**state.frozen, "reward": centered(params, offset)}, round=state.round + 1)


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """PPO to `train.max_steps` (resuming if possible); returns the final figures."""
    ppo = setup(cfg, workdir)
    cfg, tc, p = ppo.cfg, ppo.cfg.train, ppo.cfg.ppo
    order = PackedRows({"index": np.arange(len(ppo.prompts[0]))[:, None]}, tc.seed)
    first: dict[str, float] = {}
    spec = RunSpec(
        describe=f"policy + value {lora.describe_size(abstract_state(ppo)[0].params, cfg.model.lora_rank)}, "
        f"reward {rlhf.describe_reward(p)}, {len(ppo.prompts[0])} prompts, mesh {dict(ppo.rt.mesh.shape)}",
        model_cfg=cfg.model,
        abstract_state=lambda: abstract_state(ppo),
        init_state=lambda shardings: initial_state(ppo, shardings),
        make_step=lambda shardings, start, message: make_step(ppo, order, shardings, start, message),
        row=lambda metrics: metrics,
        evaluate=lambda state: evaluate(ppo, state),
        position=lambda step: order.position(step, tc.batch_size),
        origin=f"from {tc.init_from}",
        begin=functools.partial(rlhf.begin, ppo, first),
        report=lambda state, logger: {"kl_target": p.kl_target, **rlhf.start_figures(first)},
        notes=ppo.notes,
        figures=("reward_total", "kl", "response_length", "val_eval_reward", "val_task_accuracy"),
        next_commands=("python -m flaxgpt.chat --workdir {workdir}", "python -m flaxgpt.serve --workdir {workdir}"),
    )
    return fit(cfg, ppo.rt, spec)
