"""Reward model on the embedded world (chat demo stage 3): learn the labeler's preferences.

    python -m flaxgpt.train -e rm_world       # starts from runs/sft_world

For each of 3000 world prompts the SFT policy samples K = 4 answers (temperature 1);
the world's programmatic labeler, standing in for human labelers, ranks them (exact correct
answer > correct but sloppy > wrong; ties allowed) into WORKDIR/comparisons.jsonl. Where none
of the K answers is exactly correct, the labeler writes the correct answer in place of the
worst one (data.world_ranking_write_correct=1; InstructGPT's labelers also wrote answers):
the SFT model gets most sums wrong, and an RM ranking only its samples never learns their
right answers (it shared the SFT model's wrong beliefs). The sums are a finite space (672
questions), and 3000 prompts cover two thirds of them. The RM (the SFT model with a scalar head)
learns all pairs of each ranking; afterwards its bias is set so the SFT demonstrations score
mean 0. Reports validation pairwise accuracy.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(
            source="world",
            world_seed=0,
            world_system="Answer briefly.",
            world_rankings=3000,
            world_ranking_k=4,
            world_ranking_temperature=1.0,
            world_ranking_write_correct=1.0,
            world_hedge=0.6,  # sft_world's demonstrations, whose mean score is set to 0 afterwards
            train_fraction=0.85,
        ),
        optimizer=C.OptimizerConfig(
            lr=5e-4, min_lr=5e-5, warmup_steps=20, decay="cosine", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(
            trainer="reward", init_from="runs/sft_world", batch_size=16, max_steps=300, log_interval=25
        ),
        reward=C.RewardConfig(margin=0.0, normalize=True),
        sft=C.SftConfig(max_new_tokens=32),  # answer length when sampling the comparisons
        eval=C.EvalConfig(interval=50, iters=8, batch_size=16),
        checkpoint=C.CheckpointConfig(every_steps=50),
    )
