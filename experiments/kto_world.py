"""KTO on the embedded world: learn from thumbs-up/down feedback, no pairs needed.

    python -m flaxgpt.train -e kto_world      # starts from runs/sft_world

2000 world questions, each with one human-like answer (half of them wrong or sloppy) and a
thumbs up when the labeler gives it full marks. Validation: held-out records (loss, rewards and
log-probs of thumbs-up and thumbs-down answers, the KL reference point) and the labeler's task
accuracy of greedy answers to held-out questions.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly.", world_preferences=2000),
        optimizer=C.OptimizerConfig(
            lr=1e-4, min_lr=1e-5, warmup_steps=10, decay="cosine", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="kto", init_from="runs/sft_world", batch_size=32, max_steps=120, log_interval=10),
        kto=C.KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
        sft=C.SftConfig(eval_examples=128, max_new_tokens=32),
        eval=C.EvalConfig(interval=60, iters=4, batch_size=32),
        checkpoint=C.CheckpointConfig(every_steps=60),
    )
