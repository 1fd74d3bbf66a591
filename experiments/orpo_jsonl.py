"""ORPO on your own preference pairs (or rankings): SFT on the chosen answer plus the
odds-ratio preference over the rejected one, in one stage, with no reference model.

    python -m flaxgpt.train -e orpo_jsonl --set data.path=pairs.jsonl train.init_from=runs/pretrain_jsonl \
        [data.val_path=val.jsonl] [orpo.beta=0.1] [model.lora_rank=8]

  {"prompt": "...", "chosen": "...", "rejected": "...", "system": optional}
  {"prompt": "...", "responses": ["best", ..., "worst"], "scores": [optional, ties allowed]}
ORPO replaces SFT (Hong et al. 2024), so it may start from a pretrained model as well as an SFT one.
"""

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    cfg = load_experiment("dpo_jsonl")  # the same files and schedule, a higher rate (it is SFT too)
    cfg.name, cfg.train.trainer = "orpo_jsonl", "orpo"
    cfg.optimizer.lr, cfg.optimizer.min_lr = 8e-6, 8e-7
    cfg.orpo = C.ORPOConfig(beta=0.1)
    return cfg
