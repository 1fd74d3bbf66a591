"""RLOO against the learned reward model on the embedded world (the chat demo's RL stage).

    python -m flaxgpt.train -e rloo_rm_world   # policy from runs/sft_world, reward from runs/rm_world

rloo_world with the reward model of ppo.reward_from in place of the labeler: 4 answers to each of
16 questions a step, each judged against the mean reward of the other 3. The group baseline
cancels what the small RM gets wrong about a question as a whole (an RM trained only on the SFT
model's samples shared its beliefs and scored its confident wrong sums above its right ones;
rm_world's labeler-written answers correct most of that), leaving its ranking of answers within
a question, which is right for the fact questions: RL removes the demonstrators' hedge ("About
36.") that SFT copied into its greedy answers (sft_world's data.world_hedge), and raises sampled
accuracy. On sums the RM is at chance (it is the SFT model with a scalar head, and that model
cannot add), so greedy sums do not improve; a model taught to add (experiments/world.py's
data.world_arithmetic) does not fix that: its RM still misorders sums, and RL, even on the
labeler's own reward, moves its nearly-right greedy sums at random (benchmarks/RESULTS.md).
--set ppo.reward_function=calculator ppo.reward_function_weight=3 adds a verifier for sums.
30 steps, KL coefficient 0.2: with rloo_world's 0.04 the policy over-optimises the RM past 30
steps (its score rises, greedy accuracy and the held-out KL go the wrong way). The held-out KL
to the SFT model is reported beside ppo.kl_target.
"""

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    cfg = load_experiment("rloo_world")
    cfg.name = "rloo_rm_world"
    cfg.train.max_steps, cfg.eval.interval = 30, 30
    # a firmer KL term than rloo_world's 0.04: removing the SFT model's hedge moves much of its
    # probability on age questions, and at 0.04 the held-out KL passed kl_target on some runs
    cfg.grpo.beta = 0.2
    cfg.ppo.reward_function, cfg.ppo.reward_from, cfg.ppo.kl_target = "", "runs/rm_world", 1.0
    return cfg
