"""PPO's pure pieces, as module-level functions jitted by the PPO trainer with its models and
settings bound (`functools.partial`): score a finished rollout, the clipped PPO loss, and one
PPO update (ppo.epochs passes of shuffled minibatches in a scan), plus the state they share.

One PPO step: the generation engine samples responses (queries left-padded); `score_rollout`
computes, on prompt + response, the policy's and the reference's log-probabilities from the
same temperature-scaled logits the rollout sampled from, the values, and the reward (the
reward model's score at the last real token, or a reward function's, minus
ppo.missing_eos_penalty when the response never ended). Per-token reward: -beta * (log pi -
log pi_ref), plus the score on the last token; GAE (gamma, lambda) gives advantages (whitened)
and returns. `update` then takes the clipped surrogate, clipped value loss, optional entropy
bonus and PPO-ptx loss with one optimizer over policy and value parameters, and moves beta
with the adaptive controller of Ziegler et al. Dropout is off throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt import generate, lora
from flaxgpt.chat_template import render, stop_tokens
from flaxgpt.config import Config, ConfigError, PPOConfig
from flaxgpt.conversations import chat_prompt, padded_chunks
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.world import WorldTask
from flaxgpt.logging import read_metrics
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
from flaxgpt.rewards import padded_width, rewards_at_last, score_sequences
from flaxgpt.runs import boxed_params as model_params
from flaxgpt.runs import read_run
from flaxgpt.sharding import host_value, sharded_abstract

Array = jax.Array


@flax.struct.dataclass
class PPOState:
    step: Array  # PPO steps done
    params: Any  # {"policy": ..., "value": ...}: what the optimizer trains
    opt_state: Any
    frozen: Any  # {"reference": ... (absent with LoRA), "reward": ... (absent with a reward function)}
    kl_coef: Array  # beta
    rng: Array
    round: Array  # iterated RLHF: reward-model retrainings done


@dataclasses.dataclass(frozen=True)
class Models:
    policy: Transformer  # logits
    value: Transformer  # scalar
    reward: Transformer | None  # scalar; None with a reward function
    head_only_value: bool  # value params are just a head on the policy's trunk
    query_width: int  # prompts are left-padded to this; responses follow


def query_width(p: PPOConfig, block_size: int) -> int:
    """The width prompts are left-padded to: what the context leaves after ppo.max_new_tokens."""
    width = block_size - p.max_new_tokens
    if width < 2:
        raise ConfigError(
            f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for a prompt in block_size {block_size}"
        )
    return width


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


def packed_response_logprobs(model: Transformer, params: Any, packed: dict, temperature: float) -> Array:
    """Log-probabilities [B, R] of each row's response tokens `packed["targets"]`, as
    `response_logprobs` gives them, from one forward over the packed layout of
    `grpo.pack_groups`: each prompt once, its group's answers after it as branches that share
    it (`model.attention_mask`), several groups per row. `packed["source"]` [B, R] is the flat
    index of the packed position whose logits predict each response token (padding: 0)."""
    inputs = (packed["tokens"], packed["positions"], packed["segments"])
    logits = model.apply({"params": params}, *inputs, branches=packed["branches"])
    picked = logits.reshape(-1, logits.shape[-1])[packed["source"]] / temperature
    logp = jax.nn.log_softmax(picked.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, packed["targets"][..., None], axis=-1)[..., 0]


def adapters_off(params: Any) -> Any:
    """The parameters with every LoRA adapter's B set to zero: the base model's function. A LoRA
    policy's reference is its own base this way (the adapters start at zero), not a second copy."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if str(getattr(path[-1], "key", "")) == "lora_b" else x, params
    )


def reference_params(m: Models, state: PPOState) -> Any:
    """The frozen reference's parameters: the policy with adapters off under LoRA, else the stored copy."""
    return adapters_off(state.params["policy"]) if m.policy.cfg.lora_rank else state.frozen["reference"]


def value_params(params: dict, head_only: bool) -> Any:
    """The value model's parameters: its own, or the policy's trunk with the value head."""
    return {**params["policy"], **params["value"]} if head_only else params["value"]


def values_of(m: Models, params: dict, tokens: Array, positions: Array, segments: Array) -> Array:
    """The value model's estimates for the response tokens [B, R]."""
    out = m.value.apply({"params": value_params(params, m.head_only_value)}, tokens, positions, segments)
    return out[:, m.query_width - 1 : -1]


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


def score_rollout(m: Models, p: PPOConfig, state: PPOState, tokens, mask, lengths, ended, scores):
    """(batch for `update`, statistics) of a finished rollout (all [B, R]); `scores` ([B, 1])
    are the reward function's, unused with a reward model."""
    q = m.query_width
    lengths, ended, fn_scores = lengths[:, 0], ended[:, 0], scores[:, 0]
    segments = mask.astype(jnp.int32)
    positions = generate.mask_positions(mask)
    resp_mask = mask[:, q:].astype(jnp.float32)
    logp, _ = response_logprobs(m.policy, state.params["policy"], tokens, positions, segments, q, p.temperature)
    ref_params = jax.lax.stop_gradient(reference_params(m, state))
    ref_logp, _ = response_logprobs(m.policy, ref_params, tokens, positions, segments, q, p.temperature)
    values = values_of(m, state.params, tokens, positions, segments) * resp_mask
    if m.reward is not None:
        last = q + jnp.maximum(lengths, 1) - 1
        scores = rewards_at_last(m.reward, state.frozen["reward"], tokens, positions, segments, last)
    else:
        scores = fn_scores
    scores = scores - p.missing_eos_penalty * (1.0 - ended)
    rewards, kl = token_rewards(scores, logp, ref_logp, resp_mask, lengths, state.kl_coef)
    if p.whiten_rewards:
        rewards = masked_whiten(rewards, resp_mask, shift_mean=False)
    advantages, returns = generalized_advantages(rewards, values, resp_mask, p.gamma, p.lam)
    batch = dict(
        tokens=tokens,
        positions=positions,
        segments=segments,
        resp_mask=resp_mask,
        logprobs=logp,
        values=values,
        advantages=masked_whiten(advantages, resp_mask),
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


def ppo_loss(m: Models, p: PPOConfig, params: dict, mb: dict, ptx: dict | None) -> tuple[Array, dict]:
    """The clipped PPO objective on a minibatch (+ entropy bonus, + PPO-ptx), and its parts."""
    tokens, positions, segments, mask = mb["tokens"], mb["positions"], mb["segments"], mb["resp_mask"]
    logp, entropy = response_logprobs(
        m.policy, params["policy"], tokens, positions, segments, m.query_width, p.temperature
    )
    values = values_of(m, params, tokens, positions, segments)
    pol = ppo_policy_loss(logp, mb["logprobs"], mb["advantages"], mask, p.clip)
    val = ppo_value_loss(values, mb["values"], mb["returns"], mask, p.value_clip)
    ent = masked_mean(entropy, mask)
    total = pol["policy_loss"] + p.value_coef * val["value_loss"] - p.entropy_coef * ent
    stats = {**pol, **val, "entropy": ent, "explained_variance": explained_variance(mb["values"], mb["returns"], mask)}
    if ptx is not None:
        logits = m.policy.apply({"params": params["policy"]}, ptx["inputs"], ptx["positions"], ptx["segment_ids"])
        sums = token_cross_entropy(logits, ptx["targets"], ptx["loss_weights"])
        stats["ptx_loss"] = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
        total = total + p.ptx_coef * stats["ptx_loss"]
    stats["loss"] = total
    return total, stats


def update(
    m: Models, p: PPOConfig, optimizer: optax.GradientTransformation, state: PPOState, batch: dict, ptx, rollout_kl
) -> tuple[PPOState, dict]:
    """ppo.epochs shuffled passes of ppo.minibatches updates, then beta's control step."""
    n = batch["tokens"].shape[0]
    size = n // p.minibatches
    key = jax.random.fold_in(state.rng, state.step)
    adapters_only = bool(m.policy.cfg.lora_rank)

    def minibatch(carry, inputs):
        params, opt_state = carry
        index, ptx_index = inputs
        mb = jax.tree.map(lambda x: x[index], batch)
        ptx_mb = None if ptx is None else jax.tree.map(lambda x: x[ptx_index], ptx)
        loss = lambda q, *a: ppo_loss(m, p, lora.freeze_base(q) if adapters_only else q, *a)
        grads, stats = jax.grad(loss, has_aux=True)(params, mb, ptx_mb)
        stats["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), stats

    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, p.epochs))
    indices = orders.reshape(p.epochs * p.minibatches, size)
    ptx_indices = jnp.tile(jnp.arange(p.minibatches), p.epochs)
    (params, opt_state), stats = jax.lax.scan(minibatch, (state.params, state.opt_state), (indices, ptx_indices))
    stats = jax.tree.map(jnp.mean, stats)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(stats)]))
    kl_coef = (
        adaptive_kl_coef(state.kl_coef, rollout_kl, p.kl_target, p.kl_horizon, n) if p.adaptive_kl else state.kl_coef
    )
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl_coef)
    return new, {**stats, "finite": finite}


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Prompt:
    messages: list[dict]  # system (optional) + user
    text: str  # the user turn, as a reward function sees it


def load_prompts(cfg: Config, log: Callable[[str], None]) -> tuple[list[Prompt], list[Prompt]]:
    """(training pool, held-out) prompts: world questions, or a JSONL prompts file."""
    data, p = cfg.data, cfg.ppo
    if not p.prompts_path:
        task = WorldTask.from_config(cfg)
        pool = lambda stream, n: [Prompt(task.prompt(q), q) for q in task.questions(stream, n)]
        return pool("ppo_train", p.world_prompts), pool("ppo_eval", p.eval_prompts)
    records, report = read_jsonl(p.prompts_path, "prompts", data.on_error)
    log(report.summary())
    prompts = [Prompt(chat_prompt(r["prompt"], r.get("system", "")), r["prompt"]) for r in records]
    held_out = min(p.eval_prompts, max(1, int(len(prompts) * (1 - data.train_fraction))))
    if len(prompts) <= held_out:
        raise DataError(f"{p.prompts_path}: {len(prompts)} prompt(s) cannot be split into training and held-out ones")
    return prompts[: len(prompts) - held_out], prompts[len(prompts) - held_out :]


@dataclasses.dataclass
class PPO:
    """A PPO run's fixed parts: config, models, where they start, prompts, reward."""

    cfg: Config
    rt: Any  # the scaffold's Runtime
    tokenizer: Any
    models: Models
    sources: dict[str, str]
    optimizer: Any
    reward_fn: Callable[[str, str], float] | None
    labeler: Callable[[str, str], float] | None
    ptx: Any
    notes: list[str]
    prompts: tuple[list, list] = ((), ())  # (training pool, held-out) Prompts

    @property
    def stops(self) -> list[int]:
        return stop_tokens(self.tokenizer)


def boxed_params(m: Models) -> tuple[dict, dict]:
    """Abstract (boxed) trainable and frozen parameter trees, for shardings."""
    value = model_params(m.value)
    trainable = {"policy": model_params(m.policy), "value": {"score": value["score"]} if m.head_only_value else value}
    frozen = {} if m.policy.cfg.lora_rank else {"reference": model_params(m.policy)}
    if m.reward is not None:
        frozen["reward"] = model_params(m.reward)
    return trainable, frozen


def abstract_state(run: PPO, trainable: dict, frozen: dict) -> tuple[Any, Any]:
    """(ShapeDtypeStructs, shardings) of the run state around abstract (boxed) parameter trees."""
    boxed = PPOState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=trainable,
        opt_state=jax.eval_shape(run.optimizer.init, trainable),
        frozen=frozen,
        kl_coef=jax.ShapeDtypeStruct((), jnp.float32),
        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
        round=jax.ShapeDtypeStruct((), jnp.int32),
    )
    return sharded_abstract(boxed, run.rt.mesh, run.rt.rules)


def initial_state(run: PPO, params: dict, frozen: dict, kl_coef: float, shardings: Any) -> PPOState:
    """The run state at step 0 around loaded parameters, built straight into `shardings`."""

    def build(params, frozen):
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=run.optimizer.init(params),
            frozen=frozen,
            kl_coef=jnp.asarray(kl_coef, jnp.float32),
            rng=jax.random.PRNGKey(run.cfg.train.seed),
            round=jnp.zeros((), jnp.int32),
        )

    with run.rt.context():
        return jax.jit(build, out_shardings=shardings)(params, frozen)


def rollout(run: PPO, params: Any, prompts: list, key: jax.Array, temperature: float, group: int = 1):
    """(query tokens, query mask, generation) for `prompts`, sampled from the policy `params`.
    `group` > 1: the prompts come in runs of that many copies (GRPO), each computed once. The
    generation pads prompts to the longest rounded up to 32 (few compiles), not to query_width."""
    width = run.models.query_width
    ids = [render(pr.messages, run.tokenizer, width).ids for pr in prompts]
    tokens, mask = generate.left_pad(ids, run.tokenizer.pad_id, width)
    decode = generate.DecodeConfig(max_new_tokens=run.cfg.ppo.max_new_tokens, temperature=temperature)
    pad, used = run.tokenizer.pad_id, padded_width(max(map(len, ids)), width, 32)
    gen = generate.generate(
        run.models.policy, params, ids, decode, key, pad_id=pad, stop_tokens=run.stops, prompt_width=used, group=group
    )
    return tokens, mask, gen


def responses(run: PPO, gen: generate.Generation) -> list[str]:
    return [run.tokenizer.decode(ids) for ids in generate.completions(gen, run.stops)]


def sequences(run: PPO, tokens, mask, gen):
    """(prompt + response tokens, their mask, response lengths, whether each ended) on the host."""
    resp, lengths = np.asarray(host_value(gen.tokens)), np.asarray(host_value(gen.lengths))
    resp_mask = np.arange(resp.shape[1])[None] < lengths[:, None]
    ended = np.isin(resp[np.arange(len(resp)), np.maximum(lengths - 1, 0)], run.stops) & (lengths > 0)
    return np.concatenate([tokens, resp], 1), np.concatenate([mask, resp_mask], 1), lengths, ended.astype(np.float32)


def reward_model_config(cfg: Config, vocab_size: int) -> Any:
    """The reward model's config (ppo.reward_from), checked to fit this policy; None without one."""
    if not cfg.ppo.reward_from:
        return None
    rm_cfg, rm_tokenizer = read_run(cfg.ppo.reward_from)
    if rm_tokenizer.vocab_size != vocab_size or rm_cfg.model.output != "scalar":
        raise ConfigError(
            f"ppo.reward_from={cfg.ppo.reward_from} is not a reward model for this policy "
            f"(output '{rm_cfg.model.output}', vocabulary {rm_tokenizer.vocab_size} vs {vocab_size})"
        )
    return rm_cfg.model


def describe_reward(p: PPOConfig) -> str:
    """What the reward is, for the run's first log line."""
    parts = [f"model {p.reward_from}"] if p.reward_from else []
    if p.reward_function:
        weight = f"{p.reward_function_weight:g} x " if p.reward_function_weight != 1.0 else ""
        parts.append(f"{weight}function {p.reward_function}")
    return " + ".join(parts)


def function_scores(run: PPO, prompts: list, gen) -> np.ndarray:
    texts = responses(run, gen)
    out = np.empty(len(texts), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, texts)):
        score = run.reward_fn(prompt.text, response)
        number = not isinstance(score, bool) and (
            isinstance(score, numbers.Real) or getattr(score, "shape", None) == ()
        )
        if not number or not np.isfinite(float(score)):
            name = run.cfg.ppo.reward_function
            raise ConfigError(f"ppo.reward_function={name!r} returned {score!r}: expected a finite number")
        out[i] = score
    return out


def scores(run: PPO, state: PPOState, prompts: list, tokens, mask, gen) -> np.ndarray:
    """The reward of each response (RM, function, or the RM's plus ppo.reward_function_weight
    times the function's), before the EOS penalty."""
    if run.models.reward is None:
        return function_scores(run, prompts, gen)
    full, full_mask, lengths, _ = sequences(run, tokens, mask, gen)
    last = run.models.query_width + np.maximum(lengths, 1) - 1
    segments = full_mask.astype(np.int32)
    rm = score_sequences(
        run.models.reward, state.frozen["reward"], full, generate.mask_positions(full_mask), segments, last
    )
    if run.reward_fn is None:
        return rm
    return rm + run.cfg.ppo.reward_function_weight * function_scores(run, prompts, gen)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def sequence_kl(model: Transformer, params, ref_params, tokens: Array, mask: Array, start: int, temperature: float):
    """Per sequence, sum over response tokens of log pi - log pi_ref: the KL estimate PPO penalises."""
    positions, segments = generate.mask_positions(mask), mask.astype(jnp.int32)
    logp, _ = response_logprobs(model, params, tokens, positions, segments, start, temperature)
    ref, _ = response_logprobs(model, ref_params, tokens, positions, segments, start, temperature)
    return jnp.sum((logp - ref) * mask[:, start:], axis=1)


def evaluate(run: PPO, state: PPOState) -> dict[str, float]:
    """Held-out prompts: labeler accuracy (sampled at the rollout temperature and greedy), reward,
    and the sampled answers' mean KL to the reference (the SFT start)."""
    held_out, batch, figures = run.prompts[1], run.cfg.train.batch_size, {}
    if not held_out:  # ppo.eval_prompts=0: no evaluation
        return figures
    m, policy, temperature_kl = run.models, state.params["policy"], run.cfg.ppo.temperature
    for name, temperature in (("", run.cfg.ppo.temperature), ("_greedy", 0.0)):
        answers, rewards, kls = [], [], []
        for i, (chunk, real) in enumerate(padded_chunks(held_out, batch)):
            key = jax.random.PRNGKey(1000 + i * batch)
            tokens, mask, gen = rollout(run, policy, chunk, key, temperature)
            answers += responses(run, gen)[:real]
            rewards += list(scores(run, state, chunk, tokens, mask, gen))[:real]
            if not name:
                full, full_mask = sequences(run, tokens, mask, gen)[:2]
                kl = sequence_kl(
                    m.policy, policy, reference_params(m, state), full, full_mask, m.query_width, temperature_kl
                )
                kls += list(np.asarray(host_value(kl)))[:real]
        figures[f"val_eval_reward{name}"] = float(np.mean(rewards))
        if kls:
            figures["val_kl"] = float(np.mean(kls))
        if run.labeler is not None:
            correct = [run.labeler(pr.text, a) == 1.0 for pr, a in zip(held_out, answers)]
            figures[f"val_task_accuracy{name}"] = float(np.mean(correct))
    return figures


def begin(run: PPO, first: dict, state: PPOState, start: int, logger: Any) -> None:
    """The held-out figures before training into `first`, logged as step 0 once: read back on a
    resume, and on a restart of a run killed before its first checkpoint (which logged them)."""
    logged = {k: v for r in read_metrics(run.rt.workdir) if r.get("step") == 0 for k, v in r.items()}
    if start == 0 and run.cfg.train.max_steps > 0:  # every process evaluates (collectives)
        first.update(evaluate(run, state))
        if first and not logged:
            logger.log(0, first)
    else:
        first.update(logged)
        first.pop("step", None)


def start_figures(first: dict) -> dict[str, float]:
    """`begin`'s figures as the run reports them: start_task_accuracy, start_task_accuracy_greedy..."""
    return {f"start_{k[4:]}": v for k, v in first.items()}


def ptx_batch(run: PPO, step: int) -> dict[str, np.ndarray]:
    p, block = run.cfg.ppo, run.cfg.model.block_size
    rows = np.arange(p.ptx_batch_size * p.minibatches)
    flat = run.ptx.batch("train", step, len(rows), block, rows)
    return {k: v.reshape(p.minibatches, p.ptx_batch_size, *v.shape[1:]) for k, v in flat.items()}
