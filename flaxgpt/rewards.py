"""Reward models as a library: ranking rows, the reward read at a sequence's last token,
scoring (prompt, response) pairs, centring, and world comparisons ranked by the labeler.

The reward model (trainers/reward.py) trains on these; PPO scores its rollouts and, in
iterated RLHF, retrains its reward model with them; `flaxgpt.score` scores JSONL files.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import generate, lora
from flaxgpt.chat_template import render, stop_tokens
from flaxgpt.config import ConfigError
from flaxgpt.conversations import padded_chunks, prompt_and_reference, record_prompt
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.data.world import WorldTask, arithmetic_answer
from flaxgpt.losses import ranking_loss
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import host_value
from flaxgpt.state import create_train_state


@dataclass
class Ranking:
    prompt: list[dict]  # the messages before the answer (system, user, ...)
    responses: list[str]  # best first
    ranks: list[int]  # 0 = best; equal ranks are ties

    @classmethod
    def from_record(cls, record: dict) -> Ranking:
        """A rankings- or pairs-schema record."""
        prompt = record_prompt(record)
        responses = record["responses"] if "responses" in record else [record["chosen"], record["rejected"]]
        scores = record.get("scores")
        ranks = list(range(len(responses))) if scores is None else [scores.index(s) for s in scores]
        return cls(prompt, list(responses), ranks)


def response_ids(prompt: Sequence[dict], response: str, tokenizer: Tokenizer, block_size: int) -> list[int]:
    """Tokens of prompt + response as the chat template renders them; the reward is read at the
    last one (the response's <|end|>). Older exchanges of a long history are dropped to fit;
    a ValueError if even the last user turn and the response do not."""
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("the prompt has no user turn")
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    return render(messages, tokenizer, block_size, add_generation_prompt=False).ids


def padded_width(longest: int, limit: int, multiple: int = 16) -> int:
    """`longest` rounded up to a multiple of `multiple`, at most `limit`: sequences padded to the longest
    of their set rather than to the context (short world prompts and answers would otherwise
    spend most of the compute on padding), with few distinct widths to compile."""
    return min(limit, -(-longest // multiple) * multiple)


def ranking_rows(
    rankings: list[Ranking], tokenizer: Tokenizer, block_size: int, k: int, width: int | None = None
) -> dict[str, np.ndarray]:
    """[n, k, width] inputs / segment_ids / positions and [n, k] last / ranks / valid arrays.

    `width` defaults to the longest sequence rounded up to a multiple of 16 (at most
    block_size): rows hold one response each, and padding to the context would waste compute.
    """
    n = len(rankings)
    encoded = [[response_ids(r.prompt, response, tokenizer, block_size) for response in r.responses] for r in rankings]
    longest = max((len(ids) for row in encoded for ids in row), default=1)
    width = width or padded_width(longest, block_size)
    out = {
        "inputs": np.full((n, k, width), tokenizer.pad_id, np.int32),
        "segment_ids": np.zeros((n, k, width), np.int32),
        "positions": np.zeros((n, k, width), np.int32),
        "last": np.zeros((n, k), np.int32),
        "ranks": np.zeros((n, k), np.float32),
        "valid": np.zeros((n, k), np.float32),
    }
    for i, ranking in enumerate(rankings):
        for j, (ids, rank) in enumerate(zip(encoded[i], ranking.ranks)):
            out["inputs"][i, j, : len(ids)] = ids
            out["segment_ids"][i, j, : len(ids)] = 1
            out["positions"][i, j, : len(ids)] = np.arange(len(ids))
            out["last"][i, j], out["ranks"][i, j], out["valid"][i, j] = len(ids) - 1, rank, 1.0
    return out


def rankings_of(
    records: list[dict], tokenizer: Tokenizer, block: int, where: str, on_error: str, log=print
) -> list[Ranking]:
    """The records as Rankings; ones too long for the context raise a DataError (or are skipped)."""
    out, skipped = [], 0
    for index, record in enumerate(records):
        ranking = Ranking.from_record(record)
        try:
            for response in ranking.responses:
                response_ids(ranking.prompt, response, tokenizer, block)
        except ValueError as e:
            if on_error == "raise":
                raise DataError(f"{where}: record {index}: {e} (data.on_error=skip skips it)") from e
            skipped += 1
            continue
        out.append(ranking)
    if skipped:
        log(f"{where}: {skipped} ranked prompt(s) too long for the context skipped")
    return out


def rewards_at_last(
    model: Transformer,
    params: Any,
    inputs: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    last: jax.Array,
    train: bool = False,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Rewards [..., ] of sequences [..., length] (any leading dims), read at index `last`."""
    lead, length = inputs.shape[:-1], inputs.shape[-1]
    flat = lambda x: x.reshape(-1, length)
    scores = model.apply(
        {"params": params},
        flat(inputs),
        flat(positions),
        flat(segment_ids),
        train=train,
        rngs={"dropout": rng} if train else None,
    )
    return jnp.take_along_axis(scores, last.reshape(-1, 1), axis=1)[:, 0].reshape(lead)


def ranking_objective(model: Transformer, margin: float):
    def loss_sums(params, batch, rng, train):
        rewards = rewards_at_last(
            model, params, batch["inputs"], batch["positions"], batch["segment_ids"], batch["last"], train, rng
        )
        return ranking_loss(rewards, batch["ranks"], batch["valid"], margin)

    return loss_sums


@functools.partial(jax.jit, static_argnames="model")
def _rewards(model, params, inputs, positions, segment_ids, last):
    return rewards_at_last(model, params, inputs, positions, segment_ids, last)


def score_sequences(model: Transformer, params: Any, inputs, positions, segment_ids, last) -> np.ndarray:
    """Rewards (host numbers) of a batch of token sequences, read at `last`: the one scorer."""
    return np.asarray(
        host_value(_rewards(model, params, *generate.on_params_mesh(params, inputs, positions, segment_ids, last)))
    )


def score(
    model: Transformer, params: Any, tokenizer: Tokenizer, items: Sequence[tuple[list[dict], str]], batch_size: int = 16
) -> np.ndarray:
    """Rewards of (prompt messages, response) pairs, in fixed-shape batches (one compilation)."""
    block = model.cfg.block_size
    longest = max((len(response_ids(p, r, tokenizer, block)) for p, r in items), default=1)
    width = padded_width(longest, block)  # one padded width for every chunk: one compilation
    rewards = []
    for chunk, real in padded_chunks(items, batch_size):
        rows = ranking_rows([Ranking(p, [r], [0]) for p, r in chunk], tokenizer, block, 1, width=width)
        rewards.append(
            score_sequences(model, params, *(rows[k][:, 0] for k in ("inputs", "positions", "segment_ids", "last")))[
                :real
            ]
        )
    return np.concatenate(rewards) if rewards else np.zeros((0,), np.float32)


def centered(params: Any, offset: float) -> Any:
    """The reward model's parameters with the score bias shifted by -offset (references: mean 0)."""
    params = dict(params)
    params["score"] = {**params["score"], "bias": params["score"]["bias"] - offset}
    return params


def labeler_ranking(task: WorldTask, question: str, answers: list[str], write: bool) -> dict | None:
    """A rankings record of `answers` graded by the labeler, best first; None when all tie. With
    `write`, a ranking with no exactly correct answer gets the correct one (the labeler writes it)
    in place of its worst: the RM then learns right answers the policy rarely samples (a ranking
    that mixes sampled and labeler-written answers, as InstructGPT's labelers also wrote answers)."""
    scored = sorted(((task.label(question, a), a) for a in answers), key=lambda x: -x[0])
    if write and scored[0][0] < 1.0 and len(scored) > 1:
        truth = task.answer(question)
        scored = [(1.0, truth)] + scored[:-1]
    if scored[0][0] == scored[-1][0]:
        return None
    return {
        "system": task.system,
        "prompt": question,
        "responses": [a for _, a in scored],
        "scores": [s for s, _ in scored],
    }


def world_rankings(
    task: WorldTask,
    tokenizer: Tokenizer,
    policy: Transformer,
    params: Any,
    *,
    n: int,
    k: int,
    max_new: int,
    temperature: float,
    seed: int,
    write_correct: float = 0.0,
    log=print,
) -> list[dict]:
    """Sample k answers to each of n world prompts from `policy` and rank them with the labeler
    (under the run's mesh context). On a `write_correct` share of the prompts with no exactly
    correct answer, the labeler writes the correct one in place of the worst (`labeler_ranking`)."""
    questions = task.questions("rankings", n, offset=7919 * seed)
    prompts = [
        render(task.prompt(q), tokenizer, policy.cfg.block_size - max_new).ids for q in questions for _ in range(k)
    ]
    decode = generate.DecodeConfig(max_new_tokens=max_new, temperature=temperature)
    outputs = generate.generate_batched(
        policy,
        params,
        prompts,
        decode,
        jax.random.PRNGKey(seed),
        batch_size=64,
        pad_id=tokenizer.pad_id,
        stop_tokens=stop_tokens(tokenizer),
        prompt_width=padded_width(max(map(len, prompts), default=1), policy.cfg.block_size - max_new),
    )
    records, ties, written = [], 0, 0
    rng = random.Random(seed)
    for i, question in enumerate(questions):
        answers = [tokenizer.decode(ids) for ids in outputs[i * k : (i + 1) * k]]
        record = labeler_ranking(task, question, answers, rng.random() < write_correct)
        if record is None:
            ties += 1  # all k equally good: no preference to learn
            continue
        written += record["scores"][0] == 1.0 and record["responses"][0] not in answers
        records.append(record)
    log(
        f"world comparisons: {len(records)} prompts ranked ({written} with the labeler's written answer), "
        f"{ties} left out (all {k} answers tied)"
    )
    if not records:
        raise DataError(
            f"the policy's {k} answers tied on all {len(questions)} prompts (the labeler scored them "
            "alike): no preference to learn. Train the SFT model further, or raise "
            "data.world_rankings or data.world_ranking_temperature"
        )
    return records


def reference_items(cfg: Any, train: list[Ranking]) -> list[tuple[list[dict], str]]:
    """(prompt, response) pairs whose mean reward is set to 0 after training: reward.reference_path,
    the world's SFT demonstrations (as InstructGPT did), or the best training responses."""
    if cfg.reward.reference_path:
        conversations = [r["messages"] for r in read_jsonl(cfg.reward.reference_path, "conversations")[0]]
    elif cfg.data.source == "world":
        conversations = WorldTask.from_config(cfg).demonstrations(
            "sft_train", cfg.data.world_conversations, cfg.data.world_noise, cfg.data.world_hedge
        )
    else:
        return [(r.prompt, r.responses[0]) for r in train[:512]]
    return [prompt_and_reference(c) for c in conversations[:512]]


def calculator(prompt: str, response: str) -> float:
    """A verifier for arithmetic only (RLVR beside an RM): 1 when the prompt asks "What is a plus / minus
    b?" and the response is exactly the result, else 0 — it knows no world facts, and gives every
    answer to another question the same 0 (no preference there)."""
    truth = arithmetic_answer(prompt)
    return float(truth is not None and response.strip().rstrip(".").strip() == truth)


def reward_function(cfg: Any) -> Callable[[str, str], float] | None:
    """The configured Python reward (prompt text, response text) -> score, if any."""
    name = cfg.ppo.reward_function
    if not name:
        return None
    if name == "world":
        return WorldTask.from_config(cfg).label
    if name == "calculator":
        return calculator
    module, _, attr = name.partition(":")
    if not (module and attr) or module.startswith("."):
        raise ConfigError(f"ppo.reward_function={name!r}: expected 'world', 'calculator' or 'module:function'")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"ppo.reward_function={name!r}: cannot load it ({e})") from e
    if not callable(function):
        raise ConfigError(f"ppo.reward_function={name!r} is a {type(function).__name__}, not a function")
    return function


def retrain(
    cfg: Any, rt: Any, model: Transformer, params: Any, tokenizer: Tokenizer, rankings: list[Ranking], seed: int
) -> tuple[Any, list[float]]:
    """(params, training pairwise accuracy per step): the reward model trained further from
    `params` on `rankings` for ppo.round_rm_steps steps (iterated RLHF), under the run's mesh."""
    from flaxgpt.trainers.step import make_train_step

    block = model.cfg.block_size
    rows = PackedRows(ranking_rows(rankings, tokenizer, block, max(len(r.responses) for r in rankings)), seed)
    train = dataclasses.replace(cfg.train, max_steps=cfg.ppo.round_rm_steps, grad_accum_steps=1)
    optimizer = build_optimizer(cfg.optimizer, train.max_steps, lora.trainable_mask if model.cfg.lora_rank else None)
    example = jnp.zeros((1, block), jnp.int32)
    state, _ = create_train_state(model, optimizer, example, rt.mesh, rt.rules, seed, params=lambda _: params)
    schedule = learning_rate_schedule(cfg.optimizer, train.max_steps)
    loss = ranking_objective(model, cfg.reward.margin)
    step_fn = jax.jit(make_train_step(model, optimizer, schedule, train, loss), donate_argnums=0)
    batch, accuracy = min(cfg.train.batch_size, rows.n), []
    for i in range(train.max_steps):
        state, metrics = step_fn(state, rt.place(rows.batch(i, batch, rt.rows(batch)), batch))
        accuracy.append(float(host_value(metrics["accuracy"])))
    return state.params, accuracy
