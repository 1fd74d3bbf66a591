"""PPO on a Llama-3-8B-shaped policy with reference, reward and value models, on a TPU v5p-128
(128 chips: v5p:4x4x8).

    python -m flaxgpt.compile -e ppo_8b_v5p128 --topology v5p:4x4x8
    python -m flaxgpt.train -e ppo_8b_v5p128 --set train.init_from=runs/llama3_8b_sft \\
        ppo.reward_from=runs/llama3_8b_rm ppo.prompts_path=prompts.jsonl

Differs from the defaults, and why:
  model      Llama-3-8B's shape (see llama3_8b_sft_v5p64), context 2048 of which 512 are the
             response; four models: policy and value train (float32 + Adam), reference and reward
             are frozen; layers scanned, rematerialised in full
  mesh       fsdp over the 128 chips: four float32 8B models and two Adam states are 256 GB,
             2 GiB a chip
  ppo        256 prompts per rollout, 4 epochs of 2 minibatches (128 rows: one a chip), the
             InstructGPT-style KL penalty steered to 6 nats
"""

import dataclasses

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    sft = load_experiment("llama3_8b_sft_v5p64")  # the model this PPO run starts from
    return C.Config(
        name="ppo_8b_v5p128",
        model=dataclasses.replace(sft.model, block_size=2048),
        mesh=sft.mesh,
        data=C.DataConfig(source="jsonl", path="data/chats.jsonl"),
        optimizer=C.OptimizerConfig(lr=1e-6, min_lr=1e-6, warmup_steps=10, decay="constant", weight_decay=0.0),
        train=C.TrainConfig(trainer="ppo", init_from="runs/llama3_8b_sft", batch_size=256, max_steps=200),
        ppo=C.PPOConfig(
            reward_from="runs/llama3_8b_rm",
            prompts_path="data/prompts.jsonl",
            max_new_tokens=512,
            epochs=4,
            minibatches=2,
            kl_coef=0.05,
            kl_target=6.0,
            eval_prompts=0,
        ),
        checkpoint=C.CheckpointConfig(every_steps=50),
    )
