"""DPO on your own preference pairs (or rankings, expanded to every better/worse pair).

    python -m flaxgpt.train -e dpo_jsonl --set data.path=pairs.jsonl train.init_from=runs/sft_jsonl \
        [data.val_path=val.jsonl] [dpo.loss_type=ipo] [dpo.label_smoothing=0.1] [model.lora_rank=8]

  {"prompt": "...", "chosen": "...", "rejected": "...", "system": optional}
  {"prompt": "...", "responses": ["best", ..., "worst"], "scores": [optional, ties allowed]}
ORPO on the same files: --set train.trainer=orpo; KTO on thumbs-up/down
{"prompt", "response", "label": true|false} records: --set train.trainer=kto.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="jsonl", path="data/pairs.jsonl", train_fraction=0.95),
        optimizer=C.OptimizerConfig(
            lr=1e-6, min_lr=1e-7, warmup_steps=50, decay="cosine", b2=0.95, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="dpo", init_from="runs/sft_jsonl", batch_size=64, max_steps=1000, log_interval=20),
        dpo=C.DPOConfig(beta=0.1),
        eval=C.EvalConfig(interval=250, iters=10),
        checkpoint=C.CheckpointConfig(every_steps=250),
    )
