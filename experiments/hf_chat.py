"""Fine-tune an imported Hugging Face model (GPT-2 or Llama family) into a chat model on the
embedded world: SFT on its demonstrations, then PPO with the world's labeler as the reward.

    python -m flaxgpt.train -e hf_chat --workdir runs/hf_chat --set sft.train.init_from_hf=PATH/TO/HF_DIR
    ... --set model.lora_rank=16        # LoRA: adapters on every projection, the base frozen

The SFT stage reads the model's weights and its own tokenizer (flaxgpt's chat markers are
appended to its vocabulary); PPO starts from the SFT run, as in chat_demo. Export the result
with `python -m flaxgpt.convert export --workdir runs/hf_chat/ppo --hf OUT`.
"""

from flaxgpt import config as C
from flaxgpt.pipeline import Stage

WORLD = dict(source="world", world_seed=0, world_conversations=2000, world_noise=0.3, world_system="Answer briefly.")


def stages() -> list[Stage]:
    sft = C.Config(
        name="hf_chat_sft",
        model=C.ModelConfig(lora_alpha=32.0),
        data=C.DataConfig(**WORLD, packing="pack"),
        optimizer=C.OptimizerConfig(lr=1e-4, min_lr=1e-5, warmup_steps=20, decay="cosine", weight_decay=0.0),
        train=C.TrainConfig(trainer="sft", batch_size=16, max_steps=300, log_interval=25),
        sft=C.SftConfig(eval_examples=64, max_new_tokens=32),
        eval=C.EvalConfig(interval=150, iters=4),
        checkpoint=C.CheckpointConfig(every_steps=150),
    )
    ppo = C.Config(
        name="hf_chat_ppo",
        model=C.ModelConfig(lora_alpha=32.0),
        data=C.DataConfig(**WORLD),
        optimizer=C.OptimizerConfig(lr=2e-5, min_lr=2e-5, warmup_steps=0, decay="constant", weight_decay=0.0),
        train=C.TrainConfig(trainer="ppo", batch_size=32, max_steps=30, log_interval=1),
        ppo=C.PPOConfig(
            reward_function="world",
            value_model="head",
            max_new_tokens=32,
            temperature=1.0,
            epochs=2,
            minibatches=4,
            kl_coef=0.2,
            adaptive_kl=True,
            kl_target=1.0,
            eval_prompts=64,
        ),
        eval=C.EvalConfig(interval=15),
        checkpoint=C.CheckpointConfig(every_steps=10),
    )
    return [
        Stage(
            "sft",
            sft,
            requires=("train.init_from_hf",),
            summary={"val_loss": "val_loss", "task_accuracy": "val_task_accuracy"},
        ),
        Stage(
            "ppo",
            ppo,
            init_from="sft",
            summary={
                "task_accuracy_start": "start_task_accuracy",
                "task_accuracy": "val_task_accuracy",
                "reward_start": "start_eval_reward",
                "reward_end": "val_eval_reward",
                "kl_end": "kl",
            },
        ),
    ]
