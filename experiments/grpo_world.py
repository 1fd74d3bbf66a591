"""GRPO on the embedded world (an alternative to chat demo stage 4): no value model.

    python -m flaxgpt.train -e grpo_world     # policy from runs/sft_world, reward from the world's checker
    python -m flaxgpt.train -e grpo_world --set grpo.advantage=rloo                        # RLOO
    python -m flaxgpt.train -e grpo_world --set grpo.scale_rewards=false grpo.normalization=constant   # Dr. GRPO
    # DAPO:
    python -m flaxgpt.train -e grpo_world --set grpo.clip_high=0.28 grpo.normalization=token grpo.dynamic_sampling=true
    python -m flaxgpt.train -e grpo_world --set ppo.reward_function= ppo.reward_from=runs/rm_world   # the reward model

Each step samples 4 answers to each of 16 world questions at temperature 1 and scores them with
the labeler (1 exact, 0.5 sloppy, 0.2 wrong of the right kind); each answer's advantage is its
reward relative to its group's. Held-out questions are judged sampled and greedy at each evaluation.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly."),
        optimizer=C.OptimizerConfig(
            lr=1e-4, min_lr=1e-4, warmup_steps=0, decay="constant", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="grpo", init_from="runs/sft_world", batch_size=16, max_steps=60, log_interval=1),
        ppo=C.PPOConfig(reward_function="world", max_new_tokens=32, temperature=1.0, eval_prompts=128),
        grpo=C.GRPOConfig(group_size=4, advantage="grpo", beta=0.04, epochs=2),
        eval=C.EvalConfig(interval=30),
        checkpoint=C.CheckpointConfig(every_steps=10),
    )
