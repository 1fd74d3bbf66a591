"""Pretraining: next-token maximum likelihood on a token stream.

The loop is thin: build (data, model, optimizer, mesh) from the config,
restore the latest checkpoint if the workdir has one, then call the jitted
`train_step` with host-side work only at log, eval and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import generate
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, ConfigError, to_dict, to_json
from flaxgpt.data.prefetch import prefetch
from flaxgpt.data.text import DocumentRows, TokenWindows, build_text_data
from flaxgpt.logging import MetricsLogger
from flaxgpt.model import Transformer, count_params
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import batch_sharding, host_value, local_batch_rows, logical_rules, make_mesh, place_batch
from flaxgpt.state import abstract_train_state, create_train_state
from flaxgpt.trainers.lm import make_eval_step, make_train_step


class NonFiniteLoss(RuntimeError):
    """Too many steps had a non-finite loss or gradient; the last checkpoint is intact."""


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Train to `train.max_steps` (resuming if possible); returns the final figures."""
    cfg.validate()
    os.makedirs(workdir, exist_ok=True)
    tokenizer, data = build_text_data(cfg, workdir)
    multiple = max(cfg.model.vocab_multiple, 1)
    vocab = cfg.model.vocab_size or -(-tokenizer.vocab_size // multiple) * multiple
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab).resolved()
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(to_json(cfg))

    mesh = make_mesh(cfg.mesh)
    rules = logical_rules(cfg.mesh.rules)
    model = Transformer(model_cfg)
    tc = cfg.train
    schedule = learning_rate_schedule(cfg.optimizer, tc.max_steps)
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps)
    example = jnp.zeros((1, model_cfg.block_size), jnp.int32)

    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract, shardings = abstract_train_state(model, optimizer, example, mesh, rules)
        state, _ = checkpointer.restore(latest, abstract, model_cfg)
    else:
        state, shardings = create_train_state(model, optimizer, example, mesh, rules, tc.seed)
    start = int(host_value(state.step))

    rows_sharding = batch_sharding(mesh, rules)
    logger = MetricsLogger(workdir, cfg.logging, tc.max_steps, start, to_dict(cfg))
    logger.message(
        f"flaxgpt {cfg.name}: {count_params(state.params) / 1e6:.2f}M parameters, vocab {vocab}, "
        f"mesh {dict(mesh.shape)}, " + (f"resumed from step {start}" if latest is not None else "from scratch")
    )
    record = lambda step: {"step": step, "data": data.position(step, tc.batch_size), "model": to_dict(model_cfg)}

    block, batch = model_cfg.block_size, tc.batch_size
    rows = local_batch_rows(rows_sharding, batch, block)  # this process loads only these rows
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = jax.jit(make_train_step(model, optimizer, schedule, tc),
                             in_shardings=(shardings, rows_sharding), out_shardings=(shardings, None),
                             donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings.params, rows_sharding))
        evaluate = lambda params: _evaluate(eval_step, params, data, cfg, rows_sharding)

        last_row: dict[str, Any] = {}
        skipped_seen = int(host_value(state.skipped))
        clock, tokens_since = time.time(), 0
        batches = prefetch(lambda step: data.batch("train", step, batch, block, rows), start, tc.max_steps,
                           cfg.data.prefetch)
        for step, local in batches:
            state, metrics = train_step(state, place_batch(local, rows, rows_sharding, batch))
            done = step + 1
            tokens_since += batch * block
            eval_due = done % cfg.eval.interval == 0 or done == tc.max_steps
            if done % tc.log_interval == 0 or eval_due:
                m = host_value(metrics)
                now = time.time()
                row = {k: float(m[k]) for k in ("loss", "lr", "grad_norm")}
                if tc.z_loss:
                    row["z_loss"] = float(m["z_loss"])
                row["tokens_per_sec"] = tokens_since / max(now - clock, 1e-9)
                skipped_seen = _check_skipped(int(m["skipped"]), skipped_seen, done, tc.max_skipped_steps, logger)
                if eval_due:
                    row.update(evaluate(state.params))
                logger.log(done, row)
                last_row = row
                clock, tokens_since = time.time(), 0
            checkpointer.save(done, state, record(done), force=done == tc.max_steps)

        checkpointer.save(tc.max_steps, state, record(tc.max_steps), force=True)
        sample_text = _sample(model, state.params, tokenizer, cfg)
    checkpointer.close()
    logger.message(f"--- sample ---\n{cfg.eval.sample_prompt}{sample_text}\n--------------")
    logger.close()
    return {"step": tc.max_steps, **last_row, "sample": sample_text}


def _evaluate(eval_step, params, data: TokenWindows | DocumentRows, cfg: Config, sharding) -> dict[str, float]:
    """Mean validation loss over `eval.iters` fixed batches (the same ones at every evaluation)."""
    batch, block = cfg.eval.batch_size or cfg.train.batch_size, cfg.model.block_size
    rows = local_batch_rows(sharding, batch, block)
    loss_sum = weight_sum = 0.0
    for i in range(cfg.eval.iters):
        local = data.batch("val", i, batch, block, rows)
        out = host_value(eval_step(params, place_batch(local, rows, sharding, batch)))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    val_loss = loss_sum / max(weight_sum, 1.0)
    return {"val_loss": val_loss, "val_ppl": float(np.exp(min(val_loss, 50.0)))}


def _check_skipped(total: int, seen: int, step: int, limit: int, logger: MetricsLogger) -> int:
    if total > seen:
        logger.message(f"step {step}: {total - seen} update(s) skipped for a non-finite loss or "
                       f"gradient ({total} in this run so far, limit {limit})")
    if total > limit:
        raise NonFiniteLoss(f"{total} steps had a non-finite loss or gradient (train.max_skipped_steps="
                            f"{limit}); stopping. The last checkpoint holds finite parameters.")
    return total


def _sample(model, params, tokenizer, cfg: Config) -> str:
    """The end-of-run sample: the KV-cache engine, or the sliding window past the context."""
    ev = cfg.eval
    if ev.sample_tokens <= 0:
        return ""
    prompt = tokenizer.encode(ev.sample_prompt) or [tokenizer.eos_id]
    decode = generate.DecodeConfig(max_new_tokens=ev.sample_tokens, temperature=ev.temperature, top_k=ev.top_k)
    rng = jax.random.PRNGKey(ev.sample_seed)
    if len(prompt) + ev.sample_tokens <= model.cfg.block_size:
        out = generate.generate(model, params, [prompt], decode, rng, pad_id=tokenizer.pad_id,
                                stop_tokens=[tokenizer.eos_id])
        return tokenizer.decode(generate.completions(out, [tokenizer.eos_id])[0])
    return tokenizer.decode(generate.sliding_window_sample(model, params, prompt, decode, rng, tokenizer.eos_id))
