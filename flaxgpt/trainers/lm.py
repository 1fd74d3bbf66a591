"""Pure step functions shared by every trainer (pretraining, SFT, the reward model).

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxgpt import lora
from flaxgpt.config import TrainConfig
from flaxgpt.losses import token_cross_entropy
from flaxgpt.state import TrainState

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
        if accum == 1:
            grads, sums = micro_grads(state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, inputs):
                index, micro_batch = inputs
                grads, sums = micro_grads(state.params, micro_batch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = jax.tree.map(
                jnp.zeros_like, jax.eval_shape(micro_grads, state.params, jax.tree.map(lambda x: x[0], micro), rng)
            )
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))

        weight = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = sums["loss_sum"] / weight
        grad_norm = optax.tree.norm(grads)

        # A non-finite loss or gradient leaves parameters and optimizer state untouched. A
        # conditional, not a select per leaf: choosing between the old and new values of donated
        # buffers made XLA copy every parameter and moment before updating it in place.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(
            finite, apply_update, lambda params, opt_state: (params, opt_state), state.params, state.opt_state
        )
        applied_updates = state.step - state.skipped
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
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
