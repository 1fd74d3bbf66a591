"""Supervised fine-tuning (InstructGPT step 1): learn to answer as the demonstrations do.

Conversations (system message, history, ideal response) are rendered through the chat
template; the loss covers only assistant tokens (every assistant turn, or only the last),
so the model is never trained to write the user's part. Validation reports the loss and
perplexity on assistant tokens and, on answers produced by the generation engine,
exact match, BLEU and ROUGE against the references (plus the labeler's task accuracy on
the embedded world).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flaxgpt.chat_template import render
from flaxgpt.config import Config, ConfigError
from flaxgpt.conversations import Conversation, Labeler, conversation_example, prompt_and_reference
from flaxgpt.data.jsonl import DataError, read_jsonl
from flaxgpt.data.packing import PackedRows, build_rows
from flaxgpt.data.rows import prepared_rows, prepared_tokenizer
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.data.world import WorldTask
from flaxgpt.metrics import answer_metrics
from flaxgpt.model import Transformer
from flaxgpt.trainers.scaffold import Runtime, fit, starting_point
from flaxgpt.trainers.step import Objective, lm_run_spec, make_eval_step


def world_conversations(cfg: Config) -> tuple[list[Conversation], list[Conversation], Labeler]:
    """Demonstrations on the embedded world: imperfect for training (data.world_noise of them wrong
    or sloppy), perfect for validation (the references), and the world's labeler."""
    data, task = cfg.data, WorldTask(cfg.data.world_seed, cfg.data.world_system)
    n_val = max(cfg.sft.eval_examples, cfg.eval.iters * (cfg.eval.batch_size or cfg.train.batch_size), 1)
    train = task.demonstrations("sft_train", data.world_conversations, data.world_noise, data.world_hedge)
    return train, task.demonstrations("sft_val", n_val, 0.0), task.label


def jsonl_conversations(cfg: Config, log: Callable[[str], None]) -> tuple[list[Conversation], list[Conversation]]:
    data = cfg.data
    records, report = read_jsonl(data.path, "conversations", data.on_error)
    log(report.summary())
    conversations = [r["messages"] for r in records]
    if data.val_path:
        return conversations, [r["messages"] for r in read_jsonl(data.val_path, "conversations", data.on_error)[0]]
    cut = int(len(conversations) * data.train_fraction)
    if cut < 1 or cut >= len(conversations):
        raise DataError(
            f"{data.path}: {len(conversations)} conversation(s) cannot be split into train and "
            "validation; add conversations or set data.val_path"
        )
    return conversations[:cut], conversations[cut:]


def conversation_rows(
    conversations: list[Conversation], tokenizer: Tokenizer, cfg: Config, where: str, seed: int, log=print
) -> PackedRows:
    """Rendered, masked, and packed (never splitting a conversation) or padded into rows."""
    examples, skipped = [], []
    for index, messages in enumerate(conversations):
        try:
            examples.append(conversation_example(messages, tokenizer, cfg.model.block_size, cfg.sft.loss_on))
        except ValueError as e:
            if cfg.data.on_error == "raise":
                raise DataError(f"{where}: conversation {index}: {e} (data.on_error=skip skips it)") from e
            skipped.append(index)
    if skipped:
        log(f"{where}: {len(skipped)} conversation(s) too long for the context skipped (first: {skipped[0]})")
    rows = build_rows(examples, cfg.model.block_size, cfg.data.packing, tokenizer.pad_id, keep_whole=True)
    return PackedRows(rows, seed)


def answerable(
    conversations: list[Conversation], tokenizer: Tokenizer, cfg: Config, log: Callable[[str], None]
) -> list[Conversation]:
    """The validation conversations whose prompt leaves sft.max_new_tokens for the answer; checked
    before training, so the final evaluation cannot fail on them."""
    room = cfg.model.block_size - cfg.sft.max_new_tokens
    if conversations and room < 2:
        raise ConfigError(
            f"sft.max_new_tokens={cfg.sft.max_new_tokens} leaves no room for a prompt in model.block_size="
            f"{cfg.model.block_size}: lower it (or set sft.eval_examples=0)"
        )
    fits = []
    for messages in conversations:
        try:
            render(prompt_and_reference(messages)[0], tokenizer, room)
            fits.append(messages)
        except ValueError:
            continue
    if len(fits) < len(conversations):
        log(
            f"sft: {len(conversations) - len(fits)} of {len(conversations)} validation prompts leave less than "
            f"sft.max_new_tokens={cfg.sft.max_new_tokens} for the answer: not answered"
        )
    if conversations and not fits:
        raise ConfigError(
            f"sft.max_new_tokens={cfg.sft.max_new_tokens}: no validation prompt fits in model.block_size="
            f"{cfg.model.block_size} with room for the answer; lower it (or set sft.eval_examples=0)"
        )
    return fits


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Fine-tune to `train.max_steps` (resuming if possible); returns the final figures."""
    rt = Runtime.create(cfg, workdir)
    labeler: Labeler = None
    notes: list[str] = []
    train_convs, val_convs = [], []
    if cfg.data.source == "world":
        train_convs, val_convs, labeler = world_conversations(cfg)
        where = "world demonstrations"
    elif cfg.data.source == "jsonl":
        train_convs, val_convs = jsonl_conversations(cfg, notes.append)
        where = cfg.data.path
    elif not (cfg.train.init_from or cfg.train.init_from_hf):
        prepared_tokenizer(cfg, workdir)
    all_text = lambda: "".join(m["content"] for c in train_convs + val_convs for m in c)
    cfg, tokenizer, init_params = starting_point(cfg, rt, all_text)
    model = Transformer(cfg.model)
    batch, eval_batch = cfg.train.batch_size, cfg.eval.batch_size or cfg.train.batch_size
    if cfg.data.source == "tokens":  # rows prepared on disk, streamed (no text: no answers generated)
        train_rows, val_rows = prepared_rows(cfg, tokenizer)
        if cfg.sft.eval_examples:
            notes.append("sft: data.source='tokens' holds rows, not reference answers: no answers generated")
    else:
        train_rows = conversation_rows(train_convs, tokenizer, cfg, where, cfg.train.seed, notes.append)
        val_where = where + " (validation)"
        val_rows = conversation_rows(val_convs, tokenizer, cfg, val_where, cfg.train.seed + 1, notes.append)
    eval_iters = min(cfg.eval.iters, -(-val_rows.n // eval_batch))
    eval_step = jax.jit(make_eval_step(model))
    generated = answerable(val_convs[: cfg.sft.eval_examples], tokenizer, cfg, notes.append)

    def evaluate(params: Any) -> dict[str, float]:
        figures = rt.validation(
            eval_step, params, lambda i, rows: val_rows.batch(i, eval_batch, rows), eval_iters, eval_batch
        )
        if figures:
            figures["val_ppl"] = float(np.exp(min(figures["val_loss"], 50.0)))
        if generated:
            figures.update(
                {f"val_{k}": v for k, v in answer_metrics(model, params, tokenizer, generated, cfg, labeler).items()}
            )
        return figures

    objective = Objective(
        loss_sums=None,  # next-token cross-entropy, weighted by the assistant mask
        train_batch=lambda step, rows: train_rows.batch(step, batch, rows),
        evaluate=evaluate,
        position=lambda step: train_rows.position(step, batch),
    )
    counted = f"{len(train_convs)} training conversations in " if train_convs else f"{cfg.data.path}: "
    description = f"{counted}{train_rows.n} rows, loss on {cfg.sft.loss_on} assistant turns"
    spec = lm_run_spec(cfg, rt, model, objective, init_params=init_params, description=description)
    spec.notes = notes
    spec.figures = ("loss", "val_loss", "val_task_accuracy", "val_exact_match", "val_bleu", "val_rougeL")
    spec.next_commands = (
        "python -m flaxgpt.chat --workdir {workdir}",
        "python -m flaxgpt.serve --workdir {workdir}",
        "python -m flaxgpt.train -e ppo_world --set train.init_from={workdir}  # next stage: PPO",
    )
    return fit(cfg, rt, spec)
