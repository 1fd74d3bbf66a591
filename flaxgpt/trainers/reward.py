"""The reward model (InstructGPT step 2): learn human preferences from rankings.

The same Transformer with a scalar `score` head (`model.output="scalar"`), initialised from
the SFT run, reads its reward at the last token of prompt + response (the response's
closing <|end|>). It is trained on prompts with K ranked responses, all K(K-1)/2 pairs of a
prompt in one batch element (`losses.ranking_loss`); chosen/rejected pairs are K = 2.
Afterwards the score head's bias is shifted so reference responses score mean 0, as
InstructGPT normalised its reward model before RL.

On the embedded world the comparisons are made here: K answers per prompt sampled from the
SFT policy, ranked by the world's programmatic labeler (the stand-in for human labelers),
and written to WORKDIR/comparisons.jsonl.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import generate
from flaxgpt.chat_template import render, stop_tokens
from flaxgpt.config import Config
from flaxgpt.data import world as world_lib
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.inference import read_run, restore_params
from flaxgpt.losses import ranking_loss
from flaxgpt.model import Transformer
from flaxgpt.sharding import host_value
from flaxgpt.trainers.lm import make_eval_step
from flaxgpt.trainers.loop import Objective, Runtime, fit, starting_point
from flaxgpt.trainers.sft import prompt_and_reference, world_conversations

COMPARISONS_FILE = "comparisons.jsonl"


@dataclass
class Ranking:
    prompt: list[dict]  # the messages before the answer (system, user, ...)
    responses: list[str]  # best first
    ranks: list[int]  # 0 = best; equal ranks are ties

    @classmethod
    def from_record(cls, record: dict) -> Ranking:
        """A rankings- or pairs-schema record."""
        prompt = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["prompt"]}
        ]
        responses = record["responses"] if "responses" in record else [record["chosen"], record["rejected"]]
        scores = record.get("scores")
        ranks = list(range(len(responses))) if scores is None else [scores.index(s) for s in scores]
        return cls(prompt, list(responses), ranks)


def response_ids(prompt: Sequence[dict], response: str, tokenizer: Tokenizer, block_size: int) -> list[int]:
    """Tokens of prompt + response as the chat template renders them; the reward is read at the
    last one (the response's <|end|>). Older exchanges of a long history are dropped to fit;
    a ValueError if even the last user turn and the response do not."""
    turns = [m for m in prompt if m["role"] != "system"]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    rendered = render(
        list(prompt) + [{"role": "assistant", "content": response}], tokenizer, block_size, add_generation_prompt=False
    )
    if last_user < 0 or rendered.dropped_turns > last_user:
        raise ValueError(
            f"the prompt's last user turn and the response need more than block_size={block_size} tokens"
            if last_user >= 0
            else "the prompt has no user turn"
        )
    return rendered.ids


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
    width = width or min(block_size, -(-longest // 16) * 16)
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
def _score_batch(model, params, inputs, positions, segment_ids, last):
    return rewards_at_last(model, params, inputs, positions, segment_ids, last)


def score(
    model: Transformer, params: Any, tokenizer: Tokenizer, items: Sequence[tuple[list[dict], str]], batch_size: int = 16
) -> np.ndarray:
    """Rewards of (prompt messages, response) pairs, in fixed-shape batches (one compilation)."""
    block = model.cfg.block_size
    longest = max((len(response_ids(p, r, tokenizer, block)) for p, r in items), default=1)
    width = min(block, -(-longest // 16) * 16)  # one padded width for every chunk: one compilation
    rewards = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        rows = ranking_rows([Ranking(p, [r], [0]) for p, r in chunk], tokenizer, block, 1, width=width)
        arrays = generate.on_params_mesh(
            params, *(rows[k][:, 0] for k in ("inputs", "positions", "segment_ids", "last"))
        )
        out = _score_batch(model, params, *arrays)
        rewards.append(np.asarray(host_value(out))[:real])
    return np.concatenate(rewards) if rewards else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------- data


def world_rankings(
    cfg: Config, rt: Runtime, tokenizer: Tokenizer, policy: Transformer, params: Any, seed: int
) -> list[dict]:
    """Sample K answers per world prompt from `policy` and rank them with the world's labeler."""
    data = cfg.data
    with rt.context():
        world = world_lib.make_world(data.world_seed)
        rng = random.Random(data.world_seed * 1000 + 3 + 7919 * seed)
        system = [{"role": "system", "content": data.world_system}] if data.world_system else []
        questions = [world_lib.random_question(world, rng)[0] for _ in range(data.world_rankings)]
        k, max_new = data.world_ranking_k, cfg.sft.max_new_tokens
        prompts = [
            render(system + [{"role": "user", "content": q}], tokenizer, policy.cfg.block_size - max_new).ids
            for q in questions
            for _ in range(k)
        ]
        decode = generate.DecodeConfig(max_new_tokens=max_new, temperature=data.world_ranking_temperature)
        outputs = generate.generate_batched(
            policy,
            params,
            prompts,
            decode,
            jax.random.PRNGKey(seed),
            batch_size=64,
            pad_id=tokenizer.pad_id,
            stop_tokens=stop_tokens(tokenizer),
        )
    records, ties = [], 0
    for i, question in enumerate(questions):
        answers = [tokenizer.decode(ids) for ids in outputs[i * k : (i + 1) * k]]
        scored = sorted(((world_lib.label(world, question, a), a) for a in answers), key=lambda x: -x[0])
        if scored[0][0] == scored[-1][0]:
            ties += 1  # all K equally good: no preference to learn
            continue
        records.append(
            {
                "system": data.world_system,
                "prompt": question,
                "responses": [a for _, a in scored],
                "scores": [s for s, _ in scored],
            }
        )
    print(f"world comparisons: {len(records)} prompts ranked, {ties} left out (all {k} answers tied)", flush=True)
    if not records:
        raise DataError(
            f"the policy's {k} answers tied on all {len(questions)} prompts (the labeler scored them "
            "alike): no preference to learn. Train the SFT model further, or raise "
            "data.world_rankings or data.world_ranking_temperature"
        )
    return records


def comparison_records(cfg: Config, rt: Runtime, tokenizer: Tokenizer) -> tuple[list[dict], list[dict], str]:
    """(train, validation, where) ranking records from JSONL files or sampled on the world."""
    data = cfg.data
    if data.source == "world":
        path = os.path.join(rt.workdir, COMPARISONS_FILE)
        if not os.path.exists(path):  # made once per run; a resumed run reads what it made
            tc = cfg.train
            source_cfg, _ = read_run(tc.init_from)
            params, _ = restore_params(tc.init_from, source_cfg, tc.init_step, source_cfg.model, rt.mesh, rt.rules)
            records = world_rankings(cfg, rt, tokenizer, Transformer(source_cfg.model), params, tc.seed)
            del params
            if jax.process_index() == 0:
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                os.replace(path + ".tmp", path)
            else:
                path = None
        records = records if path is None else read_jsonl(path, "rankings")[0]
        where = path or "world comparisons"
    else:
        records, report = _read_rankings(data.path, data.on_error)
        print(report.summary(), flush=True)
        where = data.path
        if data.val_path:
            return records, _read_rankings(data.val_path, data.on_error)[0], where
    cut = int(len(records) * data.train_fraction)
    if cut < 1 or cut >= len(records):
        raise DataError(
            f"{where}: {len(records)} ranked prompt(s) cannot be split into train and validation; "
            "add data or set data.val_path"
        )
    return records[:cut], records[cut:], where


def _read_rankings(path: str, on_error: str):
    """A JSONL file of rankings ({"prompt", "responses", ...}) or pairs ({"prompt", "chosen", "rejected"})."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        schema = "pairs" if "chosen" in json.loads(first) else "rankings"
    except json.JSONDecodeError:
        schema = "rankings"  # read_jsonl reports the line
    return read_jsonl(path, schema, on_error)


def rankings_of(records: list[dict], tokenizer: Tokenizer, block: int, where: str, on_error: str) -> list[Ranking]:
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
        print(f"{where}: {skipped} ranked prompt(s) too long for the context skipped", flush=True)
    return out


def reference_items(cfg: Config, train: list[Ranking]) -> list[tuple[list[dict], str]]:
    """(prompt, response) pairs whose mean reward is set to 0 after training."""
    if cfg.reward.reference_path:
        conversations = [r["messages"] for r in read_jsonl(cfg.reward.reference_path, "conversations")[0]]
    elif cfg.data.source == "world":
        conversations = world_conversations(cfg)[0]  # the SFT demonstrations, as InstructGPT did
    else:
        return [(r.prompt, r.responses[0]) for r in train[:512]]
    return [prompt_and_reference(c) for c in conversations[:512]]


# ----------------------------------------------------------------------------- run


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Train the reward model to `train.max_steps` (resuming if possible); returns the final figures."""
    rt = Runtime.create(cfg, workdir)

    def all_text() -> str:  # for a tokenizer of a reward model trained from scratch
        records = _read_rankings(cfg.data.path, "skip")[0]
        return "".join(
            r.get("system", "")
            + r["prompt"]
            + "".join(r.get("responses", []))
            + r.get("chosen", "")
            + r.get("rejected", "")
            for r in records
        )

    cfg, tokenizer, init_params = starting_point(cfg, rt, all_text, output="scalar")
    model = Transformer(cfg.model)
    block = cfg.model.block_size
    train_records, val_records, where = comparison_records(cfg, rt, tokenizer)
    train = rankings_of(train_records, tokenizer, block, where, cfg.data.on_error)
    val = rankings_of(val_records, tokenizer, block, where + " (validation)", cfg.data.on_error)
    k = max(len(r.responses) for r in train + val)
    train_rows = PackedRows(ranking_rows(train, tokenizer, block, k), cfg.train.seed)
    val_rows = PackedRows(ranking_rows(val, tokenizer, block, k), cfg.train.seed + 1)
    batch, eval_batch = cfg.train.batch_size, cfg.eval.batch_size or cfg.train.batch_size
    eval_iters = min(cfg.eval.iters, -(-val_rows.n // eval_batch))
    loss_sums = ranking_objective(model, cfg.reward.margin)
    eval_step = jax.jit(make_eval_step(model, loss_sums))

    def evaluate(params: Any) -> dict[str, float]:
        return rt.validation(
            eval_step, params, lambda i, rows: val_rows.batch(i, eval_batch, rows), eval_iters, eval_batch
        )

    def finalize(state):
        """Shift the score bias so the reference responses score mean 0."""
        if not cfg.reward.normalize:
            return state, {}
        items = reference_items(cfg, train)
        offset = float(np.mean(score(model, state.params, tokenizer, items, eval_batch)))
        params = dict(state.params)
        params["score"] = {**params["score"], "bias": params["score"]["bias"] - offset}
        print(
            f"reward offset: {len(items)} reference responses scored {offset:+.4f} on average; "
            "the score bias now makes their mean 0",
            flush=True,
        )
        return state.replace(params=params), {"reward_offset": offset, "reference_responses": len(items)}

    objective = Objective(
        loss_sums=loss_sums,
        train_batch=lambda step, rows: train_rows.batch(step, batch, rows),
        evaluate=evaluate,
        position=lambda step: train_rows.position(step, batch),
    )
    description = f"{len(train)} ranked prompts (K <= {k}) for training, {len(val)} for validation"
    return fit(cfg, rt, model, objective, init_params=init_params, finalize=finalize, description=description)
