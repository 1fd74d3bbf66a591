"""ORPO on the embedded world: SFT on the correct answer and the odds-ratio preference over a
wrong or sloppy one, in one stage with no reference model.

    python -m flaxgpt.train -e orpo_world     # starts from runs/sft_world

The same 2000 oracle-judged pairs as dpo_world; validation as there.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly.", world_preferences=2000),
        optimizer=C.OptimizerConfig(
            lr=1e-4, min_lr=1e-5, warmup_steps=10, decay="cosine", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="orpo", init_from="runs/sft_world", batch_size=32, max_steps=120, log_interval=10),
        orpo=C.ORPOConfig(beta=0.1),
        sft=C.SftConfig(eval_examples=128, max_new_tokens=32),
        eval=C.EvalConfig(interval=60, iters=4, batch_size=32),
        checkpoint=C.CheckpointConfig(every_steps=60),
    )
