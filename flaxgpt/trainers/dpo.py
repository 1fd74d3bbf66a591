"""DPO (Rafailov et al. 2023): learn preferences straight from `pairs` (or `rankings`, expanded
to pairs), no reward model and no sampling. The loss option gives IPO (Azar et al. 2023) and
conservative DPO (label smoothing). Reference log-probabilities come once from the SFT start
(`flaxgpt.preference`); the run holds one copy of the weights.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flaxgpt import losses, preference
from flaxgpt.config import Config


def dpo_objective(model: Any, beta: float, loss_type: str, label_smoothing: float):
    """LossSums of DPO / IPO / cDPO on pair rows; IPO compares per-token means (as TRL does)."""

    def loss_sums(params, batch, rng, train):
        (chosen, n_chosen), (rejected, n_rejected) = preference.logprobs(
            model, params, batch, ("chosen_", "rejected_"), train, rng
        )
        ref_chosen, ref_rejected, valid = (
            preference.column(batch, k) for k in ("ref_chosen_logp", "ref_rejected_logp", "valid")
        )
        if loss_type == "ipo":
            per_c, per_r = jnp.maximum(n_chosen, 1.0), jnp.maximum(n_rejected, 1.0)
            chosen, ref_chosen = chosen / per_c, ref_chosen / per_c
            rejected, ref_rejected = rejected / per_r, ref_rejected / per_r
        return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, valid, beta, loss_type, label_smoothing)

    return loss_sums


def method(cfg: Config) -> preference.Method:
    """What fit_preference trains (also what flaxgpt.compile compiles)."""
    d = cfg.dpo
    name = "IPO" if d.loss_type == "ipo" else ("conservative DPO" if d.label_smoothing else "DPO")
    return preference.Method(
        kind="pairs",
        objective=lambda model: dpo_objective(model, d.beta, d.loss_type, d.label_smoothing),
        reference=("chosen_", "rejected_"),
        describe=f"{name} (beta {d.beta:g}"
        + (f", label smoothing {d.label_smoothing:g})" if d.label_smoothing else ")"),
    )


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    return preference.fit_preference(cfg, workdir, method(cfg))
