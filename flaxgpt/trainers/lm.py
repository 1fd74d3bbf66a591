"""Pure step functions for the language-modelling objective (pretraining, and SFT later).

`train_step(state, batch) -> (state, metrics)` is compiled once with the
state donated; gradient accumulation is a scan over micro-batches inside the
step, summing token-weighted losses so the result equals one large batch.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxgpt.config import TrainConfig
from flaxgpt.losses import token_cross_entropy
from flaxgpt.state import TrainState

Batch = dict[str, jax.Array]


def lm_loss_sums(model: nn.Module, params: Any, batch: Batch, z_loss: float,
                 train: bool, dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
    logits = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        train=train, rngs={"dropout": dropout_rng} if train else None,
    )
    return token_cross_entropy(logits, batch["targets"], batch["loss_weights"], z_loss)


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule, cfg: TrainConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    accum = cfg.grad_accum_steps

    def micro_grads(params, micro_batch, rng):
        def objective(p):
            sums = lm_loss_sums(model, p, micro_batch, cfg.z_loss, True, rng)
            return sums["loss_sum"] + sums["z_loss_sum"], sums

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

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, state.params,
                                                                jax.tree.map(lambda x: x[0], micro), rng))
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))

        tokens = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        loss = sums["loss_sum"] / tokens
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # A non-finite loss or gradient leaves parameters and optimizer state untouched.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        applied_updates = state.step - state.skipped
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "z_loss": sums["z_loss_sum"] / tokens,
            "grad_norm": grad_norm,
            "lr": schedule(applied_updates),
            "tokens": sums["weight_sum"],
            "skipped": new_state.skipped,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        sums = lm_loss_sums(model, params, batch, 0.0, False, None)
        return {"loss_sum": sums["loss_sum"], "weight_sum": sums["weight_sum"]}

    return eval_step
