"""The chat demo on the embedded world, stage by stage as InstructGPT trained its models:

  1. pretrain  next-token prediction on the generated world corpus      (experiments/world.py)
  2. sft       fine-tune on imperfect chat demonstrations (a hedging      (experiments/sft_world.py)
               habit among them)
  3. rm        rank K sampled answers with the labeler, who writes the     (experiments/rm_world.py)
               correct answer where none is right; train the RM
  4. rl        RLHF: RLOO against the RM with a KL term to the SFT model  (experiments/rloo_rm_world.py)

    python -m flaxgpt.train -e chat_demo [--workdir runs/chat_demo] [--set sft.train.max_steps=100]

Each stage runs in WORKDIR/<stage> and starts from the previous one; WORKDIR/summary.json
holds each stage's key figures. Rerunning skips finished stages and resumes the rest.
"""

from flaxgpt.pipeline import Stage
from flaxgpt.train import load_experiment


def stages() -> list[Stage]:
    return [
        Stage("pretrain", load_experiment("world"), summary={"val_loss": "val_loss"}),
        Stage(
            "sft",
            load_experiment("sft_world"),
            init_from="pretrain",
            summary={
                "val_loss": "val_loss",
                "val_ppl": "val_ppl",
                "task_accuracy": "val_task_accuracy",
                "labeler_score": "val_labeler_score",
                "exact_match": "val_exact_match",
                "bleu": "val_bleu",
                "rougeL": "val_rougeL",
            },
        ),
        Stage(
            "rm",
            load_experiment("rm_world"),
            init_from="sft",
            summary={
                "val_accuracy": "val_accuracy",
                "val_loss": "val_loss",
                "val_reward_margin": "val_reward_margin",
                "reward_offset": "reward_offset",
            },
        ),
        Stage("rl", load_experiment("rloo_rm_world"), init_from="sft", reward_from="rm", summary=RL_SUMMARY),
    ]


# held-out questions answered at the rollout temperature (the policy's own distribution) and
# greedily (what a chat user gets), before RL (= the SFT model) and after
RL_SUMMARY = {
    "reward_start": "start_eval_reward",
    "reward_end": "val_eval_reward",
    "sft_task_accuracy": "start_task_accuracy",
    "task_accuracy": "val_task_accuracy",
    "sft_task_accuracy_greedy": "start_task_accuracy_greedy",
    "task_accuracy_greedy": "val_task_accuracy_greedy",
    "kl_held_out": "val_kl",
    "kl_target": "kl_target",
}
