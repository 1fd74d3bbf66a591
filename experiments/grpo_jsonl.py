"""GRPO on your own prompts, scored by your Python reward function (or a reward model).

    python -m flaxgpt.train -e grpo_jsonl --set ppo.prompts_path=prompts.jsonl \
        ppo.reward_function=my_rewards:score train.init_from=runs/sft_jsonl [grpo.advantage=rloo]
    # the reward model of rm_jsonl instead of a function:
    python -m flaxgpt.train -e grpo_jsonl --set ppo.prompts_path=prompts.jsonl ppo.reward_function= \
        ppo.reward_from=runs/rm_jsonl

  prompts.jsonl: {"prompt": "...", "system": optional}   (the last data.train_fraction held out)
  my_rewards.py: def score(prompt: str, response: str) -> float   (importable from the working directory)
Each step samples grpo.group_size answers to each of train.batch_size prompts; each answer's
advantage is its reward relative to its group's (no value model), with a k3 KL to the start.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        # data.path is not read (prompts come from ppo.prompts_path); a jsonl source must name one
        data=C.DataConfig(source="jsonl", path="data/prompts.jsonl", train_fraction=0.95),
        optimizer=C.OptimizerConfig(
            lr=1e-6, min_lr=1e-6, warmup_steps=0, decay="constant", b2=0.99, weight_decay=0.0, grad_clip=1.0
        ),
        train=C.TrainConfig(trainer="grpo", init_from="runs/sft_jsonl", batch_size=16, max_steps=500, log_interval=5),
        ppo=C.PPOConfig(
            prompts_path="data/prompts.jsonl",
            reward_function="my_rewards:score",
            max_new_tokens=128,
            temperature=1.0,
            eval_prompts=64,
        ),
        grpo=C.GRPOConfig(group_size=8, advantage="grpo", beta=0.04, epochs=1),
        eval=C.EvalConfig(interval=100),
        checkpoint=C.CheckpointConfig(every_steps=50),
    )
