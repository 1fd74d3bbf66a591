"""Preference data and objectives for DPO, KTO and ORPO, as a library the trainers share.

Records (`pairs`, `rankings` expanded to every better/worse pair, thumbs-up/down `feedback`)
become fixed-shape rows: prompt + response rendered through the chat template (so text from
users or data never becomes a special token), loss weights 1 on the response and its closing
<|end|> only. A response's log-probability is the sum over those tokens
(`losses.sequence_logprobs`).

The reference model's log-probabilities are computed once, before training, from the
starting parameters and stored in the rows (`add_reference_logprobs`): the run holds one copy
of the weights, and with LoRA the adapters start at zero, so the start is the base model
with adapters off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import losses
from flaxgpt.data.packing import build_rows
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.trainers.sft import conversation_example

Rows = dict[str, np.ndarray]
_ROW = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


@dataclass
class Pair:
    prompt: list[dict]  # the messages before the answer
    chosen: str
    rejected: str


@dataclass
class Feedback:
    prompt: list[dict]
    response: str
    desirable: bool  # thumbs up


def pairs_of(prompt: list[dict], responses: Sequence[str], ranks: Sequence[int]) -> list[Pair]:
    """Every (better, worse) pair of one prompt's ranked responses (equal ranks are ties: no pair)."""
    return [
        Pair(prompt, better, worse)
        for better, rank_better in zip(responses, ranks)
        for worse, rank_worse in zip(responses, ranks)
        if rank_better < rank_worse
    ]


def response_example(prompt: Sequence[dict], response: str, tokenizer: Tokenizer, block_size: int):
    """(inputs, targets, weights) of prompt + response, weighted on the response only; older
    turns are dropped to fit, and a ValueError names a response that cannot fit at all."""
    return conversation_example(
        list(prompt) + [{"role": "assistant", "content": response}], tokenizer, block_size, "last"
    )


def _encode(examples: list, tokenizer: Tokenizer, width: int, prefix: str) -> Rows:
    rows = build_rows(examples, width, "pad", tokenizer.pad_id)
    return {f"{prefix}{key}": rows[key] for key in _ROW}


def _width(examples: list, block_size: int) -> int:
    """The longest example rounded up to a multiple of 16, at most block_size: each row holds one
    response, and padding every row to the context would waste compute."""
    longest = max((len(x) for x, _, _ in examples), default=1)
    return min(block_size, -(-longest // 16) * 16)


def pair_rows(pairs: Sequence[Pair], tokenizer: Tokenizer, block_size: int) -> Rows:
    """chosen_* and rejected_* rows ([n, width]: inputs, targets, loss_weights, segment_ids,
    positions) and `valid` [n] (1: a real pair; the trainers pad batches with 0s)."""
    chosen = [response_example(p.prompt, p.chosen, tokenizer, block_size) for p in pairs]
    rejected = [response_example(p.prompt, p.rejected, tokenizer, block_size) for p in pairs]
    width = _width(chosen + rejected, block_size)
    rows = {**_encode(chosen, tokenizer, width, "chosen_"), **_encode(rejected, tokenizer, width, "rejected_")}
    rows["valid"] = np.ones(len(pairs), np.float32)
    return rows


def feedback_rows(records: Sequence[Feedback], tokenizer: Tokenizer, block_size: int) -> Rows:
    """Rows of each record (no prefix) and kl_* rows of its prompt with the next record's response:
    the mismatched pairs KTO estimates its KL reference point on (as TRL does); `desirable` and
    `valid` [n]."""
    n = len(records)
    own = [response_example(r.prompt, r.response, tokenizer, block_size) for r in records]
    mismatched = [
        response_example(r.prompt, records[(i + 1) % n].response, tokenizer, block_size) for i, r in enumerate(records)
    ]
    width = _width(own + mismatched, block_size)
    rows = {**_encode(own, tokenizer, width, ""), **_encode(mismatched, tokenizer, width, "kl_")}
    rows["desirable"] = np.asarray([r.desirable for r in records], np.float32)
    rows["valid"] = np.ones(n, np.float32)
    return rows


# ----------------------------------------------------------------------------- log-probabilities


def logprobs(
    model: Any, params: Any, batch: dict, prefixes: Sequence[str], train: bool = False, rng: jax.Array | None = None
) -> list[tuple[jax.Array, jax.Array]]:
    """(sum, token count) of the response log-probabilities of each prefix's rows, [b] each, from
    one forward pass over all of them stacked (one compiled program, one weight read)."""
    stack = lambda key: jnp.concatenate([batch[p + key] for p in prefixes], axis=0)
    logits = model.apply(
        {"params": params},
        stack("inputs"),
        stack("positions"),
        stack("segment_ids"),
        train=train,
        rngs={"dropout": rng} if train else None,
    )
    sums, counts = losses.sequence_logprobs(logits, stack("targets"), stack("loss_weights"))
    return list(zip(jnp.split(sums, len(prefixes)), jnp.split(counts, len(prefixes))))


def add_reference_logprobs(
    model: Any, params: Any, rows: Rows, prefixes: Sequence[str], batch_size: int, log=print
) -> Rows:
    """`rows` with ref_<prefix>logp [n] (summed response log-probabilities under `params`) added,
    computed once in fixed-size chunks (the last padded: one compilation)."""
    n = len(rows["valid"])
    forward = jax.jit(lambda p, b: [s for s, _ in logprobs(model, p, b, prefixes)])
    out = {p: np.zeros(n, np.float32) for p in prefixes}
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        chunk = {k: v[index] for k, v in rows.items()}
        real = min(batch_size, n - start)
        for prefix, sums in zip(prefixes, forward(params, chunk)):
            out[prefix][start : start + real] = np.asarray(jax.device_get(sums))[:real]
    log(f"reference log-probabilities of {n} records computed once from the starting parameters")
    return {**rows, **{f"ref_{p}logp": v for p, v in out.items()}}


# ----------------------------------------------------------------------------- objectives


LossSums = Callable[[Any, dict, Any, bool], dict]


def dpo_objective(model: Any, beta: float, loss_type: str, label_smoothing: float) -> LossSums:
    """DPO / IPO / conservative DPO on pair rows with stored reference log-probabilities; IPO
    compares per-token means (as TRL does), the others sums."""

    def loss_sums(params, batch, rng, train):
        (chosen, n_chosen), (rejected, n_rejected) = logprobs(
            model, params, batch, ("chosen_", "rejected_"), train, rng
        )
        ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        if loss_type == "ipo":
            chosen, ref_chosen = chosen / jnp.maximum(n_chosen, 1), ref_chosen / jnp.maximum(n_chosen, 1)
            rejected, ref_rejected = rejected / jnp.maximum(n_rejected, 1), ref_rejected / jnp.maximum(n_rejected, 1)
        return losses.dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, batch["valid"], beta, loss_type, label_smoothing
        )

    return loss_sums


def orpo_objective(model: Any, beta: float) -> LossSums:
    """ORPO on pair rows: no reference model, per-token mean log-probabilities."""

    def loss_sums(params, batch, rng, train):
        (chosen, n_chosen), (rejected, n_rejected) = logprobs(
            model, params, batch, ("chosen_", "rejected_"), train, rng
        )
        return losses.orpo_loss(
            chosen / jnp.maximum(n_chosen, 1), rejected / jnp.maximum(n_rejected, 1), batch["valid"], beta
        )

    return loss_sums


def kto_objective(model: Any, beta: float, desirable_weight: float, undesirable_weight: float) -> LossSums:
    """KTO on feedback rows with stored reference log-probabilities; the reference point is the
    batch's mismatched-pair log-ratio (`losses.kto_reference_point`)."""

    def loss_sums(params, batch, rng, train):
        (own, _), (mismatched, _) = logprobs(model, params, batch, ("", "kl_"), train, rng)
        z0 = losses.kto_reference_point(mismatched, batch["ref_kl_logp"], batch["valid"])
        return losses.kto_loss(
            own,
            batch["ref_logp"],
            batch["desirable"],
            batch["valid"],
            z0,
            beta,
            desirable_weight,
            undesirable_weight,
        )

    return loss_sums
