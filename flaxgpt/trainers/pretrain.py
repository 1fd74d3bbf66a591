"""Pretraining: next-token maximum likelihood on a token stream (or packed documents)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flaxgpt import generate
from flaxgpt.config import Config
from flaxgpt.data.stream import build_token_data
from flaxgpt.data.text import build_text_data
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.model import Transformer
from flaxgpt.trainers.scaffold import Runtime, fit, resolve_vocab, starting_point
from flaxgpt.trainers.step import Objective, lm_run_spec, make_eval_step


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Train to `train.max_steps` (resuming if possible); returns the final figures."""
    rt = Runtime.create(cfg, workdir)
    init_params = None
    build_data = build_token_data if cfg.data.source == "tokens" else build_text_data
    if cfg.train.init_from or cfg.train.init_from_hf:  # continued pretraining: that model and its tokenizer
        cfg, tokenizer, init_params = starting_point(cfg, rt, lambda: "")
        _, data = build_data(cfg, workdir)  # finds the copied tokenizer in the workdir
    else:
        tokenizer, data = build_data(cfg, workdir)
        cfg = resolve_vocab(cfg, tokenizer)
    model = Transformer(cfg.model)
    block, batch = cfg.model.block_size, cfg.train.batch_size
    eval_step = jax.jit(make_eval_step(model))

    def evaluate(params: Any) -> dict[str, float]:
        figures = rt.validation(
            eval_step, params, lambda i, rows: data.batch("val", i, eval_batch, block, rows), cfg.eval.iters, eval_batch
        )
        return {**figures, "val_ppl": float(np.exp(min(figures["val_loss"], 50.0)))} if figures else {}

    eval_batch = cfg.eval.batch_size or batch
    objective = Objective(
        loss_sums=None,
        train_batch=lambda step, rows: data.batch("train", step, batch, block, rows),
        evaluate=evaluate,
        position=lambda step: data.position(step, batch),
    )

    def report(state, logger) -> dict[str, Any]:
        text = sample_text(model, state.params, tokenizer, cfg)
        if cfg.eval.sample_tokens > 0:
            logger.message(f"--- sample ---\n{cfg.eval.sample_prompt}{text}\n--------------")
        return {"sample": text}

    spec = lm_run_spec(cfg, rt, model, objective, init_params=init_params)
    spec.report = report
    return fit(cfg, rt, spec)


def sample_text(model: Transformer, params: Any, tokenizer: Tokenizer, cfg: Config) -> str:
    """The end-of-run sample: the KV-cache engine, or the sliding window past the context."""
    ev = cfg.eval
    if ev.sample_tokens <= 0:
        return ""
    prompt = tokenizer.encode_prompt(ev.sample_prompt) or [tokenizer.eos_id]
    decode = generate.DecodeConfig(max_new_tokens=ev.sample_tokens, temperature=ev.temperature, top_k=ev.top_k)
    rng = jax.random.PRNGKey(ev.sample_seed)
    if len(prompt) + ev.sample_tokens <= model.cfg.block_size:
        out = generate.generate(
            model, params, [prompt], decode, rng, pad_id=tokenizer.pad_id, stop_tokens=[tokenizer.eos_id]
        )
        return tokenizer.decode(generate.completions(out, [tokenizer.eos_id])[0])
    return tokenizer.decode(generate.sliding_window_sample(model, params, prompt, decode, rng, tokenizer.eos_id))
