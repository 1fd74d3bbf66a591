"""PPO (InstructGPT step 3): improve the SFT policy against a reward, held near the SFT model.

Four models: the policy (from the SFT run, trained), the value model (from the reward model,
trained; or a value head on the policy), and two frozen ones: the reference (the SFT
model) and the reward model (or a Python reward function). One PPO step:

  rollout   the generation engine samples a response to each of train.batch_size prompts at
            ppo.temperature (queries left-padded, positions from the attention mask)
  score     one jitted pass computes, on prompt + response: the policy's and the reference's
            log-probabilities from the same temperature-scaled logits the rollout sampled
            from, the values, and the reward model's score at the last real token (minus
            ppo.missing_eos_penalty when the response never ended). Per-token reward:
            -beta * (log pi - log pi_ref), plus the score on the last token; GAE (gamma, lambda)
            gives advantages (whitened) and returns
  update    ppo.epochs passes over shuffled minibatches: clipped surrogate, clipped value
            loss, optional entropy bonus and PPO-ptx pretraining loss; one optimizer over
            policy and value parameters
  control   beta follows the adaptive controller of Ziegler et al. towards ppo.kl_target

Dropout is off throughout (train=False). Everything runs jitted on the run's mesh with the
parameters sharded by the same logical rules as every other stage. The whole PPO state
(parameters, optimizer state, frozen models, beta, RNG, round) is one checkpointed pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import random
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt import generate, lora, perf
from flaxgpt.chat_template import render, stop_tokens
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, ConfigError, to_dict
from flaxgpt.data import world as world_lib
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.text import build_text_data
from flaxgpt.inference import inherit_model, params_from_run, read_run
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.lora import LORA_SETTINGS
from flaxgpt.losses import (
    adaptive_kl_coef,
    generalized_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_cross_entropy,
)
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import host_value, logical_shardings, unbox_shapes
from flaxgpt.state import create_train_state
from flaxgpt.trainers import reward as reward_lib
from flaxgpt.trainers.lm import make_train_step
from flaxgpt.trainers.loop import NonFiniteLoss, Runtime

Array = jax.Array


@flax.struct.dataclass
class PPOState:
    step: Array  # PPO steps done
    params: Any  # {"policy": ..., "value": ...}: what the optimizer trains
    opt_state: Any
    frozen: Any  # {"reference": ..., "reward": ... (absent with a reward function)}
    kl_coef: Array  # beta
    rng: Array
    round: Array  # iterated RLHF: reward-model retrainings done


@dataclasses.dataclass
class Models:
    policy: Transformer  # logits
    value: Transformer  # scalar
    reward: Transformer | None  # scalar; None with a reward function
    head_only_value: bool  # value params are just a head on the policy's trunk


# ----------------------------------------------------------------------------- pure pieces


def response_logprobs(
    model: Transformer, params: Any, tokens: Array, positions: Array, segments: Array, start: int, temperature: float
) -> tuple[Array, Array]:
    """(log-probabilities of tokens[:, start:], entropies) under softmax(logits / temperature).

    The logits at position i predict token i + 1, so response token t is scored by the logits
    at start + t - 1: the same distribution the rollout sampled it from.
    """
    logits = model.apply({"params": params}, tokens, positions, segments)[:, start - 1 : -1] / temperature
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, start:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return picked, entropy


def value_params(params: dict, head_only: bool) -> Any:
    """The value model's parameters: its own, or the policy's trunk with the value head."""
    return {**params["policy"], **params["value"]} if head_only else params["value"]


def token_rewards(
    scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, lengths: Array, kl_coef: Array
) -> tuple[Array, Array]:
    """Per-token rewards [B, R]: -beta * KL estimate on every response token, plus the score on the
    last one. Returns (rewards, per-token KL)."""
    kl = (logprobs - ref_logprobs) * mask
    last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), mask.shape[1]) * (lengths > 0)[:, None]
    return -kl_coef * kl + scores[:, None] * last, kl


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    residual = masked_mean(jnp.square(returns - values - masked_mean(returns - values, mask)), mask)
    spread = masked_mean(jnp.square(returns - masked_mean(returns, mask)), mask)
    return 1.0 - residual / jnp.maximum(spread, 1e-8)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Prompt:
    messages: list[dict]  # system (optional) + user
    text: str  # the user turn, as a reward function sees it


def load_prompts(cfg: Config) -> tuple[list[Prompt], list[Prompt]]:
    """(training pool, held-out) prompts: world questions, or a JSONL prompts file."""
    data, p = cfg.data, cfg.ppo
    system = lambda s: [{"role": "system", "content": s}] if s else []
    if not p.prompts_path:
        world = world_lib.make_world(data.world_seed)
        pool = lambda seed, n: [
            world_lib.random_question(world, rng)[0] for rng in [random.Random(seed)] for _ in range(n)
        ]
        make = lambda q: Prompt(system(data.world_system) + [{"role": "user", "content": q}], q)
        return (
            [make(q) for q in pool(data.world_seed * 1000 + 5, p.world_prompts)],
            [make(q) for q in pool(data.world_seed * 1000 + 6, p.eval_prompts)],
        )
    records, report = read_jsonl(p.prompts_path, "prompts", data.on_error)
    print(report.summary(), flush=True)
    prompts = [
        Prompt(system(r.get("system", "")) + [{"role": "user", "content": r["prompt"]}], r["prompt"]) for r in records
    ]
    held_out = min(p.eval_prompts, max(1, int(len(prompts) * (1 - data.train_fraction))))
    if len(prompts) <= held_out:
        raise DataError(f"{p.prompts_path}: {len(prompts)} prompt(s) cannot be split into training and held-out ones")
    return prompts[: len(prompts) - held_out], prompts[len(prompts) - held_out :]


def world_labeler(cfg: Config) -> Callable[[str, str], float]:
    """The embedded world's labeler as a (question, answer) -> score function."""
    world = world_lib.make_world(cfg.data.world_seed)
    return lambda prompt, response: world_lib.label(world, prompt, response)


def reward_function(cfg: Config) -> Callable[[str, str], float] | None:
    """The configured Python reward (prompt text, response text) -> score, if any."""
    name = cfg.ppo.reward_function
    if not name:
        return None
    if name == "world":
        return world_labeler(cfg)
    module, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(f"ppo.reward_function={name!r}: expected 'world' or 'module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"ppo.reward_function={name!r}: cannot load it ({e})") from e


# ----------------------------------------------------------------------------- the trainer


class PPOTrainer:
    """Builds the models, the sharded state and the jitted steps; `run` drives them."""

    def __init__(self, cfg: Config, workdir: str):
        self.rt = Runtime.create(cfg, workdir)
        tc, p = cfg.train, cfg.ppo
        sft_cfg, self.tokenizer = read_run(tc.init_from)
        if jax.process_index() == 0:
            self.tokenizer.save(workdir)
        policy_cfg = inherit_model(dataclasses.replace(cfg.model, output="logits"), sft_cfg.model, tc.init_from)
        cfg = dataclasses.replace(cfg, model=policy_cfg)
        self.cfg = cfg
        reward_cfg = None
        if p.reward_from:
            rm_cfg, rm_tokenizer = read_run(p.reward_from)
            if rm_tokenizer.vocab_size != self.tokenizer.vocab_size or rm_cfg.model.output != "scalar":
                raise ConfigError(
                    f"ppo.reward_from={p.reward_from} is not a reward model for this policy "
                    f"(output '{rm_cfg.model.output}', vocabulary {rm_tokenizer.vocab_size} vs "
                    f"{self.tokenizer.vocab_size})"
                )
            reward_cfg = rm_cfg.model
        # a separate value model starts from the reward model (else from the SFT run); a value
        # head lives on the policy's trunk
        from_rm = reward_cfg is not None and p.value_model == "separate"
        value_source = p.reward_from if from_rm else tc.init_from
        # with LoRA, the value model carries the policy's adapters (its score head trains too)
        value_cfg = dataclasses.replace(
            reward_cfg if from_rm else policy_cfg,
            output="scalar",
            dropout=0.0,
            **{k: getattr(policy_cfg, k) for k in LORA_SETTINGS},
        )
        self.models = Models(
            Transformer(policy_cfg),
            Transformer(value_cfg),
            Transformer(reward_cfg) if reward_cfg else None,
            p.value_model == "head",
        )
        self.reward_fn = reward_function(cfg)
        self.labeler = world_labeler(cfg) if cfg.data.source == "world" else None
        self.sources = {"policy": tc.init_from, "value": value_source, "reward": p.reward_from}
        self.updates = tc.max_steps * p.epochs * p.minibatches
        self.adapters_only = bool(policy_cfg.lora_rank)
        self.optimizer = build_optimizer(
            cfg.optimizer, self.updates, lora.trainable_mask if self.adapters_only else None
        )
        self.stops = stop_tokens(self.tokenizer)
        self.query_width = policy_cfg.block_size - p.max_new_tokens
        if self.query_width < 2:
            raise ConfigError(
                f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for a prompt in "
                f"block_size {policy_cfg.block_size}"
            )
        self.ptx = build_text_data(cfg, workdir)[1] if p.ptx_coef > 0 else None

    # -- state ---------------------------------------------------------------

    def _boxed_params(self) -> tuple[dict, dict]:
        """Abstract (boxed) trainable and frozen parameter trees, for shardings."""
        m = self.models
        shape = lambda model: jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.cfg.block_size), jnp.int32))["params"]
        )
        value = shape(m.value)
        trainable = {"policy": shape(m.policy), "value": {"score": value["score"]} if m.head_only_value else value}
        frozen = {"reference": shape(m.policy)}
        if m.reward is not None:
            frozen["reward"] = shape(m.reward)
        return trainable, frozen

    def abstract_state(self) -> tuple[Any, Any]:
        trainable, frozen = self._boxed_params()
        unboxed = unbox_shapes(trainable)
        abstract = PPOState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=unboxed,
            opt_state=jax.eval_shape(self.optimizer.init, unboxed),
            frozen=unbox_shapes(frozen),
            kl_coef=jax.ShapeDtypeStruct((), jnp.float32),
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
            round=jax.ShapeDtypeStruct((), jnp.int32),
        )
        boxed = abstract.replace(
            params=trainable, frozen=frozen, opt_state=jax.eval_shape(self.optimizer.init, trainable)
        )
        shardings = unbox_shapes(logical_shardings(boxed, self.rt.mesh, self.rt.rules))
        structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return structs, shardings

    def initial_state(self, shardings: Any) -> PPOState:
        """Policy and reference from the SFT run, value from the RM (or SFT), reward from the RM."""
        rt, tc, m = self.rt, self.cfg.train, self.models
        load = lambda source, step, model, sh: params_from_run(source, step, model.cfg, rt.mesh, rt.rules, tc.seed)(sh)
        policy = load(self.sources["policy"], tc.init_step, m.policy, shardings.params["policy"])
        if m.head_only_value:
            value_tree = jax.eval_shape(lambda: m.value.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
            full = unbox_shapes(logical_shardings(value_tree["params"], rt.mesh, rt.rules))
            value = {"score": load(self.sources["value"], tc.init_step, m.value, full)["score"]}
        else:
            value = load(self.sources["value"], None, m.value, shardings.params["value"])
        frozen = {"reference": load(self.sources["policy"], tc.init_step, m.policy, shardings.frozen["reference"])}
        if m.reward is not None:
            frozen["reward"] = load(self.sources["reward"], None, m.reward, shardings.frozen["reward"])

        def build(params, frozen):
            return PPOState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=self.optimizer.init(params),
                frozen=frozen,
                kl_coef=jnp.asarray(self.cfg.ppo.kl_coef, jnp.float32),
                rng=jax.random.PRNGKey(tc.seed),
                round=jnp.zeros((), jnp.int32),
            )

        with rt.context():
            return jax.jit(build, out_shardings=shardings)({"policy": policy, "value": value}, frozen)

    # -- jitted steps --------------------------------------------------------

    def make_steps(self, shardings: Any) -> None:
        p, m = self.cfg.ppo, self.models
        q = self.query_width

        def score_rollout(state: PPOState, tokens, mask, lengths, ended, scores):
            """Log-probs, values, rewards, advantages of a finished rollout (all [B, R]); `scores`
            ([B, 1]) are the reward function's, unused with a reward model."""
            lengths, ended, fn_scores = lengths[:, 0], ended[:, 0], scores[:, 0]
            segments = mask.astype(jnp.int32)
            positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
            resp_mask = mask[:, q:].astype(jnp.float32)
            logp, _ = response_logprobs(m.policy, state.params["policy"], tokens, positions, segments, q, p.temperature)
            ref_logp, _ = response_logprobs(
                m.policy, state.frozen["reference"], tokens, positions, segments, q, p.temperature
            )
            values = (
                m.value.apply({"params": value_params(state.params, m.head_only_value)}, tokens, positions, segments)[
                    :, q - 1 : -1
                ]
                * resp_mask
            )
            if m.reward is not None:
                last = q + jnp.maximum(lengths, 1) - 1
                scores = reward_lib.rewards_at_last(m.reward, state.frozen["reward"], tokens, positions, segments, last)
            else:
                scores = fn_scores
            scores = scores - p.missing_eos_penalty * (1.0 - ended)
            rewards, kl = token_rewards(scores, logp, ref_logp, resp_mask, lengths, state.kl_coef)
            if p.whiten_rewards:
                rewards = masked_whiten(rewards, resp_mask, shift_mean=False)
            advantages, returns = generalized_advantages(rewards, values, resp_mask, p.gamma, p.lam)
            advantages = masked_whiten(advantages, resp_mask)
            batch = dict(
                tokens=tokens,
                positions=positions,
                segments=segments,
                resp_mask=resp_mask,
                logprobs=logp,
                values=values,
                advantages=advantages,
                returns=returns,
            )
            stats = {
                "score_mean": jnp.mean(scores),
                "score_std": jnp.std(scores),
                "kl": jnp.mean(jnp.sum(kl, axis=1)),
                "response_length": jnp.mean(lengths.astype(jnp.float32)),
                "ended_fraction": jnp.mean(ended),
                "reward_total": jnp.mean(jnp.sum(rewards, axis=1)),
            }
            return batch, stats

        def loss_fn(params, mb, ptx):
            logp, entropy = response_logprobs(
                m.policy, params["policy"], mb["tokens"], mb["positions"], mb["segments"], q, p.temperature
            )
            values = m.value.apply(
                {"params": value_params(params, m.head_only_value)}, mb["tokens"], mb["positions"], mb["segments"]
            )[:, q - 1 : -1]
            mask = mb["resp_mask"]
            pol = ppo_policy_loss(logp, mb["logprobs"], mb["advantages"], mask, p.clip)
            val = ppo_value_loss(values, mb["values"], mb["returns"], mask, p.value_clip)
            ent = masked_mean(entropy, mask)
            total = pol["policy_loss"] + p.value_coef * val["value_loss"] - p.entropy_coef * ent
            stats = {
                **pol,
                **val,
                "entropy": ent,
                "explained_variance": explained_variance(mb["values"], mb["returns"], mask),
            }
            if ptx is not None:
                logits = m.policy.apply(
                    {"params": params["policy"]}, ptx["inputs"], ptx["positions"], ptx["segment_ids"]
                )
                sums = token_cross_entropy(logits, ptx["targets"], ptx["loss_weights"])
                stats["ptx_loss"] = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
                total = total + p.ptx_coef * stats["ptx_loss"]
            stats["loss"] = total
            return total, stats

        def update(state: PPOState, batch: dict, ptx: dict | None, rollout_kl: Array):
            n = batch["tokens"].shape[0]
            size = n // p.minibatches
            key = jax.random.fold_in(state.rng, state.step)

            def minibatch(carry, inputs):
                params, opt_state = carry
                index, ptx_index = inputs
                mb = jax.tree.map(lambda x: x[index], batch)
                ptx_mb = None if ptx is None else jax.tree.map(lambda x: x[ptx_index], ptx)
                trained = (lambda q, *a: loss_fn(lora.freeze_base(q), *a)) if self.adapters_only else loss_fn
                grads, stats = jax.grad(trained, has_aux=True)(params, mb, ptx_mb)
                stats["grad_norm"] = optax.tree.norm(grads)
                updates, opt_state = self.optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), stats

            orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, p.epochs))
            indices = orders.reshape(p.epochs * p.minibatches, size)
            ptx_indices = jnp.tile(jnp.arange(p.minibatches), p.epochs)
            (params, opt_state), stats = jax.lax.scan(
                minibatch, (state.params, state.opt_state), (indices, ptx_indices)
            )
            stats = jax.tree.map(jnp.mean, stats)
            finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(stats)]))
            kl_coef = (
                adaptive_kl_coef(state.kl_coef, rollout_kl, p.kl_target, p.kl_horizon, n)
                if p.adaptive_kl
                else state.kl_coef
            )
            new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl_coef)
            return new, {**stats, "finite": finite}

        rows = self.rt.rows_sharding
        self.score_rollout = jax.jit(score_rollout)
        self.update = jax.jit(
            update, in_shardings=(shardings, rows, None, None), out_shardings=(shardings, None), donate_argnums=0
        )

    # -- host loop -----------------------------------------------------------

    def rollout(
        self, state: PPOState, prompts: list[Prompt], key: Array, temperature: float, params: Any = None
    ) -> tuple[np.ndarray, np.ndarray, generate.Generation]:
        """(query tokens, query mask, generation) for `prompts`, sampled from the policy."""
        ids = [render(pr.messages, self.tokenizer, self.query_width).ids for pr in prompts]
        tokens, mask = generate.left_pad(ids, self.tokenizer.pad_id, self.query_width)
        decode = generate.DecodeConfig(max_new_tokens=self.cfg.ppo.max_new_tokens, temperature=temperature)
        params = state.params["policy"] if params is None else params
        gen = generate.generate(
            self.models.policy,
            params,
            ids,
            decode,
            key,
            pad_id=self.tokenizer.pad_id,
            stop_tokens=self.stops,
            prompt_width=self.query_width,
        )
        return tokens, mask, gen

    def responses(self, gen: generate.Generation) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in generate.completions(gen, self.stops)]

    def evaluate(self, state: PPOState) -> dict[str, float]:
        """Held-out prompts: labeler accuracy (sampled at the rollout temperature and greedy) and reward."""
        figures: dict[str, float] = {}
        if not self.eval_prompts:  # ppo.eval_prompts=0: no evaluation
            return figures
        for name, temperature in (("", self.cfg.ppo.temperature), ("_greedy", 0.0)):
            answers, scores = [], []
            for start in range(0, len(self.eval_prompts), self.cfg.train.batch_size):
                chunk = self.eval_prompts[start : start + self.cfg.train.batch_size]
                chunk = chunk + [chunk[0]] * (self.cfg.train.batch_size - len(chunk))
                tokens, mask, gen = self.rollout(state, chunk, jax.random.PRNGKey(1000 + start), temperature)
                real = min(len(self.eval_prompts) - start, len(chunk))
                answers += self.responses(gen)[:real]
                scores += list(self._scores(state, chunk, tokens, mask, gen))[:real]
            figures[f"eval_reward{name}"] = float(np.mean(scores))
            if self.labeler is not None:
                figures[f"task_accuracy{name}"] = float(
                    np.mean([self.labeler(pr.text, a) == 1.0 for pr, a in zip(self.eval_prompts, answers)])
                )
        return figures

    def _scores(self, state: PPOState, prompts: list[Prompt], tokens, mask, gen) -> np.ndarray:
        """The reward of each response (RM or function), before the EOS penalty."""
        if self.reward_fn is not None:
            return np.asarray([float(self.reward_fn(pr.text, r)) for pr, r in zip(prompts, self.responses(gen))])
        full, full_mask, lengths, _ = self._sequences(tokens, mask, gen)
        segments = full_mask.astype(np.int32)
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0)
        last = self.query_width + np.maximum(lengths, 1) - 1
        out = _rewards(
            self.models.reward,
            state.frozen["reward"],
            *generate.on_params_mesh(state.frozen["reward"], full, positions, segments, last),
        )
        return np.asarray(host_value(out))

    def _sequences(self, tokens, mask, gen):
        resp = np.asarray(host_value(gen.tokens))
        lengths = np.asarray(host_value(gen.lengths))
        resp_mask = np.arange(resp.shape[1])[None] < lengths[:, None]
        ended = np.isin(resp[np.arange(len(resp)), np.maximum(lengths - 1, 0)], self.stops) & (lengths > 0)
        return (
            np.concatenate([tokens, resp], 1),
            np.concatenate([mask, resp_mask], 1),
            lengths,
            ended.astype(np.float32),
        )

    def run(self) -> dict[str, Any]:
        cfg, rt, tc, p = self.cfg, self.rt, self.cfg.train, self.cfg.ppo
        rt.write_config(cfg)
        self.train_prompts, self.eval_prompts = load_prompts(cfg)
        abstract, shardings = self.abstract_state()
        checkpointer = Checkpointer(rt.workdir, cfg.checkpoint)
        latest = checkpointer.latest_step()
        state = (
            checkpointer.restore(latest, abstract, cfg.model)[0]
            if latest is not None
            else self.initial_state(shardings)
        )
        start = int(host_value(state.step))
        self.make_steps(shardings)
        logger = MetricsLogger(rt.workdir, cfg.logging, tc.max_steps, start, to_dict(cfg))
        size = lora.describe_size(state.params, cfg.model.lora_rank)
        logger.message(
            f"flaxgpt {cfg.name} (ppo): policy + value {size}, reward "
            f"{'model ' + p.reward_from if p.reward_from else 'function ' + p.reward_function}, "
            f"{len(self.train_prompts)} prompts, mesh {dict(rt.mesh.shape)}, "
            + (f"resumed from step {start}" if latest is not None else f"from {tc.init_from}")
        )
        order = PackedRows({"index": np.arange(len(self.train_prompts))[:, None]}, tc.seed)
        record = lambda step: {"step": step, "model": to_dict(cfg.model), "data": order.position(step, tc.batch_size)}
        steps_per_round = tc.max_steps // p.rounds
        last_row: dict[str, Any] = {}
        first_eval: dict[str, float] = {}
        with rt.context():
            if start == 0 and tc.max_steps > 0:
                first_eval = self.evaluate(state)
                if first_eval:
                    logger.log(0, {f"val_{k}": v for k, v in first_eval.items()})
            else:  # resumed: the starting figures were logged as step 0
                first_eval = {
                    k[4:]: v
                    for row in read_metrics(rt.workdir)
                    if row.get("step") == 0
                    for k, v in row.items()
                    if k.startswith("val_")
                }
            for step in range(start, tc.max_steps):
                if (
                    p.rounds > 1
                    and step > 0
                    and step % steps_per_round == 0
                    and int(host_value(state.round)) < step // steps_per_round
                ):
                    state = self.new_round(state, step // steps_per_round, logger)
                prompts = [self.train_prompts[int(i)] for i in order.batch(step, tc.batch_size)["index"][:, 0]]
                clock = time.time()
                key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
                tokens, mask, gen = self.rollout(state, prompts, key, p.temperature)
                full, full_mask, lengths, ended = self._sequences(tokens, mask, gen)
                fn_scores = (
                    np.asarray(
                        [float(self.reward_fn(pr.text, r)) for pr, r in zip(prompts, self.responses(gen))], np.float32
                    )
                    if self.reward_fn is not None
                    else np.zeros(len(prompts), np.float32)
                )
                placed = rt.place(
                    {
                        "tokens": full,
                        "mask": full_mask,
                        "lengths": lengths[:, None],
                        "ended": ended[:, None],
                        "scores": fn_scores[:, None],
                    },
                    tc.batch_size,
                )
                batch, roll_stats = self.score_rollout(state, **placed)
                roll_stats = host_value(roll_stats)
                rollout_time = time.time() - clock
                clock = time.time()
                ptx = self._ptx_batch(step) if self.ptx is not None else None
                if step == start and (
                    advice := perf.host_allocator_advice(self.update, state, batch, ptx, roll_stats["kl"])
                ):
                    logger.message(advice)
                state, stats = self.update(state, batch, ptx, roll_stats["kl"])
                stats = host_value(stats)
                update_time = time.time() - clock
                if not bool(stats.pop("finite")) or not all(np.isfinite(v) for v in roll_stats.values()):
                    bad = {k: float(v) for k, v in {**roll_stats, **stats}.items() if not np.isfinite(v)}
                    raise NonFiniteLoss(
                        f"PPO step {step + 1}: non-finite {bad}; stopping before this update reaches "
                        "a checkpoint (the last checkpoint is intact)"
                    )
                done = step + 1
                row = {
                    **{k: float(v) for k, v in roll_stats.items()},
                    **{k: float(v) for k, v in stats.items()},
                    "kl_coef": float(host_value(state.kl_coef)),
                    "rollout_seconds": rollout_time,
                    "update_seconds": update_time,
                    "round": int(host_value(state.round)),
                }
                if done % cfg.eval.interval == 0 or done == tc.max_steps:
                    row.update({f"val_{k}": v for k, v in self.evaluate(state).items()})
                if done % tc.log_interval == 0 or "val_eval_reward" in row:
                    logger.log(done, row)
                last_row = row
                checkpointer.save(done, state, record(done), force=done == tc.max_steps)
            if start >= tc.max_steps:
                last_row = {f"val_{k}": v for k, v in self.evaluate(state).items()}
        checkpointer.close()
        logger.close()
        result = {"step": tc.max_steps, **last_row, "kl_target": p.kl_target}
        result.update({f"start_{k}": v for k, v in first_eval.items()})
        return result

    def _ptx_batch(self, step: int) -> dict[str, np.ndarray]:
        p, block = self.cfg.ppo, self.cfg.model.block_size
        rows = np.arange(p.ptx_batch_size * p.minibatches)
        flat = self.ptx.batch("train", step, len(rows), block, rows)
        return {k: v.reshape(p.minibatches, p.ptx_batch_size, *v.shape[1:]) for k, v in flat.items()}

    def new_round(self, state: PPOState, round_index: int, logger: MetricsLogger) -> PPOState:
        """Iterated RLHF: comparisons from the current policy, ranked by the labeler, retrain the RM."""
        cfg, rt = self.cfg, self.rt
        records = reward_lib.world_rankings(
            cfg, rt, self.tokenizer, self.models.policy, state.params["policy"], seed=cfg.train.seed + round_index
        )
        rankings = reward_lib.rankings_of(
            records, self.tokenizer, self.models.reward.cfg.block_size, f"round {round_index} comparisons", "skip"
        )
        k = max(len(r.responses) for r in rankings)
        rows = PackedRows(
            reward_lib.ranking_rows(rankings, self.tokenizer, self.models.reward.cfg.block_size, k),
            cfg.train.seed + round_index,
        )
        rm_train = dataclasses.replace(cfg.train, max_steps=cfg.ppo.round_rm_steps, grad_accum_steps=1)
        optimizer = build_optimizer(
            cfg.optimizer, rm_train.max_steps, lora.trainable_mask if self.models.reward.cfg.lora_rank else None
        )
        example = jnp.zeros((1, self.models.reward.cfg.block_size), jnp.int32)
        rm_state, rm_shardings = create_train_state(
            self.models.reward,
            optimizer,
            example,
            rt.mesh,
            rt.rules,
            cfg.train.seed + round_index,
            params=lambda _: state.frozen["reward"],
        )
        loss = reward_lib.ranking_objective(self.models.reward, cfg.reward.margin)
        step_fn = jax.jit(
            make_train_step(
                self.models.reward, optimizer, learning_rate_schedule(cfg.optimizer, rm_train.max_steps), rm_train, loss
            ),
            donate_argnums=0,
        )
        batch = min(cfg.train.batch_size, rows.n)
        accuracy = []
        for i in range(rm_train.max_steps):
            rm_state, metrics = step_fn(rm_state, rt.place(rows.batch(i, batch, rt.rows(batch)), batch))
            accuracy.append(float(host_value(metrics["accuracy"])))
        items = reward_lib.reference_items(cfg, rankings)
        offset = float(np.mean(reward_lib.score(self.models.reward, rm_state.params, self.tokenizer, items, 16)))
        rm_params = dict(rm_state.params)
        rm_params["score"] = {**rm_params["score"], "bias": rm_params["score"]["bias"] - offset}
        logger.message(
            f"round {round_index}: {len(rankings)} new comparisons from the current policy; reward model "
            f"retrained {rm_train.max_steps} steps (train pairwise accuracy {np.mean(accuracy[-10:]):.3f}), "
            f"offset {offset:+.3f}"
        )
        return state.replace(frozen={**state.frozen, "reward": rm_params}, round=state.round + 1)


@functools.partial(jax.jit, static_argnames="model")
def _rewards(model, params, tokens, positions, segments, last):
    return reward_lib.rewards_at_last(model, params, tokens, positions, segments, last)


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """PPO to `train.max_steps` (resuming if possible); returns the final figures."""
    return PPOTrainer(cfg, workdir).run()
