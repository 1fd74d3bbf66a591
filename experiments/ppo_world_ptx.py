"""PPO-ptx on the embedded world: ppo_world plus InstructGPT's pretraining-loss mix.

    python -m flaxgpt.train -e ppo_world_ptx

Each PPO minibatch adds ptx_coef * (next-token loss on a batch of the world corpus), with
InstructGPT's coefficient 27.8, so RLHF does not erode what pretraining taught (InstructGPT
used it to undo the "alignment tax" on public NLP benchmarks).
"""

import dataclasses

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    cfg = load_experiment("ppo_world")
    cfg.name = "ppo_world_ptx"
    cfg.ppo = dataclasses.replace(cfg.ppo, ptx_coef=C.INSTRUCTGPT_PTX_COEF, ptx_batch_size=8)
    return cfg
