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

import json
import os
from typing import Any

import jax
import numpy as np

from flaxgpt import fileio
from flaxgpt.config import Config
from flaxgpt.conversations import padded_chunks
from flaxgpt.data.jsonl import DataError, comparison_schema, read_jsonl
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.rows import StreamedRows, prepared_rows, prepared_tokenizer
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.data.world import WorldTask
from flaxgpt.model import Transformer
from flaxgpt.rewards import (
    centered,
    ranking_objective,
    ranking_rows,
    rankings_of,
    reference_items,
    score,
    score_sequences,
    world_rankings,
)
from flaxgpt.runs import read_run, restore_params
from flaxgpt.trainers.scaffold import Runtime, fit, starting_point
from flaxgpt.trainers.step import Objective, lm_run_spec, make_eval_step

COMPARISONS_FILE = "comparisons.jsonl"


def comparison_records(cfg: Config, rt: Runtime, tokenizer: Tokenizer, log) -> tuple[list[dict], list[dict], str]:
    """(train, validation, where) ranking records from JSONL files or sampled on the world."""
    data = cfg.data
    if data.source == "world":
        path = os.path.join(rt.workdir, COMPARISONS_FILE)
        if not fileio.exists(path):  # made once per run; a resumed run reads what it made
            tc = cfg.train
            source_cfg, _ = read_run(tc.init_from)
            params, _ = restore_params(tc.init_from, source_cfg, tc.init_step, source_cfg.model, rt.mesh, rt.rules)
            with rt.context():
                records = world_rankings(
                    WorldTask.from_config(cfg),
                    tokenizer,
                    Transformer(source_cfg.model),
                    params,
                    n=data.world_rankings,
                    k=data.world_ranking_k,
                    max_new=cfg.sft.max_new_tokens,
                    temperature=data.world_ranking_temperature,
                    write_correct=data.world_ranking_write_correct,
                    seed=tc.seed,
                    log=log,
                )
            del params
            if jax.process_index() == 0:
                fileio.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
            else:
                path = None
        records = records if path is None else read_jsonl(path, "rankings")[0]
        where = path or "world comparisons"
    else:
        records, report = _read_rankings(data.path, data.on_error)
        log(report.summary())
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
    schema = comparison_schema(path, "rankings")
    return read_jsonl(path, schema, on_error)


def _ranking_sets(cfg: Config, rt: Runtime, tokenizer: Tokenizer, log) -> tuple[list, PackedRows, PackedRows, str]:
    """(train rankings, train rows, validation rows, what they are) of JSONL files or the world."""
    block = cfg.model.block_size
    train_records, val_records, where = comparison_records(cfg, rt, tokenizer, log)
    train = rankings_of(train_records, tokenizer, block, where, cfg.data.on_error, log)
    val = rankings_of(val_records, tokenizer, block, where + " (validation)", cfg.data.on_error, log)
    k = max(len(r.responses) for r in train + val)
    train_rows = PackedRows(ranking_rows(train, tokenizer, block, k), cfg.train.seed)
    val_rows = PackedRows(ranking_rows(val, tokenizer, block, k), cfg.train.seed + 1)
    return (
        train,
        train_rows,
        val_rows,
        f"{len(train)} ranked prompts (K <= {k}) for training, {len(val)} for validation",
    )


def _best_of_first_rows(model: Transformer, params: Any, rows: StreamedRows, batch_size: int) -> np.ndarray:
    """Rewards of the best (first) response of the first 512 streamed training rows: the
    references `reference_items` takes from rankings in memory."""
    rewards = []
    for chunk, real in padded_chunks(range(min(rows.n, 512)), batch_size):
        got = rows.source.rows(np.array(chunk))
        inputs = (got[k][:, 0] for k in ("inputs", "positions", "segment_ids", "last"))
        rewards.append(score_sequences(model, params, *inputs)[:real])
    return np.concatenate(rewards)


# ----------------------------------------------------------------------------- run


def _ranking_text(cfg: Config) -> str:
    """All text of the rankings, for the tokenizer of a reward model trained from scratch (the
    prepared rows' tokenizer is in the workdir by then)."""
    if cfg.data.source == "tokens":
        return ""
    records = _read_rankings(cfg.data.path, "skip")[0]
    return "".join(
        r.get("system", "")
        + r["prompt"]
        + "".join(r.get("responses", []))
        + r.get("chosen", "")
        + r.get("rejected", "")
        for r in records
    )


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Train the reward model to `train.max_steps` (resuming if possible); returns the final figures."""
    rt = Runtime.create(cfg, workdir)
    if cfg.data.source == "tokens" and not cfg.train.init_from:
        prepared_tokenizer(cfg, workdir)
    cfg, tokenizer, init_params = starting_point(cfg, rt, lambda: _ranking_text(cfg), output="scalar")
    model = Transformer(cfg.model)
    notes: list[str] = []
    if cfg.data.source == "tokens":  # rows prepared on disk, streamed
        (train_rows, val_rows), train = prepared_rows(cfg, tokenizer), []
        description = f"{cfg.data.path}: {train_rows.n} ranked prompts for training, {val_rows.n} for validation"
    else:
        train, train_rows, val_rows, description = _ranking_sets(cfg, rt, tokenizer, notes.append)
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
        if train or cfg.reward.reference_path or cfg.data.source == "world":
            rewards = score(model, state.params, tokenizer, reference_items(cfg, train), eval_batch)
        else:
            rewards = _best_of_first_rows(model, state.params, train_rows, eval_batch)
        offset = float(np.mean(rewards))
        spec.message(
            f"reward offset: {len(rewards)} reference responses scored {offset:+.4f} on average; "
            "the score bias now makes their mean 0"
        )
        return state.replace(params=centered(state.params, offset)), {
            "reward_offset": offset,
            "reference_responses": len(rewards),
        }

    objective = Objective(
        loss_sums=loss_sums,
        train_batch=lambda step, rows: train_rows.batch(step, batch, rows),
        evaluate=evaluate,
        position=lambda step: train_rows.position(step, batch),
    )
    spec = lm_run_spec(cfg, rt, model, objective, init_params=init_params, description=description)
    spec.finalize, spec.notes = finalize, notes
    spec.figures = ("loss", "val_loss", "val_accuracy", "val_reward_margin")
    spec.next_commands = (
        "python -m flaxgpt.score --workdir {workdir} --prompt 'Question:' --response 'an answer'",
        "python -m flaxgpt.train -e ppo_world --set ppo.reward_from={workdir} train.init_from=SFT_WORKDIR"
        "  # next stage: PPO",
    )
    return fit(cfg, rt, spec)
