"""The train state: one pytree holding everything a resumed run needs, created sharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flaxgpt.sharding import logical_shardings, sharded_abstract, unbox_shapes


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates taken (int32, replicated)
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so no key is ever reused
    skipped: jax.Array  # steps skipped for a non-finite loss or gradient


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    example_tokens: jax.Array,
    mesh: Mesh,
    rules: tuple,
    seed: int,
    params: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, Any]:
    """Initialise parameters and optimizer state directly into their shardings.

    The init runs under `jax.jit` with output shardings derived from the
    parameters' logical axis names, so no full copy ever sits on one device.
    `params`, if given, maps the parameter shardings to existing parameters (a
    fine-tuning start, e.g. loaded from another run); only the optimizer state
    and the key are then initialised. Returns (state, state_shardings).
    """
    init_fn = _boxed_init(model, optimizer, example_tokens, seed)
    abstract = jax.eval_shape(init_fn)
    shardings = unbox_shapes(logical_shardings(abstract, mesh, rules))
    start = None if params is None else params(shardings.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if params is None:
            state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
        else:

            def from_params(p):
                return TrainState(
                    step=jnp.zeros((), jnp.int32),
                    params=p,
                    opt_state=optimizer.init(p),
                    rng=jax.random.split(jax.random.PRNGKey(seed))[1],
                    skipped=jnp.zeros((), jnp.int32),
                )

            state = jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(start)
    return state, shardings


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    example_tokens: jax.Array,
    mesh: Mesh,
    rules: tuple,
) -> tuple[Any, Any]:
    """(ShapeDtypeStructs with shardings, shardings): the target for a checkpoint restore."""
    return sharded_abstract(jax.eval_shape(_boxed_init(model, optimizer, example_tokens, 0)), mesh, rules)


def _boxed_init(model, optimizer, example_tokens, seed) -> Callable[[], TrainState]:
    def init() -> TrainState:
        key = jax.random.PRNGKey(seed)
        params_key, state_key = jax.random.split(key)
        params = model.init({"params": params_key}, example_tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=state_key,
            skipped=jnp.zeros((), jnp.int32),
        )

    return init
