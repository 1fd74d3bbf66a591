"""A reward model on your own human rankings, starting from an SFT run.

    python -m flaxgpt.train -e rm_jsonl --set data.path=rankings.jsonl train.init_from=runs/sft_jsonl \
        [data.val_path=val.jsonl] [reward.margin=0.5] [reward.reference_path=chats.jsonl]

Either schema, one record per line:
  {"prompt": "...", "responses": ["best", "second", ..., "worst"], "scores": [optional, ties allowed]}
  {"prompt": "...", "chosen": "...", "rejected": "..."}
(plus an optional "system"). All K(K-1)/2 pairs of a ranking form one batch element. After
training the score bias is set so the reference responses (reward.reference_path, a
conversations file such as the SFT data; else the top-ranked responses) score mean 0.
Score with: python -m flaxgpt.score --workdir runs/rm_jsonl --prompt ... --response ...
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="jsonl", path="data/rankings.jsonl", train_fraction=0.95),
        optimizer=C.OptimizerConfig(
            lr=9e-6, min_lr=9e-7, warmup_steps=50, decay="cosine", b2=0.95, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(
            trainer="reward", init_from="runs/sft_jsonl", batch_size=64, max_steps=1000, log_interval=20
        ),
        reward=C.RewardConfig(margin=0.0, normalize=True),
        eval=C.EvalConfig(interval=250, iters=10),
        checkpoint=C.CheckpointConfig(every_steps=250),
    )
