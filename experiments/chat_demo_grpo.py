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


def stages() -> list[Stage]:
    demo = load_experiment("chat_demo")  # pretrain and sft as in the chat demo; its RL stage's summary
    grpo = Stage("grpo", load_experiment("grpo_world"), init_from="sft", summary=demo[-1].summary)
    return [*demo[:2], grpo]
