"""RLOO (Ahmadian et al. 2024) on the embedded world: REINFORCE with a leave-one-out baseline.

    python -m flaxgpt.train -e rloo_world     # policy from runs/sft_world, reward from the world's checker

grpo_world with grpo.advantage=rloo: each of the 4 answers to a question is judged against the
mean reward of the other 3 (no value model, no division by the group's spread).
"""

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    cfg = load_experiment("grpo_world")
    cfg.name, cfg.grpo.advantage = "rloo_world", "rloo"
    return cfg
