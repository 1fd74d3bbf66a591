"""DPO on the embedded world (an alternative to chat demo stages 3-4: no reward model, no sampling).

    python -m flaxgpt.train -e dpo_world      # policy from runs/sft_world
    python -m flaxgpt.train -e dpo_world --set dpo.loss_type=ipo           # IPO
    python -m flaxgpt.train -e dpo_world --set dpo.label_smoothing=0.1     # conservative DPO

2000 world questions, each with a pair judged by the oracle: the correct answer over a wrong
or sloppy one (the mistakes the SFT demonstrations taught). Reference log-probabilities come
once from the SFT model. Validation: held-out pairs (loss, implicit reward accuracy and margin,
chosen/rejected log-probs) and the labeler's task accuracy of greedy answers to held-out questions.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly.", world_preferences=2000),
        optimizer=C.OptimizerConfig(
            lr=1e-4, min_lr=1e-5, warmup_steps=10, decay="cosine", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="dpo", init_from="runs/sft_world", batch_size=32, max_steps=120, log_interval=10),
        dpo=C.DPOConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.0),
        sft=C.SftConfig(eval_examples=128, max_new_tokens=32),
        eval=C.EvalConfig(interval=60, iters=4, batch_size=32),
        checkpoint=C.CheckpointConfig(every_steps=60),
    )
