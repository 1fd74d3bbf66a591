"""Online learning on the embedded world: the served chat model improves from its users' thumbs.

    python -m flaxgpt.train -e online_feedback --workdir runs/online        # from runs/chat_demo/sft
    python -m flaxgpt.serve --workdir runs/online --reload-every 5          # serves promoted steps
    python -m flaxgpt.simuser --url http://127.0.0.1:8000 --noise 0.1       # or real people

Every 32 new ratings: one pass (at most 20 steps of 16) of KTO (thumbs) + DPO (up-vs-down and
regenerated answers) at lr 2e-5 (higher rates raised the held-out thumbs-up loss), anchored to the
served model; promoted unless the guard finds it more than 5 points (accuracy on 64 held-out
questions, on held-out pairs) or 5 % (loss of held-out thumbs-up answers) worse than the served model.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly."),
        optimizer=C.OptimizerConfig(
            lr=2e-5, min_lr=2e-5, warmup_steps=0, decay="constant", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="online", init_from="runs/chat_demo/sft", batch_size=16, log_interval=1),
        kto=C.KTOConfig(beta=0.1),
        dpo=C.DPOConfig(beta=0.1),
        online=C.OnlineConfig(min_events=32, steps_per_update=20, guard_questions=64, max_regression=0.05),
        sft=C.SftConfig(max_new_tokens=32),
        eval=C.EvalConfig(batch_size=32),
        checkpoint=C.CheckpointConfig(max_to_keep=1000, async_save=False),
    )
