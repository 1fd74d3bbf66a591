"""Scores of generated text against references, from well-kept libraries (sacrebleu,
rouge-score), so figures compare with what other frameworks report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from flaxgpt import generate
from flaxgpt.chat_template import render, stop_tokens
from flaxgpt.config import Config
from flaxgpt.conversations import Conversation, Labeler, prompt_and_reference
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.model import Transformer


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match (after trimming), corpus BLEU and mean ROUGE-1 / ROUGE-L F1.

    BLEU uses sacrebleu's effective order: chat answers are often shorter than four
    words, and plain 4-gram BLEU would score a perfect one-word answer 0.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)
    bleu = BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    mean = lambda key: sum(s[key].fmeasure for s in scores) / len(scores)
    return {"exact_match": exact, "bleu": bleu, "rouge1": mean("rouge1"), "rougeL": mean("rougeL")}


def answer_metrics(
    model: Transformer,
    params: Any,
    tokenizer: Tokenizer,
    conversations: list[Conversation],
    cfg: Config,
    labeler: Labeler,
) -> dict[str, float]:
    """Greedy answers to the final user turn of `conversations`, scored against their references."""
    max_new = cfg.sft.max_new_tokens
    prompts, references, questions = [], [], []
    for messages in conversations:
        history, reference = prompt_and_reference(messages)
        prompts.append(render(history, tokenizer, model.cfg.block_size - max_new).ids)  # the width generate pads to
        references.append(reference)
        questions.append(next(m["content"] for m in reversed(history) if m["role"] == "user"))
    decode = generate.DecodeConfig(max_new_tokens=max_new, temperature=0.0)
    outputs = generate.generate_batched(
        model,
        params,
        prompts,
        decode,
        jax.random.PRNGKey(0),
        batch_size=cfg.eval.batch_size or cfg.train.batch_size,
        pad_id=tokenizer.pad_id,
        stop_tokens=stop_tokens(tokenizer),
    )
    answers = [tokenizer.decode(ids) for ids in outputs]
    figures = text_metrics(answers, references)
    if labeler is not None:
        scores = [labeler(q, a) for q, a in zip(questions, answers)]
        figures["task_accuracy"] = float(np.mean([s == 1.0 for s in scores]))
        figures["labeler_score"] = float(np.mean(scores))
    return figures
