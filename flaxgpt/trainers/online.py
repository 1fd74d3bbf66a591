"""The online learner: the served model keeps learning from its users' thumbs while it serves.

    python -m flaxgpt.train -e online_feedback --workdir runs/online     # from runs/chat_demo/sft
    python -m flaxgpt.serve --workdir runs/online --reload-every 5       # beside it

The first start saves train.init_from's parameters as step 0 and promotes them. Then, whenever
the feedback database holds at least online.min_events ratings newer than the cursor, one
update: KTO on the rated answers (and corrections), online.sft_weight times their thumbs-up
ones' log-likelihood, DPO on the new up-vs-down / regenerated / corrected pairs
(`flaxgpt.online`), plus online.replay rehearsed questions of earlier updates with their
best-supported answers; one pass over them (about online.steps_per_update steps: an update
reads no more ratings than fill them, so a slow learner lags but skips none). The learner is
continual: each update continues the newest candidate's train state (parameters and optimizer
state), promoted or not, so that what accumulates over many updates (rehearsal included) is
kept; the promoted (served) parameters are the reference of KTO and DPO (the KL anchor: a few
bad clicks move the model a bounded way from what is served), and after online.restart_after
rejected candidates in a row the next update starts again from them. The optimizer's schedule
runs over the learner's life, not per update. The candidate is saved with the
cursor and the rows it used; then the guard compares it with the promoted model (greedy
accuracy on held-out world questions, loss on held-out thumbs-up answers, accuracy on held-out
pairs, each compared on the same data): more than online.max_regression (points) or
online.max_loss_rise (relative loss) worse and it is kept but not promoted. A kill at any
point resumes from the newest checkpoint's cursor.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt import lora, online
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, to_dict
from flaxgpt.data.packing import PackedRows
from flaxgpt.data.world import WorldTask
from flaxgpt.logging import MetricsLogger
from flaxgpt.metrics import answer_metrics
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.preference import (
    add_reference_logprobs,
    dpo_objective,
    encodable,
    feedback_rows,
    kto_objective,
    pair_rows,
)
from flaxgpt.runs import boxed_params, restore_params
from flaxgpt.sharding import host_value, sharded_abstract
from flaxgpt.state import abstract_train_state, create_train_state
from flaxgpt.trainers.scaffold import Interrupted, Runtime, _StopSignals, exit_code, starting_point
from flaxgpt.trainers.step import make_train_step

MIN_PAIRS = 32  # held-out pairs the guard's pair accuracy needs to count


def online_objective(model: Any, cfg: Config):
    """KTO on the batch's feedback rows, plus online.sft_weight times the thumbs-up rows' negative
    log-likelihood (KTO alone barely moves a thumbs-up answer's likelihood; the SFT term is what
    teaches the rated and corrected answers), plus DPO on its pair rows (when the update has pairs)."""
    kto = kto_objective(model, cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    dpo = dpo_objective(model, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
    weight = cfg.online.sft_weight

    def loss_sums(params, batch, rng, train):
        sums = kto(params, batch, rng, train)
        up_logp, ups = sums["ratios"]["chosen_logp"]  # summed over the thumbs-up rows, with its gradient
        ratios = {**sums["ratios"], "sft_nll": (-up_logp, ups)}
        sums = {**sums, "loss_sum": sums["loss_sum"] - weight * up_logp, "ratios": ratios}
        if "chosen_inputs" in batch:
            pairs = dpo(params, {**batch, "valid": batch["pair_valid"]}, rng, train)
            sums = {
                "loss_sum": sums["loss_sum"] + pairs["loss_sum"],
                "weight_sum": sums["weight_sum"] + pairs["weight_sum"],
                "ratios": {**sums["ratios"], **{f"pair_{k}": v for k, v in pairs["ratios"].items()}},
            }
        return sums

    return loss_sums


class Learner:
    """The learner's run: its model, checkpoints, guard questions and logs."""

    def __init__(self, cfg: Config, workdir: str):
        # a candidate is judged only once its save has finished
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=False))
        self.rt = Runtime.create(cfg, workdir)
        self.cfg, self.tokenizer, self.init_params = starting_point(cfg, self.rt, lambda: "")
        self.workdir, self.model = workdir, Transformer(self.cfg.model)
        self.db = cfg.online.db or os.path.join(workdir, "feedback.sqlite")
        self.checkpointer = Checkpointer(workdir, cfg.checkpoint)
        task = WorldTask.from_config(cfg) if cfg.data.source == "world" else None
        self.guard = task.demonstrations("ppo_eval", cfg.online.guard_questions, 0.0) if task else []
        self.task = task
        self.kept: dict[int, Any] = {}  # `params`
        self.newest: tuple[int, Any] | None = None  # (step, train state) of the candidate just saved
        self.shardings = sharded_abstract(boxed_params(self.model), self.rt.mesh, self.rt.rules)[1]
        n = cfg.online.steps_per_update
        self.optimizer = build_optimizer(cfg.optimizer, n, lora.trainable_mask if self.cfg.model.lora_rank else None)
        step = make_train_step(
            self.model,
            self.optimizer,
            learning_rate_schedule(cfg.optimizer, n),
            cfg.train,
            online_objective(self.model, cfg),
        )
        self.train_step = jax.jit(step, donate_argnums=0)
        # a restart keeps the rows logged up to the newest checkpoint (what a kill left past it goes)
        resumed = self.checkpointer.latest_step() or 0
        self.logger = MetricsLogger(workdir, cfg.logging, 0, resumed, to_dict(self.cfg))
        self.logger.shown = ("loss", "events", "pairs", "accuracy", "up_loss", "promoted")

    def scores(self, params: Any, held: tuple[list, list], accuracy: bool = True) -> dict[str, float]:
        """The guard's figures: greedy task accuracy on held-out world questions (on the world,
        unless not `accuracy`), the loss (per token) of held-out thumbs-up answers and the share of
        held-out pairs whose chosen answer is the likelier."""
        out, size = {}, self.cfg.train.batch_size
        if self.task is not None and accuracy:
            metrics = answer_metrics(self.model, params, self.tokenizer, self.guard, self.cfg, self.task.label)
            out["accuracy"] = metrics["task_accuracy"]
        records, pairs = held
        if records:
            rows = feedback_rows(records, self.tokenizer, self.cfg.model.block_size)
            sums = add_reference_logprobs(self.model, params, rows, ("",), size, lambda _: None)["ref_logp"]
            out["up_loss"] = float(-sums.sum() / max(rows["loss_weights"].sum(), 1.0))
        if pairs:
            rows = pair_rows(pairs, self.tokenizer, self.cfg.model.block_size)
            rows = add_reference_logprobs(self.model, params, rows, ("chosen_", "rejected_"), size, lambda _: None)
            out["pair_accuracy"] = float(np.mean(rows["ref_chosen_logp"] > rows["ref_rejected_logp"]))
            out["pairs"] = len(pairs)
        return out

    def served_scores(self, base: int, held: tuple[list, list]) -> dict[str, float]:
        """The promoted model's figures on `held`; its guard accuracy is the one logged when it was
        promoted (the same questions: one greedy pass per candidate, not two)."""
        logged = [d for d in online.decisions(self.workdir) if d["step"] == base and d.get("promoted")]
        known = logged[-1]["score"].get("accuracy") if logged else None
        same = bool(logged) and logged[-1].get("guard_questions") == len(self.guard)
        out = self.scores(self.params(base), held, accuracy=known is None or not same)
        return out if known is None or not same else {"accuracy": known, **out}

    def params(self, step: int) -> Any:
        """A checkpoint's parameters, read as the server reads them (a manager of its own); the
        last two read are kept (the promoted one, the reference, is read again only after a
        promotion). Never donated: a train state is read apart (`state`)."""
        if step not in self.kept:
            rt = self.rt
            params = restore_params(self.workdir, self.cfg, step, self.cfg.model, rt.mesh, rt.rules)[0]
            self.kept = {**dict(list(self.kept.items())[-1:]), step: params}
        return self.kept[step]

    def trained(self, step: int) -> Any:
        """Checkpoint `step`'s parameters, from memory when this process has just trained it."""
        return self.newest[1].params if self.newest and self.newest[0] == step else self.params(step)

    def record(self, step: int, used: dict, base: int) -> dict:
        return {"step": step, "model": to_dict(self.cfg.model), "online": {**used, "base_step": base}}

    def close(self) -> None:
        self.checkpointer.close()
        self.logger.close()

    def state(self, step: int) -> Any:
        """Checkpoint `step`'s train state, parameters and optimizer state, to continue from (to be
        donated): the one in memory when this process has just trained it, else read."""
        newest, self.newest = self.newest, None
        if newest and newest[0] == step:
            return newest[1]
        example = jnp.zeros((1, self.cfg.model.block_size), jnp.int32)
        abstract = abstract_train_state(self.model, self.optimizer, example, self.rt.mesh, self.rt.rules)[0]
        return self.checkpointer.restore(step, abstract, self.cfg.model)[0]

    def fresh_state(self, params: Any, seed: int) -> Any:
        """A train state on `params` (taken over: donated) with a fresh optimizer."""
        example = jnp.zeros((1, self.cfg.model.block_size), jnp.int32)
        rt = self.rt
        return create_train_state(self.model, self.optimizer, example, rt.mesh, rt.rules, seed, lambda _: params)[0]


def start(learner: Learner) -> int:
    """The newest checkpoint's step, after saving train.init_from's parameters as step 0 on a
    first start and deciding on a candidate that a kill left undecided."""
    ck = learner.checkpointer
    if ck.latest_step() is None:
        learner.rt.write_config(learner.cfg)
        with learner.rt.context():
            state = learner.fresh_state(learner.init_params(learner.shardings), learner.cfg.train.seed)
        used = {"cursor": 0, "from_cursor": 0, "rating_ids": [], "pairs": []}
        ck.save(0, state, learner.record(0, used, 0), force=True)
    latest = ck.latest_step()
    decide(learner, latest)
    return latest


def decide(learner: Learner, step: int) -> None:
    """Log whether checkpoint `step` is promoted (once: a decision already logged stands)."""
    workdir = learner.workdir
    if any(d["step"] == step for d in online.decisions(workdir)):
        online.sync_marker(workdir)
        return
    record = learner.checkpointer.read_record(step)["online"]
    # held-out rows are never trained on: the newest of them, past the cursor too, judge it
    held = online.held_out(learner.db, None, learner.cfg.online.guard_questions)
    with learner.rt.context():
        score = learner.scores(learner.trained(step), held)
        base = record["base_step"]
        before = learner.served_scores(base, held) if step else score
    worse = regressions(before, score, learner.cfg.online)
    promoted = step == 0 or all(by <= limit for by, limit in worse.values())
    shown = ", ".join(f"{k} {score[k]:.4f} (served {before[k]:.4f})" for k in score if k != "pairs")
    limits = "; ".join(f"{k} worse by {by:.4f} (max {limit:g})" for k, (by, limit) in worse.items())
    reason = "the starting model" if step == 0 else f"{limits or 'no figures'}: {shown}"
    decision = {"step": step, "base_step": base, "promoted": promoted, "score": score, "base_score": before}
    decision.update(guard_questions=len(learner.guard), events=len(record["rating_ids"]))
    decision.update(reason=reason, time=time.time())
    online.log_decision(workdir, decision)
    online.prune(learner.checkpointer.manager, workdir, learner.cfg.online.keep)
    learner.logger.log(step, {**score, "promoted": float(promoted)})
    learner.logger.message(f"step {step}: {'promoted' if promoted else 'kept, not promoted'}; {reason}")


def regressions(before: dict[str, float], after: dict[str, float], limits: Any) -> dict[str, tuple[float, float]]:
    """{figure: (how much worse `after` is, the most allowed)}: accuracy and pair accuracy drops
    (points, online.max_regression), the thumbs-up loss's relative rise (online.max_loss_rise).
    Pair accuracy counts only on at least MIN_PAIRS held-out pairs (on fewer, one pair moves it
    more than the threshold)."""
    out = {}
    if "accuracy" in after:
        out["accuracy"] = (before["accuracy"] - after["accuracy"], limits.max_regression)
    if after.get("pairs", 0) >= MIN_PAIRS:
        out["pair_accuracy"] = (before["pair_accuracy"] - after["pair_accuracy"], limits.max_regression)
    if "up_loss" in after:
        rise = (after["up_loss"] - before["up_loss"]) / max(before["up_loss"], 1e-6)
        out["up_loss"] = (rise, limits.max_loss_rise)
    return out


def update(learner: Learner, latest: int, stop: _StopSignals) -> int | None:
    """One update from the events after the newest checkpoint's cursor, saved and decided; its
    step, or None when there are too few events or none to train on. A stop signal abandons it (nothing is lost:
    the cursor has not moved)."""
    cfg, ck = learner.cfg, learner.checkpointer
    record = ck.read_record(latest)["online"]
    cursor = record["cursor"]
    if online.count_new(learner.db, cursor) < cfg.online.min_events:
        return None
    # about what one pass of the update's steps trains on, beside the rehearsed records: a learner
    # slower than its users lags behind rather than skipping events
    limit = max(cfg.online.steps_per_update * cfg.train.batch_size - cfg.online.replay, cfg.online.min_events)
    events = online.window(learner.db, cursor, record.get("message_cursor", 0), limit, lambda r: fitting(learner, r))
    if events is None:  # every new rating held out: wait for more
        return None
    replayed = online.replay(learner.db, cursor, events.message_cursor, cfg.online.replay, cfg.train.seed + latest)
    events.records += replayed
    base = online.promoted_step(learner.workdir)
    origin = continue_from(online.decisions(learner.workdir), latest, base, cfg.online.restart_after)
    with learner.rt.context():
        reference = learner.params(base)
        rows = training_rows(learner, events, reference)
        state, loss, steps = train(learner, rows, learner.state(origin), cfg.train.seed + latest, stop)
        step = latest + steps
        ck.save(step, state, learner.record(step, {**events.record(), "start_step": origin}, base), force=True)
        learner.newest = (step, state)
    figures = {"loss": loss, "events": len(events.rating_ids), "records": len(events.records)}
    figures.update(pairs=len(events.pairs), corrections=len(events.corrections), replayed=len(replayed))
    figures.update(cursor=events.hi, start_step=origin)
    learner.logger.log(step, figures)
    decide(learner, step)
    return step


def continue_from(decisions: list[dict], latest: int, promoted: int, restart_after: int) -> int:
    """The checkpoint whose train state (parameters and optimizer state) the next update continues:
    the newest one (`latest`, promoted or not: what a candidate the guard kept back learned is not
    thrown away), or the promoted one after every `restart_after` (online.restart_after; 0: never)
    rejected candidates in a row, so that a learner drifting away from what the guard accepts
    starts again from what it accepted."""
    rejected = 0
    for d in reversed([d for d in decisions if d["step"] > 0]):
        if d["promoted"]:
            break
        rejected += 1
    restart = restart_after and rejected and rejected % restart_after == 0
    return promoted if restart else latest


def fitting(learner: Learner, items: list, rows=feedback_rows) -> list:
    """The items that fit the context: all of them with data.on_error=raise (`encodable` then
    names the first that does not)."""
    if learner.cfg.data.on_error == "raise":
        return items
    return [x for x in items if _fits(rows, x, learner.tokenizer, learner.cfg.model.block_size)]


def _fits(rows, item: Any, tokenizer: Any, block_size: int) -> bool:
    try:
        rows([item], tokenizer, block_size)
        return True
    except ValueError:
        return False


def training_rows(learner: Learner, events: online.Events, reference: Any) -> list[dict]:
    """[feedback rows] (+ [pair rows], `valid` renamed `pair_valid`), each with the reference
    log-probabilities of `reference` (the promoted parameters)."""
    cfg, tok, size = learner.cfg, learner.tokenizer, learner.cfg.train.batch_size
    note = learner.logger.message
    out = [encodable(events.records, feedback_rows, tok, cfg, learner.db, note)]
    out[0] = add_reference_logprobs(learner.model, reference, out[0], ("", "kl_"), size, lambda _: None)
    if fitting(learner, events.pairs, pair_rows):
        pairs = encodable(events.pairs, pair_rows, tok, cfg, learner.db, note)
        pairs = add_reference_logprobs(learner.model, reference, pairs, ("chosen_", "rejected_"), size, lambda _: None)
        out.append({("pair_valid" if k == "valid" else k): v for k, v in pairs.items()})
    return out


def train(learner: Learner, rows: list[dict], state: Any, seed: int, stop: _StopSignals) -> tuple[Any, float, int]:
    """One pass over the update's records (more passes over a few events would fit their noise;
    `update` reads about online.steps_per_update batches of them) from train state `state`
    (taken over); (state, mean loss, steps)."""
    cfg, rt = learner.cfg, learner.rt
    size = cfg.train.batch_size
    sets = [PackedRows(r, seed + i) for i, r in enumerate(rows)]
    local, losses = rt.rows(size), []
    steps = -(-max(s.n for s in sets) // size)
    for i in range(steps):
        if stop.signame is not None:
            raise Interrupted(
                f"{stop.signame} during an update: abandoned; its events are read again on restart",
                exit_code(stop.signame),
            )
        batch = {k: v for s in sets for k, v in s.batch(i, size, local).items()}
        state, metrics = learner.train_step(state, rt.place(batch, size))
        losses.append(metrics["loss"])
    return state, float(sum(host_value(x) for x in losses) / len(losses)), steps


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    """Update whenever enough feedback arrived, until online.max_updates (0: until stopped)."""
    with _StopSignals() as stop:
        learner = Learner(cfg, workdir)
        try:
            stop.message = learner.logger.message
            latest = start(learner)
            learner.logger.message(
                f"flaxgpt {cfg.name} (online): learning from {learner.db} from step {latest} "
                f"(served: step {online.promoted_step(workdir)}); an update every {cfg.online.min_events} ratings"
            )
            while not done(cfg, workdir):
                step = update(learner, latest, stop)
                latest = step if step is not None else latest
                if step is None and not wait(cfg.online.poll_seconds, stop):
                    raise Interrupted(
                        f"{stop.signame} while waiting for feedback: nothing was pending", exit_code(stop.signame)
                    )
            return {"step": latest, "promoted_step": online.promoted_step(workdir)}
        finally:
            learner.close()


def done(cfg: Config, workdir: str) -> bool:
    limit = cfg.online.max_updates
    return bool(limit) and sum(d["step"] > 0 for d in online.decisions(workdir)) >= limit


def wait(seconds: float, stop: _StopSignals) -> bool:
    """Sleep `seconds` unless a stop signal comes; False when one came."""
    end = time.time() + seconds
    while stop.signame is None and time.time() < end:
        time.sleep(min(0.2, seconds))
    return stop.signame is None
