"""ORPO (Hong et al. 2024): SFT on the chosen answer and an odds-ratio preference term in one
stage, on `pairs` (or `rankings`); no reference model, so nothing is computed before training.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flaxgpt import losses, preference
from flaxgpt.config import Config


def orpo_objective(model: Any, beta: float):
    """LossSums of ORPO on pair rows (per-token mean log-probabilities)."""

    def loss_sums(params, batch, rng, train):
        (chosen, n_chosen), (rejected, n_rejected) = preference.logprobs(
            model, params, batch, ("chosen_", "rejected_"), train, rng
        )
        mean_chosen, mean_rejected = chosen / jnp.maximum(n_chosen, 1.0), rejected / jnp.maximum(n_rejected, 1.0)
        return losses.orpo_loss(mean_chosen, mean_rejected, preference.column(batch, "valid"), beta)

    return loss_sums


def method(cfg: Config) -> preference.Method:
    """What fit_preference trains (also what flaxgpt.compile compiles)."""
    beta = cfg.orpo.beta
    return preference.Method(
        kind="pairs",
        objective=lambda model: orpo_objective(model, beta),
        reference=(),
        describe=f"ORPO (beta {beta:g})",
    )


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    return preference.fit_preference(cfg, workdir, method(cfg))
