"""KTO (Ethayarajh et al. 2024): learn from unpaired thumbs-up/down `feedback` records. Each
record's log-ratio to the reference is judged against a reference point, the batch's KL
estimated on mismatched (prompt, another record's response) pairs, as TRL does.
"""

from __future__ import annotations

from typing import Any

from flaxgpt import losses, preference
from flaxgpt.config import Config


def kto_objective(model: Any, beta: float, desirable_weight: float, undesirable_weight: float):
    """LossSums of KTO on feedback rows with stored reference log-probabilities."""

    def loss_sums(params, batch, rng, train):
        (own, _), (mismatched, _) = preference.logprobs(model, params, batch, ("", "kl_"), train, rng)
        ref, ref_kl, desirable, valid = (
            preference.column(batch, k) for k in ("ref_logp", "ref_kl_logp", "desirable", "valid")
        )
        z0 = losses.kto_reference_point(mismatched, ref_kl, valid)
        return losses.kto_loss(own, ref, desirable, valid, z0, beta, desirable_weight, undesirable_weight)

    return loss_sums


def method(cfg: Config) -> preference.Method:
    """What fit_preference trains (also what flaxgpt.compile compiles)."""
    k = cfg.kto
    return preference.Method(
        kind="feedback",
        objective=lambda model: kto_objective(model, k.beta, k.desirable_weight, k.undesirable_weight),
        reference=("", "kl_"),
        describe=f"KTO (beta {k.beta:g}, weights {k.desirable_weight:g}/{k.undesirable_weight:g})",
    )


def run(cfg: Config, workdir: str) -> dict[str, Any]:
    return preference.fit_preference(cfg, workdir, method(cfg))
