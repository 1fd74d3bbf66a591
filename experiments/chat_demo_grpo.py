"""The chat demo with GRPO on the world's labeler in place of the reward model and PPO:

  1. pretrain  next-token prediction on the generated world corpus      (experiments/world.py)
  2. sft       fine-tune on imperfect chat demonstrations                (experiments/sft_world.py)
  3. grpo      RL from the labeler's scores, group-relative advantages   (experiments/grpo_world.py)

    python -m flaxgpt.train -e chat_demo_grpo [--workdir runs/chat_demo_grpo] [--set grpo.train.max_steps=30]

The labeler (1 exact, 0.5 sloppy, 0.2 wrong of the right kind) cannot be exploited the way the
small learned reward model of chat_demo is; held-out questions are judged before and after
(sampled at temperature 1 and greedy), with the sampled answers' mean KL to the SFT model.
"""

from flaxgpt.pipeline import Stage
from flaxgpt.train import load_experiment

RL_SUMMARY = {
    "sft_task_accuracy": "start_task_accuracy",
    "task_accuracy": "val_task_accuracy",
    "sft_task_accuracy_greedy": "start_task_accuracy_greedy",
    "task_accuracy_greedy": "val_task_accuracy_greedy",
    "kl_held_out": "val_kl",
}


def stages() -> list[Stage]:
    first = load_experiment("chat_demo")[:2]  # pretrain and sft, as in the chat demo
    return [*first, Stage("grpo", load_experiment("grpo_world"), init_from="sft", summary=RL_SUMMARY)]
