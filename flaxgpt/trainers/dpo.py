"""DPO (Rafailov et al. 2023): learn preferences straight from `pairs` (or `rankings`, expanded
to pairs), no reward model and no sampling. The loss option gives IPO (Azar et al. 2023) and
conservative DPO (label smoothing). Reference log-probabilities come once from the SFT start
(`flaxgpt.preference`); the run holds one copy of the weights.
"""

from __future__ import annotations

from typing import Any

from flaxgpt import preference
from flaxgpt.config import Config
from flaxgpt.preference import dpo_objective


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
