"""The chat demo with InstructGPT's RL stage: PPO against the reward model (over-optimisation shown).

  1-3. pretrain, sft, rm as in chat_demo                                   (experiments/chat_demo.py)
  4.   ppo   PPO against the RM with a KL penalty to the SFT model, value model from the RM,
             two rounds of iterated RLHF                                     (experiments/ppo_world.py)

    python -m flaxgpt.train -e chat_demo_ppo [--workdir runs/chat_demo_ppo] [--set ppo.ppo.rounds=1]

The same workdir as chat_demo's reuses its finished pretrain/sft/rm stages. PPO gains less greedy
accuracy than chat_demo's RLOO from the same RM, and over-optimises it: between its evaluations
the RM's score climbs while greedy accuracy falls (PPO's value baseline does not cancel the small
RM's per-question bias the way RLOO's group baseline does).
"""

from flaxgpt.pipeline import Stage
from flaxgpt.train import load_experiment


def stages() -> list[Stage]:
    demo = load_experiment("chat_demo")  # pretrain, sft and rm as in the chat demo
    summary = {**demo[-1].summary, "kl_end": "kl"}  # the RL stage's figures, and PPO's rollout KL
    ppo = Stage("ppo", load_experiment("ppo_world"), init_from="sft", reward_from="rm", summary=summary)
    return [*demo[:3], ppo]
