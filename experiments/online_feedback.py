"""Online learning on the embedded world: the served chat model improves from its users' thumbs.

    python -m flaxgpt.train -e online_feedback --workdir runs/online        # from runs/chat_demo/sft
    python -m flaxgpt.serve --workdir runs/online --reload-every 5          # serves promoted steps
    python -m flaxgpt.simuser --url http://127.0.0.1:8000 --noise 0.1       # or real people

Every 32 new ratings (at most the 160 that fill 30 batches of 16 beside 320 rehearsed questions,
each with its best-supported answer so far): one pass of KTO (thumbs) + 4 x the thumbs-up and
corrected answers' log-likelihood + DPO (up-vs-down, regenerated and corrected answers) at lr
2e-4, continuing the learner's newest candidate (promoted or not: learning accumulates across
updates) and anchored to the served model; promoted unless the guard finds it worse in greedy
accuracy on 256 held-out questions (the same ones for candidate and served model; allowing 2
points there let the served model drift down one promotion at a time) or on held-out pairs, or
its loss on held-out thumbs-up answers 20 % higher.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly."),
        optimizer=C.OptimizerConfig(
            lr=2e-4, min_lr=2e-4, warmup_steps=0, decay="constant", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="online", init_from="runs/chat_demo/sft", batch_size=16, log_interval=1),
        kto=C.KTOConfig(beta=0.1),
        dpo=C.DPOConfig(beta=0.1),
        online=C.OnlineConfig(
            min_events=32,
            steps_per_update=30,
            replay=320,
            sft_weight=4.0,
            guard_questions=256,
            max_regression=0.0,
            max_loss_rise=0.2,
        ),
        sft=C.SftConfig(max_new_tokens=32),
        eval=C.EvalConfig(batch_size=32),
        checkpoint=C.CheckpointConfig(max_to_keep=1000, async_save=False),
    )
