"""Preference data and objectives for DPO, KTO and ORPO, as a library the trainers share.

Records (`pairs`, `rankings` expanded to every better/worse pair, thumbs-up/down `feedback`)
become fixed-shape rows: prompt + response rendered through the chat template (so text from
users or data never becomes a special token), loss weights 1 on the response and its closing
<|end|> only. A response's log-probability is the sum over those tokens
(`losses.sequence_logprobs`).

The reference model's log-probabilities are computed once, before training, from the
starting parameters and stored in the rows (`add_reference_logprobs`): the run holds one copy
of the weights, and with LoRA the adapters start at zero, so the start is the base model
with adapters off. With data.source=tokens (rows written by `python -m flaxgpt.data.prepare
--pairs` or `--feedback`) the rows stream from disk and the reference columns are computed at
every start over them, a chunk at a time: a resumed run recomputes the same columns from the
same start, and memory holds 4 bytes per record and prefix, not the rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt import losses
from flaxgpt.config import Config
from flaxgpt.conversations import conversation_example, record_prompt
from flaxgpt.data import world as world_lib
from flaxgpt.data.jsonl import DataError, comparison_schema, read_jsonl
from flaxgpt.data.packing import PackedRows, build_rows
from flaxgpt.data.rows import StreamedRows, prepared_rows
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.data.world import WorldTask
from flaxgpt.metrics import answer_metrics
from flaxgpt.model import Transformer
from flaxgpt.rewards import Ranking, padded_width
from flaxgpt.state import abstract_train_state
from flaxgpt.trainers.scaffold import Runtime, fit, starting_point
from flaxgpt.trainers.step import Objective, lm_run_spec, make_eval_step

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
    return padded_width(max((len(x) for x, _, _ in examples), default=1), block_size)


def pair_rows(pairs: Sequence[Pair], tokenizer: Tokenizer, block_size: int, width: int = 0) -> Rows:
    """chosen_* and rejected_* rows ([n, width]: inputs, targets, loss_weights, segment_ids,
        positions) and `valid` [n, 1] (1: a real pair). Per-record values are [n, 1] columns, as the
    batch sharding splits rows of rank 2 and more (`column` reads them back). width 0: the
    longest response's (rows on disk are all block_size wide)."""
    chosen = [response_example(p.prompt, p.chosen, tokenizer, block_size) for p in pairs]
    rejected = [response_example(p.prompt, p.rejected, tokenizer, block_size) for p in pairs]
    width = width or _width(chosen + rejected, block_size)
    rows = {**_encode(chosen, tokenizer, width, "chosen_"), **_encode(rejected, tokenizer, width, "rejected_")}
    rows["valid"] = np.ones((len(pairs), 1), np.float32)
    return rows


def feedback_rows(records: Sequence[Feedback], tokenizer: Tokenizer, block_size: int, width: int = 0) -> Rows:
    """Rows of each record (no prefix) and kl_* rows of its prompt with the next record's response:
    the mismatched pairs KTO estimates its KL reference point on (as TRL does); `desirable` and
    `valid` [n, 1]."""
    n = len(records)
    own = [response_example(r.prompt, r.response, tokenizer, block_size) for r in records]
    mismatched = [
        response_example(r.prompt, records[(i + 1) % n].response, tokenizer, block_size) for i, r in enumerate(records)
    ]
    width = width or _width(own + mismatched, block_size)
    rows = {**_encode(own, tokenizer, width, ""), **_encode(mismatched, tokenizer, width, "kl_")}
    rows["desirable"] = np.asarray([r.desirable for r in records], np.float32).reshape(n, 1)
    rows["valid"] = np.ones((n, 1), np.float32)
    return rows


# ----------------------------------------------------------------------------- log-probabilities


def column(batch: dict, key: str) -> jax.Array:
    """A per-record value [b] of a batch (stored as a [b, 1] column)."""
    return batch[key][:, 0]


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


def reference_forward(model: Any, prefixes: Sequence[str]) -> Callable:
    """(params, batch) -> summed response log-probabilities [b] of each prefix's rows, jitted; one
    per model and prefixes, so a caller scoring many row sets (the online learner, every update)
    compiles it once per shape."""
    return _reference_forward(model, tuple(prefixes))


@functools.cache
def _reference_forward(model: Any, prefixes: tuple[str, ...]) -> Callable:
    return jax.jit(lambda p, b: [s for s, _ in logprobs(model, p, b, prefixes)])


def add_reference_logprobs(
    model: Any, params: Any, rows: Rows, prefixes: Sequence[str], batch_size: int, log: Callable[[str], None] = print
) -> Rows:
    """`rows` with ref_<prefix>logp [n, 1] (summed response log-probabilities under `params`) added."""
    fetch = lambda index: {k: v[index] for k, v in rows.items()}
    return {**rows, **reference_columns(model, params, len(rows["valid"]), fetch, prefixes, batch_size, log)}


def reference_columns(
    model: Any, params: Any, n: int, fetch: Callable, prefixes: Sequence[str], batch_size: int, log: Callable
) -> Rows:
    """ref_<prefix>logp [n, 1] of the n rows fetch(index) gives, computed once in fixed-size chunks
    (the last padded: one compilation); streamed rows are read a chunk at a time, so memory is a
    chunk's rows plus 4 bytes per record and prefix."""
    forward = reference_forward(model, prefixes)
    out = {p: np.zeros((n, 1), np.float32) for p in prefixes}
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        real = min(batch_size, n - start)
        for prefix, sums in zip(prefixes, forward(params, fetch(index))):
            out[prefix][start : start + real, 0] = np.asarray(jax.device_get(sums))[:real]
    log(f"reference log-probabilities of {n} records computed once from the starting parameters")
    return {f"ref_{p}logp": v for p, v in out.items()}


# ----------------------------------------------------------------------------- records


def pairs_from_records(records: Sequence[dict]) -> list[Pair]:
    """`pairs` records, or `rankings` records expanded to every better/worse pair (ties: none)."""
    out: list[Pair] = []
    for record in records:
        ranking = Ranking.from_record(record)
        out += pairs_of(ranking.prompt, ranking.responses, ranking.ranks)
    return out


def feedback_of(record: dict) -> Feedback:
    """The Feedback of one `feedback` record."""
    return Feedback(record_prompt(record), record["response"], record["label"])


def _split(items: list, where: str, fraction: float) -> tuple[list, list]:
    cut = int(len(items) * fraction)
    if cut < 1 or cut >= len(items):
        raise DataError(
            f"{where}: {len(items)} record(s) cannot be split into train and validation; "
            "add records or set data.val_path"
        )
    return items[:cut], items[cut:]


def jsonl_items(cfg: Config, kind: str, log: Callable[[str], None]) -> tuple[list, list]:
    """(train, validation) Pairs ('pairs') or Feedback ('feedback') from data.path (and data.val_path)."""
    data = cfg.data

    def read(path: str) -> list:
        schema = "feedback" if kind == "feedback" else comparison_schema(path, "pairs")
        records, report = read_jsonl(path, schema, data.on_error)
        log(report.summary())
        return list(map(feedback_of, records)) if kind == "feedback" else pairs_from_records(records)

    items = read(data.path)
    return (items, read(data.val_path)) if data.val_path else _split(items, data.path, data.train_fraction)


def world_items(task: WorldTask, kind: str, n: int, stream: str) -> list:
    """World questions with answers judged by the oracle: Pairs (the correct answer over a wrong
    or sloppy one) or Feedback (a demonstration that is correct half of the time, thumbs up
    when the labeler gives it full marks)."""
    rng, items = task.rng(stream), []
    for _ in range(n):
        question, truth = world_lib.random_question(task.world, rng)
        if kind == "pairs":
            items.append(Pair(task.prompt(question), truth, world_lib.demonstration(task.world, question, rng, 1.0)))
        else:
            answer = world_lib.demonstration(task.world, question, rng, 0.5)
            items.append(Feedback(task.prompt(question), answer, task.label(question, answer) == 1.0))
    return items


def encodable(items: list, rows: Callable, tokenizer: Tokenizer, cfg: Config, where: str, log) -> Rows:
    """rows(items that fit the context); a record that does not is a DataError (or skipped and counted)."""
    block, kept = cfg.model.block_size, []
    for index, item in enumerate(items):
        try:
            rows([item], tokenizer, block)
            kept.append(item)
        except ValueError as e:
            if cfg.data.on_error == "raise":
                raise DataError(f"{where}: record {index}: {e} (data.on_error=skip skips it)") from e
    if len(kept) < len(items):
        log(f"{where}: {len(items) - len(kept)} record(s) too long for the context skipped")
    if not kept:
        raise DataError(f"{where}: no record fits model.block_size={block}")
    return rows(kept, tokenizer, block)


# ----------------------------------------------------------------------------- the run


@dataclass
class Method:
    """What a preference trainer hands `fit_preference`."""

    kind: str  # "pairs" or "feedback": the records it learns from
    objective: Callable[[Any], Callable]  # model -> LossSums (params, batch, rng, train) -> sums
    reference: tuple[str, ...]  # row prefixes whose reference log-probabilities it needs ((): none)
    describe: str


def fit_preference(cfg: Config, workdir: str, method: Method) -> dict[str, Any]:
    """Train the SFT policy of train.init_from with `method` to train.max_steps (resuming if
    possible); validation: the loss and its ratios on held-out records, and on the world the
    greedy answers' task accuracy on SFT's held-out questions."""
    rt = Runtime.create(cfg, workdir)
    notes: list[str] = []
    eval_batch = cfg.eval.batch_size or cfg.train.batch_size
    task = WorldTask.from_config(cfg) if cfg.data.source == "world" else None
    items, where = None, "world records"
    if task is not None:
        train = world_items(task, method.kind, cfg.data.world_preferences, "preference")
        items = (train, world_items(task, method.kind, max(cfg.eval.iters, 1) * eval_batch, "preference_val"))
    elif cfg.data.source == "jsonl":
        items, where = jsonl_items(cfg, method.kind, notes.append), cfg.data.path
    cfg, tokenizer, init_params = starting_point(cfg, rt, lambda: "")
    model = Transformer(cfg.model)
    train_set, val_set = _row_sets(cfg, rt, model, init_params, method, tokenizer, items, where, notes.append)
    loss_sums = method.objective(model)
    eval_step = jax.jit(make_eval_step(model, loss_sums))
    eval_iters = min(cfg.eval.iters, -(-val_set.n // eval_batch))
    questions = task.demonstrations("sft_val", cfg.sft.eval_examples, 0.0) if task is not None else []

    def evaluate(params: Any) -> dict[str, float]:
        figures = rt.validation(
            eval_step, params, lambda i, rows: val_set.batch(i, eval_batch, rows), eval_iters, eval_batch
        )
        if questions:
            answers = answer_metrics(model, params, tokenizer, questions, cfg, task.label)
            figures.update({f"val_{k}": v for k, v in answers.items() if k in ("task_accuracy", "labeler_score")})
        return figures

    batch = cfg.train.batch_size
    objective = Objective(
        loss_sums=loss_sums,
        train_batch=lambda step, rows: train_set.batch(step, batch, rows),
        evaluate=evaluate,
        position=lambda step: train_set.position(step, batch),
    )
    description = f"{method.describe} on {train_set.n} {method.kind} records"
    spec = lm_run_spec(cfg, rt, model, objective, init_params=init_params, description=description)
    spec.notes = notes
    return fit(cfg, rt, spec)


def _row_sets(cfg, rt, model, init_params, method, tokenizer, items, where, log) -> list:
    """(train, validation) rows with their reference log-probabilities: the records' `items` (in
    memory), or with items None data.path's prepared rows (data.source=tokens, streamed; the
    reference columns, 4 bytes per record and prefix, are all they add to memory)."""
    if items is None:
        sets = prepared_rows(cfg, tokenizer)
        sizes = [(s.n, s.source.rows) for s in sets]
    else:
        rows_of = pair_rows if method.kind == "pairs" else feedback_rows
        rows = [encodable(x, rows_of, tokenizer, cfg, w, log) for x, w in zip(items, (where, where + " (validation)"))]
        sizes = [(len(r["valid"]), lambda index, r=r: {k: v[index] for k, v in r.items()}) for r in rows]
    columns = (
        _with_reference(cfg, rt, model, init_params, method.reference, sizes, log) if method.reference else [{}] * 2
    )
    if items is None:
        return [StreamedRows(s.source, s.seed, c) for s, c in zip(sets, columns)]
    return [PackedRows({**r, **c}, cfg.train.seed + i) for i, (r, c) in enumerate(zip(rows, columns))]


def _with_reference(cfg, rt, model, init_params, prefixes, sizes, log) -> list[Rows]:
    """The reference log-probability columns of each (n, fetch) row set, from the starting
    parameters (with LoRA: the base, the adapters starting at zero), loaded once and dropped
    afterwards. Computed once per start rather than per step: the run then holds one copy of the
    weights, and a resumed run recomputes the same columns from the same start."""
    example = jnp.zeros((1, cfg.model.block_size), jnp.int32)
    shardings = abstract_train_state(model, optax.identity(), example, rt.mesh, rt.rules)[1].params
    params = init_params(shardings)
    size = cfg.eval.batch_size or cfg.train.batch_size
    with rt.context():
        return [reference_columns(model, params, n, fetch, prefixes, size, log) for n, fetch in sizes]


def dpo_objective(model: Any, beta: float, loss_type: str, label_smoothing: float):
    """LossSums of DPO / IPO / cDPO on pair rows; IPO compares per-token means (as TRL does)."""

    def loss_sums(params, batch, rng, train):
        (chosen, n_chosen), (rejected, n_rejected) = logprobs(
            model, params, batch, ("chosen_", "rejected_"), train, rng
        )
        ref_chosen, ref_rejected, valid = (column(batch, k) for k in ("ref_chosen_logp", "ref_rejected_logp", "valid"))
        if loss_type == "ipo":
            per_c, per_r = jnp.maximum(n_chosen, 1.0), jnp.maximum(n_rejected, 1.0)
            chosen, ref_chosen = chosen / per_c, ref_chosen / per_c
            rejected, ref_rejected = rejected / per_r, ref_rejected / per_r
        return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, valid, beta, loss_type, label_smoothing)

    return loss_sums


def kto_objective(model: Any, beta: float, desirable_weight: float, undesirable_weight: float):
    """LossSums of KTO on feedback rows with stored reference log-probabilities."""

    def loss_sums(params, batch, rng, train):
        (own, _), (mismatched, _) = logprobs(model, params, batch, ("", "kl_"), train, rng)
        ref, ref_kl, desirable, valid = (column(batch, k) for k in ("ref_logp", "ref_kl_logp", "desirable", "valid"))
        z0 = losses.kto_reference_point(mismatched, ref_kl, valid)
        return losses.kto_loss(own, ref, desirable, valid, z0, beta, desirable_weight, undesirable_weight)

    return loss_sums
