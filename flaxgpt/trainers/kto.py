"""KTO (Ethayarajh et al. 2024): learn from unpaired thumbs-up/down `feedback` records. Each
record's log-ratio to the reference is judged against a reference point, the batch's KL
estimated on mismatched (prompt, another record's response) pairs, as TRL does.
"""

from __future__ import annotations

from typing import Any

from flaxgpt import preference
from flaxgpt.config import Config
from flaxgpt.preference import kto_objective


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
