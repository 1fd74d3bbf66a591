"""The step every language-model trainer uses (pretraining, SFT, the reward model), and the
`RunSpec` that runs it on the scaffold.

`train_step(state, batch) -> (state, metrics)` is compiled once with the state donated;
gradient accumulation is a scan over micro-batches inside the step, summing the loss
*sums* so the result equals one large batch exactly.

A trainer's objective is a `LossSums` function `(params, batch, rng, train) -> sums`:
  loss_sum     the summed loss (its gradient, divided by weight_sum, is the update)
  weight_sum   what the loss is averaged over (tokens for LMs, prompts for the RM)
  z_loss_sum   optional auxiliary term added to the objective
  ratios       optional {name: (numerator, denominator)} reported as numerator / denominator
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt import host_allocator, lora, mfu
from flaxgpt.config import Config, TrainConfig
from flaxgpt.data.prefetch import prefetch
from flaxgpt.losses import token_cross_entropy
from flaxgpt.model import count_params
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import host_value, place_batch
from flaxgpt.state import TrainState, abstract_train_state, create_train_state
from flaxgpt.trainers.scaffold import NonFiniteLoss, RunSpec, Runtime, StepFn, Throughput, adapter_base

Batch = dict[str, jax.Array]
LossSums = Callable[[Any, Batch, jax.Array | None, bool], dict[str, Any]]


def lm_loss_sums(
    model: nn.Module, params: Any, batch: Batch, z_loss: float, train: bool, dropout_rng: jax.Array | None
) -> dict[str, jax.Array]:
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        train=train,
        rngs={"dropout": dropout_rng} if train else None,
    )
    return token_cross_entropy(logits, batch["targets"], batch["loss_weights"], z_loss)


def lm_objective(model: nn.Module, z_loss: float = 0.0) -> LossSums:
    """Next-token cross-entropy weighted by `loss_weights` (pretraining; SFT on assistant tokens)."""
    return lambda params, batch, rng, train: lm_loss_sums(model, params, batch, z_loss if train else 0.0, train, rng)


def ratio_metrics(sums: dict[str, Any]) -> dict[str, jax.Array]:
    return {name: num / jnp.maximum(den, 1.0) for name, (num, den) in sums.get("ratios", {}).items()}


def accumulated_grads(micro_grads: Callable, params: Any, batch: Batch, rng: jax.Array, accum: int) -> tuple:
    """Summed (grads, sums) of `micro_grads` over `accum` equal slices of `batch`, one per scan step,
    each with its own key folded from `rng` (one call when accum == 1)."""
    if accum == 1:
        return micro_grads(params, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, inputs):
        index, micro_batch = inputs
        grads, sums = micro_grads(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, params, jax.tree.map(lambda x: x[0], micro), rng))
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return grads, sums


def updated_if_finite(optimizer: optax.GradientTransformation, state: TrainState, grads: Any, finite: jax.Array):
    """The state one step on: `grads` applied when `finite`, else parameters and optimizer state
    untouched and the step counted as skipped. A conditional, not a select per leaf: choosing
    between the old and new values of donated buffers made XLA copy every parameter and moment
    before updating it in place."""

    def apply_update(params, opt_state):
        updates, new_state = optimizer.update(grads, opt_state, params)
        # Adam's moments of bfloat16 parameters start in bfloat16 and come back float32: keep the
        # state's dtypes, so both branches of the cond (and the donated buffers) agree
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, opt_state)
        return optax.apply_updates(params, updates), new_state

    params, opt_state = jax.lax.cond(
        finite, apply_update, lambda params, opt_state: (params, opt_state), state.params, state.opt_state
    )
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped + (~finite).astype(jnp.int32)
    )


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: TrainConfig,
    loss_sums: LossSums | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jittable step; `loss_sums` defaults to the language-modelling objective."""
    accum = cfg.grad_accum_steps
    loss_sums = loss_sums or lm_objective(model, cfg.z_loss)

    adapters_only = bool(model.cfg.lora_rank)

    def micro_grads(params, micro_batch, rng):
        def objective(p):
            if adapters_only:  # the frozen base gets no weight gradients computed at all
                p = lora.freeze_base(p)
            sums = loss_sums(p, micro_batch, rng, True)
            return sums["loss_sum"] + sums.get("z_loss_sum", 0.0), sums

        return jax.grad(objective, has_aux=True)(params)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        grads, sums = accumulated_grads(micro_grads, state.params, batch, rng, accum)
        weight = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = sums["loss_sum"] / weight
        grad_norm = optax.tree.norm(grads)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied_updates = state.step - state.skipped
        new_state = updated_if_finite(optimizer, state, grads, finite)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(applied_updates),
            "tokens": sums["weight_sum"],
            "skipped": new_state.skipped,
            **ratio_metrics(sums),
        }
        if "z_loss_sum" in sums:
            metrics["z_loss"] = sums["z_loss_sum"] / weight
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, loss_sums: LossSums | None = None) -> Callable[[Any, Batch], dict[str, Any]]:
    """(params, batch) -> the objective's sums without dropout (summed over batches by the caller)."""
    loss_sums = loss_sums or lm_objective(model)

    def eval_step(params: Any, batch: Batch) -> dict[str, Any]:
        sums = loss_sums(params, batch, None, False)
        return {k: v for k, v in sums.items() if k != "z_loss_sum"}

    return eval_step


# ----------------------------------------------------------------------------- the LM run


@dataclass
class Objective:
    """What an LM trainer hands `lm_run_spec`."""

    loss_sums: LossSums | None  # None: next-token cross-entropy
    train_batch: Callable[[int, np.ndarray], dict[str, np.ndarray]]  # (step, this process's rows) -> rows
    evaluate: Callable[[Any], dict[str, float]]  # params -> validation figures (under the mesh)
    position: Callable[[int], dict] = lambda step: {"train_batches": step}  # recorded per checkpoint


class SkipGuard:
    """train.max_skipped_steps: says when updates were skipped, stops past the limit."""

    def __init__(self, limit: int):
        self.limit, self.seen, self.step = limit, 0, 0
        self.message: Callable[[str], None] = print

    def check(self, total: int, step: int) -> None:
        if total > self.seen:
            self.message(
                f"step {step}: {total - self.seen} update(s) skipped for a non-finite loss or "
                f"gradient ({total} in this run so far, limit {self.limit})"
            )
            self.seen = total
        if total > self.limit:
            raise NonFiniteLoss(
                f"{total} steps had a non-finite loss or gradient (train.max_skipped_steps={self.limit}); stopping"
            )


def lm_steps(
    cfg: Config, rt: Runtime, train_step: Callable, objective: Objective, guard: SkipGuard, start: int, message
) -> StepFn:
    """Steps of a jitted `train_step` on the objective's batches (prefetched, placed on the mesh);
    the skipped-update counter of each step is read while the next one runs."""
    tc = cfg.train
    rows = rt.rows(tc.batch_size)  # this process loads only these rows
    batches = prefetch(lambda step: objective.train_batch(step, rows), start, tc.max_steps, cfg.data.prefetch)
    guard.message, pending = message, []

    def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict]:
        _, local = next(batches)
        placed = place_batch(local, rows, rt.rows_sharding, tc.batch_size)
        if step == start:
            guard.seen = int(host_value(state.skipped))
            if advice := host_allocator.host_allocator_advice(train_step, state, placed):
                message(advice)
        state, metrics = train_step(state, placed)
        if pending:  # the previous step has finished, or nearly: reading it costs no stall
            guard.check(int(host_value(pending.pop())), step)
        pending.append(metrics["skipped"])
        guard.step = step + 1
        return state, metrics

    return step_fn


def lm_run_spec(
    cfg: Config,
    rt: Runtime,
    model: nn.Module,
    objective: Objective,
    *,
    init_params: Callable[[Any], Any] | None = None,
    description: str = "",
) -> RunSpec:
    """The `RunSpec` of a run of `make_train_step` (pretraining, SFT, the reward model): a
    `TrainState`, batches that are a pure function of the step (prefetched), and
    train.max_skipped_steps checked at every step (on the previous step's counter: no sync)."""
    tc, model_cfg = cfg.train, model.cfg
    schedule = learning_rate_schedule(cfg.optimizer, tc.max_steps)
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps, lora.trainable_mask if model_cfg.lora_rank else None)
    example = jnp.zeros((1, model_cfg.block_size), jnp.int32)
    abstract = abstract_train_state(model, optimizer, example, rt.mesh, rt.rules)
    guard = SkipGuard(tc.max_skipped_steps)
    jit_step = lambda shardings: jax.jit(
        make_train_step(model, optimizer, schedule, tc, objective.loss_sums),
        in_shardings=(shardings, rt.rows_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )

    def row(metrics: dict) -> dict[str, float]:
        m = host_value(metrics)
        guard.check(int(m["skipped"]), guard.step)
        out = {k: float(v) for k, v in m.items() if k not in ("tokens", "skipped", "z_loss")}
        if tc.z_loss:
            out["z_loss"] = float(m["z_loss"])
        return out

    params = abstract[0].params
    origin = f"from {tc.init_from or tc.init_from_hf}" if init_params else "from scratch"
    if objective.loss_sums is None:  # a language model: every row is block_size tokens of compute
        trained = lora.count_trained(params) if model_cfg.lora_rank else None  # LoRA: no frozen weight grads
        flops = mfu.flops_per_token(model_cfg, count_params(params), trained)
        throughput = Throughput("tokens", model_cfg.block_size, flops, model_cfg.dtype)
    else:
        throughput = Throughput("examples", 1)
    return RunSpec(
        describe=f"{lora.describe_size(params, model_cfg.lora_rank)}, vocab {model_cfg.vocab_size}, "
        f"mesh {dict(rt.mesh.shape)}" + (f"; {description}" if description else ""),
        model_cfg=model_cfg,
        abstract_state=lambda: abstract,
        init_state=lambda shardings: create_train_state(
            model, optimizer, example, rt.mesh, rt.rules, tc.seed, init_params
        )[0],
        make_step=lambda shardings, start, message: lm_steps(
            cfg, rt, jit_step(shardings), objective, guard, start, message
        ),
        row=row,
        evaluate=lambda state: objective.evaluate(state.params),
        position=objective.position,
        origin=origin,
        throughput=throughput,
        lora_base=adapter_base(cfg, init_params),
    )
