"""PPO on the embedded world (stage 4 of chat_demo_ppo): RLHF against the learned reward model.

    python -m flaxgpt.train -e ppo_world      # policy from runs/sft_world, reward and value from runs/rm_world

Each step samples answers to 64 world questions at temperature 1, scores them with the
reward model, penalises KL to the SFT model per token and takes 2 epochs of 4 clipped-PPO
minibatches. Held-out questions are judged by the labeler before and after. Two rounds of
iterated RLHF: after 20 steps, 800 prompts are answered K = 4 times by the current policy,
ranked by the labeler, and the reward model is retrained on them for 60 steps.

beta starts at 1.0, well above InstructGPT's 0.02: this reward model is small and learned
from ~900 rankings, and with a weak KL penalty PPO finds answers it overrates ("white"
for every colour question: reward up, accuracy down). Even so greedy accuracy falls: the RM shares
the SFT model's wrong beliefs, and the chat demo uses RLOO on the RM instead (rloo_rm_world).
One round only: --set ppo.rounds=1.
PPO-ptx (InstructGPT's coefficient): --set ppo.ptx_coef=27.8.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        data=C.DataConfig(source="world", world_seed=0, world_system="Answer briefly.", world_rankings=800),
        optimizer=C.OptimizerConfig(
            lr=1e-4, min_lr=1e-4, warmup_steps=0, decay="constant", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="ppo", init_from="runs/sft_world", batch_size=64, max_steps=40, log_interval=1),
        ppo=C.PPOConfig(
            reward_from="runs/rm_world",
            value_model="separate",
            max_new_tokens=32,
            temperature=1.0,
            epochs=2,
            minibatches=4,
            gamma=1.0,
            lam=0.95,
            clip=0.2,
            value_clip=0.2,
            value_coef=0.1,
            kl_coef=1.0,
            adaptive_kl=True,
            kl_target=1.0,
            kl_horizon=10000.0,
            missing_eos_penalty=1.0,
            eval_prompts=128,
            rounds=2,
            round_rm_steps=60,
        ),
        eval=C.EvalConfig(interval=20),
        checkpoint=C.CheckpointConfig(every_steps=10),
    )
