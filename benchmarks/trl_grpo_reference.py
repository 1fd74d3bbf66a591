"""TRL's GRPOTrainer on the same task as flaxgpt's GRPO: the PyTorch side of
`benchmarks/grpo_speed.py`, run in a process of its own (`pip install 'trl==1.16.*'`).

The model and tokenizer are a Hugging Face directory exported from a flaxgpt run (the same
weights; the character tokenizer written by grpo_speed.py); the prompts are the flaxgpt chat
template's rendering of the same world questions, and the reward is the world's labeler (minus
ppo.missing_eos_penalty for an answer that never ends), a Python callable as on flaxgpt's side.
TRL runs as shipped on the CPU: eager PyTorch in float32, transformers' `generate` (no vLLM),
except that gradient checkpointing (on by default in TRL 1.16) is off, as it is in flaxgpt: at
this size it only costs time. The algorithm is set explicitly from flaxgpt's grpo section (TRL's
defaults differ: beta 0, one iteration, loss_type "dapo") and reported back in the JSON line as
`algorithm`, in flaxgpt's terms, for grpo_speed.py to check. One GRPO step is one generation
batch (batch prompts x group answers) and its `epochs` optimizer steps (TRL's num_iterations);
only whole steps are timed, after `warmup` untimed ones. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def reward(task, stops: set[int], penalty: float, counts: list[int]):
    """TRL's reward signature around the world labeler: (prompts, completions, question, ...);
    each call (one generation batch) appends its generated token count to `counts`."""

    def world_reward(prompts, completions, completion_ids, question, **_):
        counts.append(sum(len(ids) for ids in completion_ids))
        ended = [bool(ids) and int(ids[-1]) in stops for ids in completion_ids]
        return [task.label(q, c) - penalty * (not e) for q, c, e in zip(question, completions, ended)]

    return world_reward


LOSS_TYPES = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}  # flaxgpt's normalization -> TRL's


def algorithm(config) -> dict:
    """The GRPO settings TRL ran with, in flaxgpt's grpo.* terms."""
    return {
        "beta": config.beta,
        "updates_per_rollout": config.num_iterations * config.steps_per_generation,
        "normalization": {v: k for k, v in LOSS_TYPES.items()}[config.loss_type],
        "scale_rewards": config.scale_rewards != "none",
        "clip": [config.epsilon, config.epsilon_high],
        "mask_truncated": config.mask_truncated_completions,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of {prompt, question}")
    for name in ("batch", "group", "new_tokens", "epochs", "steps", "warmup", "threads", "world_seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, required=True)
    for name in ("beta", "lr", "temperature", "missing_eos_penalty", "clip_low", "clip_high"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, required=True)
    parser.add_argument("--normalization", choices=sorted(LOSS_TYPES), required=True)
    parser.add_argument("--scale-rewards", choices=("group", "none"), required=True)
    parser.add_argument("--world-system", default="")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's end starts the clock)")
    return args


def grpo_config(args: argparse.Namespace, out: str):
    """TRL's GRPOConfig for the run: flaxgpt's algorithm and optimizer, TRL's CPU settings."""
    import trl

    return trl.GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch * args.group,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        num_iterations=args.epochs,
        beta=args.beta,
        temperature=args.temperature,
        loss_type=LOSS_TYPES[args.normalization],
        scale_rewards=args.scale_rewards,
        epsilon=args.clip_low,
        epsilon_high=args.clip_high,
        mask_truncated_completions=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=(args.warmup + args.steps) * args.epochs,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )


def main() -> None:
    args = parse()
    os.sched_setaffinity(0, range(args.threads))  # the CPUs flaxgpt's side is pinned to
    import torch
    import transformers
    import trl
    from datasets import Dataset

    from flaxgpt.data.world import WorldTask

    torch.set_num_threads(args.threads)
    with open(args.prompts) as f:
        prompts = json.load(f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    stops = set(model.generation_config.eos_token_id)
    task = WorldTask(args.world_seed, args.world_system)
    with tempfile.TemporaryDirectory() as out:
        config = grpo_config(args, out)
        times: list[float] = []
        tokens: list[int] = []

        class Clock(transformers.TrainerCallback):
            def on_step_end(self, _args, state, _control, **_):
                if state.global_step % args.epochs == 0:  # a generation batch and its updates are done
                    times.append(time.perf_counter())

        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=reward(task, stops, args.missing_eos_penalty, tokens),
            args=config,
            train_dataset=Dataset.from_list(prompts),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        trainer.train()
    step_s = [b - a for a, b in zip(times[args.warmup - 1 :], times[args.warmup :])]
    generated = tokens[args.warmup :]
    print(
        json.dumps(
            {
                "side": "trl",
                "step_s": step_s,
                "generated_tokens": generated,
                "versions": {"trl": trl.__version__, "torch": torch.__version__},
                "algorithm": algorithm(config),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
