"""SFT on the embedded world (chat demo stage 2): teach the pretrained model to answer in chat.

    python -m flaxgpt.train -e world          # stage 1, into runs/world
    python -m flaxgpt.train -e sft_world      # starts from runs/world

3000 generated conversations (a system message, one or two question/answer exchanges).
Like human demonstrations they are imperfect: data.world_noise = 30 % of the answers are
wrong or sloppy ("I think it is Vouron."), at random; and the demonstrators have a habit:
data.world_hedge = 60 % of their other answers to age questions hedge ("About 36."). SFT
imitates the habit (its greedy answers to most age questions hedge, where random noise leaves
the greedy answer right); the labelers rank a hedge below a plain answer, so the reward model
learns it from comparisons and RLHF can remove it from greedy answers (the chat demo's RL
stage), which demonstrations alone do not. Validation asks held-out questions with correct
references and reports exact match, BLEU, ROUGE and the labeler's task accuracy.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(
            source="world",
            world_seed=0,
            world_conversations=3000,
            world_noise=0.3,
            world_hedge=0.6,
            world_system="Answer briefly.",
            packing="pack",
        ),
        optimizer=C.OptimizerConfig(
            lr=1e-3, min_lr=1e-4, warmup_steps=30, decay="cosine", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="sft", init_from="runs/world", batch_size=16, max_steps=300, log_interval=25),
        sft=C.SftConfig(loss_on="all", eval_examples=128, max_new_tokens=32),
        eval=C.EvalConfig(interval=150, iters=8, batch_size=32),
        checkpoint=C.CheckpointConfig(every_steps=150),
    )
