"""SFT on your own conversations, starting from a pretrained run.

    python -m flaxgpt.train -e sft_jsonl --set data.path=chats.jsonl train.init_from=runs/pretrain_jsonl \
        [data.val_path=val.jsonl] [sft.loss_on=last]

One conversation per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
(a system message may only come first). The model and tokenizer come from init_from;
conversations longer than the context lose their oldest exchanges, never the system
message. Validation answers the last user turn of up to 64 held-out conversations and
scores the answers against the references (exact match, BLEU, ROUGE).
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="jsonl", path="data/chats.jsonl", packing="pack", train_fraction=0.95),
        optimizer=C.OptimizerConfig(
            lr=2e-5, min_lr=2e-6, warmup_steps=100, decay="cosine", b2=0.95, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(
            trainer="sft", init_from="runs/pretrain_jsonl", batch_size=32, max_steps=2000, log_interval=20
        ),
        sft=C.SftConfig(loss_on="all", eval_examples=64, max_new_tokens=128),
        eval=C.EvalConfig(interval=500, iters=20),
        checkpoint=C.CheckpointConfig(every_steps=500),
    )
