"""KTO on your own thumbs-up/down feedback (the `feedback` records the chat server writes).

    python -m flaxgpt.train -e kto_jsonl --set data.path=feedback.jsonl train.init_from=runs/sft_jsonl \
        [data.val_path=val.jsonl] [kto.desirable_weight=1.33] [model.lora_rank=8]

  {"prompt": "...", "response": "...", "label": true|false, "system": optional}
No pairs needed: each answer is judged alone against the KL reference point (Ethayarajh et al.
2024). With many more thumbs-down than up, raise kto.desirable_weight (or lower the other) so
that weight x count is about even on both sides.
"""

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    cfg = load_experiment("dpo_jsonl")  # the same schedule; KTO reads feedback records
    cfg.name, cfg.train.trainer, cfg.data.path = "kto_jsonl", "kto", "data/feedback.jsonl"
    cfg.optimizer.lr, cfg.optimizer.min_lr = 5e-7, 5e-8
    cfg.kto = C.KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    return cfg
