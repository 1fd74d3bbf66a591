"""GRPO speed: flaxgpt's GRPO trainer against TRL's GRPOTrainer on the world's tiny model.

    python benchmarks/grpo_speed.py                              # random weights, world model shape
    python benchmarks/grpo_speed.py --init-from runs/sft_world   # the SFT model: real answer lengths
    python benchmarks/grpo_speed.py --threads 2,1 --profile      # both thread counts, + where the step goes
    python benchmarks/grpo_speed.py --tiny --no-trl --steps 1    # checks the script in seconds

Both sides train the same model (the flaxgpt run, exported with `flaxgpt.convert`'s Hugging Face
export; the character tokenizer is written beside it), on the same world questions rendered by
flaxgpt's chat template, with the same group size, batch, lengths, temperature, learning rate,
clipping, k3 KL weight and updates per rollout (`experiments/grpo_world.py`'s settings), and the
world's labeler as the reward, a Python callable on both sides. flaxgpt runs its real trainer
step (`trainers/grpo.make_step`); TRL runs `benchmarks/trl_grpo_reference.py` (PyTorch eager on
the CPU, transformers' `generate`, no vLLM). Each side runs in its own process, pinned to the same
`--threads` CPUs (a list: each round runs every count), and the processes alternate (flax, trl,
flax, trl, ...) so that load from other work falls on both; the best round of each side counts.
Both sides report the GRPO settings they ran (KL weight, updates per rollout, loss normalisation,
reward scaling, clip range) and the script stops if they differ. A step is one rollout batch (batch
prompts x group answers) and its updates; the first `--warmup` steps (compilation) are not timed.

`--profile` adds, in a further flaxgpt process, where a step's time goes: generation, the host's
part of the rollout (padding, sequences), scoring (decoding + the reward function), and the jitted
update, split into the reference log-probabilities and the epochs of forward, backward and Adam
(the old log-probabilities come from the first epoch's forward). Each piece is timed to
`block_until_ready` by wrapping the trainer's functions in that process; the trainer itself is
unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import record  # noqa: E402

TRL_SCRIPT = os.path.join(ROOT, "benchmarks", "trl_grpo_reference.py")
TINY_MODEL = dict(n_layer=1, n_head=2, n_kv_heads=1, d_model=32)


def grpo_config(args, init_from: str):
    """experiments/grpo_world.py's config, from `init_from`, at the benchmark's sizes."""
    from experiments import grpo_world

    cfg = grpo_world.config()
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, init_from=init_from, batch_size=args.batch, max_steps=10**6),
        ppo=dataclasses.replace(cfg.ppo, max_new_tokens=args.new_tokens, world_prompts=512, eval_prompts=0),
        grpo=dataclasses.replace(cfg.grpo, group_size=args.group, epochs=args.epochs),
    )


def random_run(workdir: str, tiny: bool) -> str:
    """A flaxgpt run holding the world model's shape (experiments/world.py) at random weights,
    with a character tokenizer over the world's text: what a benchmark of speed needs."""
    from experiments import world
    from flaxgpt import fileio, runs
    from flaxgpt.checkpoint import Checkpointer
    from flaxgpt.config import to_dict, to_json
    from flaxgpt.data.tokenizers import CharTokenizer
    from flaxgpt.data.world import WorldTask
    from flaxgpt.model import Transformer
    from flaxgpt.sharding import logical_rules, logical_shardings, make_mesh, unbox_shapes

    cfg = world.config()
    task = WorldTask(cfg.data.world_seed, "Answer briefly.")
    tokenizer = CharTokenizer.from_text(task.corpus(200) + "Answer briefly.")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, **(TINY_MODEL if tiny else {}))
    cfg = dataclasses.replace(cfg, model=model_cfg.resolved()).validate()
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    shardings = unbox_shapes(logical_shardings(runs.boxed_params(Transformer(cfg.model)), mesh, rules))
    params = runs.complete_params({}, cfg.model, shardings, mesh, rules, cfg.train.seed)
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(workdir)
    fileio.write_atomic(os.path.join(workdir, "config.json"), to_json(cfg))
    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    checkpointer.save(0, {"params": params}, {"step": 0, "model": to_dict(cfg.model)}, force=True)
    checkpointer.close()
    return workdir


def export_for_trl(run_dir: str, hf_dir: str) -> None:
    """The run as a Hugging Face model directory, with its character tokenizer as a
    PreTrainedTokenizerFast (one id per character, flaxgpt's special tokens at flaxgpt's ids)."""
    import contextlib
    import io

    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    from flaxgpt.convert import export_hf
    from flaxgpt.data.tokenizers import EOS, PAD, SPECIAL_TOKENS, UNK
    from flaxgpt.runs import read_run

    with contextlib.redirect_stderr(io.StringIO()):  # its note: a char tokenizer is not exported
        export_hf(run_dir, hf_dir, force=True)
    tok = read_run(run_dir)[1]
    spec = HFTokenizer(models.WordLevel({s: i for i, s in enumerate(tok.itos)}, unk_token=UNK))
    spec.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    spec.decoder = decoders.Fuse()
    spec.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=spec, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.save_pretrained(hf_dir)


def trl_prompts(args, run_dir: str, path: str) -> None:
    """The world training prompts as the chat template renders them, for TRL's dataset; checks
    that the exported tokenizer gives back flaxgpt's ids for each."""
    from transformers import AutoTokenizer

    from flaxgpt.chat_template import render
    from flaxgpt.rlhf import load_prompts, query_width
    from flaxgpt.runs import read_run

    cfg = grpo_config(args, run_dir)
    source, tok = read_run(run_dir)
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(path))
    width = query_width(cfg.ppo, source.model.block_size)
    records = []
    for prompt in load_prompts(cfg, lambda _: None)[0]:
        ids = render(prompt.messages, tok, width).ids
        text = tok.decode(ids)
        if hf_tok(text, add_special_tokens=False)["input_ids"] != ids:
            raise SystemExit(f"the exported tokenizer does not reproduce flaxgpt's ids for {text!r}")
        records.append({"prompt": text, "question": prompt.text})
    with open(path, "w") as f:
        json.dump(records, f)


# ----------------------------------------------------------------------------- flaxgpt's side


def flax_trainer(args, run_dir: str, workdir: str):
    """(GRPO run, its initial state, its real step function), as `grpo.run` builds them."""
    from flaxgpt.data.packing import PackedRows
    from flaxgpt.trainers import grpo

    run = grpo.setup(grpo_config(args, run_dir), workdir)
    _, shardings = grpo.abstract_state(run)
    state = grpo.initial_state(run, shardings)
    order = PackedRows({"index": np.arange(len(run.prompts[0]))[:, None]}, run.cfg.train.seed)
    return run, state, grpo.make_step(run, order, shardings)


def flax_side(args, run_dir: str) -> dict:
    """Seconds per timed step and generated tokens per step of flaxgpt's GRPO trainer."""
    import jax

    with tempfile.TemporaryDirectory() as workdir:
        run, state, step_fn = flax_trainer(args, run_dir, workdir)
        n = args.batch * args.group
        step_s, generated = [], []
        with run.rt.context():
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                state, figures = step_fn(state, step)
                jax.block_until_ready(state)
                if step >= args.warmup:
                    step_s.append(time.perf_counter() - start)
                    generated.append(figures["response_length"] * n)
        algo = algorithm(run.cfg)
    return {
        "side": "flax",
        "step_s": step_s,
        "generated_tokens": generated,
        "versions": {"jax": jax.__version__},
        "algorithm": algo,
    }


def algorithm(cfg) -> dict:
    """flaxgpt's GRPO settings, as trl_grpo_reference.py reports TRL's."""
    g = cfg.grpo
    return {
        "beta": g.beta,
        "updates_per_rollout": g.epochs,
        "normalization": g.normalization,
        "scale_rewards": g.scale_rewards,
        "clip": [g.clip_low, g.clip_high],
        "mask_truncated": False,  # both sides: ppo.missing_eos_penalty in the reward instead
    }


def timed(module, name: str, spent: dict, key: str):
    """A context in which module.name is wrapped to add its seconds (to block_until_ready) to
    spent[key]; the module is as it was afterwards."""
    import jax

    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*a, **kw):
        start = time.perf_counter()
        out = jax.block_until_ready(inner(*a, **kw))
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
        return out

    return mock.patch.object(module, name, wrapper)


def flax_profile(args, run_dir: str) -> dict:
    """Mean seconds per step of each piece of flaxgpt's GRPO step (see the module docstring)."""
    import jax

    from flaxgpt.trainers import grpo

    spent: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as patches:
        for name, key in (("rollout", "generation"), ("sequences", "host"), ("scores", "scoring")):
            patches.enter_context(timed(grpo, name, spent, key))
        run, state, step_fn = flax_trainer(args, run_dir, workdir)
        batch: dict = {}  # the last step's update batch, so the update is timed apart on it
        place = run.rt.place
        run.rt.place = lambda host, n: batch.update(place(host, n)) or {k: batch[k] for k in host}
        total = 0.0
        with run.rt.context():
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    spent.clear()
                start = time.perf_counter()
                state, _ = step_fn(state, step)
                jax.block_until_ready(state)
                total += (time.perf_counter() - start) * (step >= args.warmup)
            update, reference = update_pieces(run)
            spent["update"] = mean_time(lambda: update(state, batch), args.steps) * args.steps
            if run.cfg.grpo.beta:
                spent["reference log-probs"] = mean_time(lambda: reference(state, batch), args.steps) * args.steps
    spent = {k: v / args.steps for k, v in spent.items()}
    spent["update"] -= spent.get("reference log-probs", 0.0)
    spent["total"] = total / args.steps
    # what is left: the accuracy figure's decoding, batch placement, and the update's in-step timing
    # differing from its separate one (load on a shared machine shows here)
    spent["remainder"] = spent["total"] - sum(v for k, v in spent.items() if k != "total")
    return {"side": "profile", "seconds": spent, "update_shape": tuple(batch["tokens"].shape)}


def update_pieces(run):
    """(the trainer's jitted update, without donation; the reference log-probabilities it starts
    with, jitted alone), for timing on a captured batch."""
    import jax

    from flaxgpt import rlhf
    from flaxgpt.trainers import grpo

    m, temperature = run.models, run.cfg.ppo.temperature

    def reference(state, batch):
        return rlhf.packed_response_logprobs(m.policy, rlhf.reference_params(m, state), batch, temperature)

    return jax.jit(functools.partial(grpo.update, m, run.cfg, run.optimizer)), jax.jit(reference)


def mean_time(fn, repeats: int) -> float:
    """Mean seconds of `fn` to block_until_ready, after one untimed (compiling) call."""
    import jax

    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


# ----------------------------------------------------------------------------- the comparison


def child(args, side: str, threads: int, run_dir: str, hf_dir: str, prompts: str) -> dict:
    """One side in a process of its own (which pins itself to the first `threads` CPUs); its JSON
    line, with the CPU seconds the whole process used (compilation and loading included)."""
    if side == "trl":
        cmd = [TRL_SCRIPT, *trl_args(args, threads, run_dir, hf_dir, prompts)]
    else:
        cmd = [os.path.abspath(__file__), "--side", side, "--init-from", run_dir, "--new-tokens", args.new_tokens]
        cmd += ["--batch", args.batch, "--group", args.group, "--epochs", args.epochs]
        cmd += ["--steps", args.steps, "--warmup", args.warmup, "--threads", threads]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, *map(str, cmd)], env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"the {side} side failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def trl_args(args, threads: int, run_dir: str, hf_dir: str, prompts: str) -> list[str]:
    """trl_grpo_reference.py's arguments: the sizes, and flaxgpt's GRPO settings for TRL to run."""
    cfg = grpo_config(args, run_dir)
    g = cfg.grpo
    out = ["--hf-dir", hf_dir, "--prompts", prompts, "--new-tokens", args.new_tokens, "--threads", threads]
    out += ["--batch", args.batch, "--group", args.group, "--epochs", args.epochs]
    out += ["--steps", args.steps, "--warmup", args.warmup]
    out += ["--world-seed", cfg.data.world_seed, "--world-system", cfg.data.world_system]
    out += ["--beta", g.beta, "--lr", cfg.optimizer.lr, "--temperature", cfg.ppo.temperature]
    out += ["--missing-eos-penalty", cfg.ppo.missing_eos_penalty, "--normalization", g.normalization]
    out += ["--scale-rewards", "group" if g.scale_rewards else "none"]
    return [str(a) for a in out + ["--clip-low", g.clip_low, "--clip-high", g.clip_high]]


def summary(result: dict) -> tuple[float, float]:
    """(steps/s, generated tokens/s) of one process's timed steps."""
    seconds = float(np.sum(result["step_s"]))
    return len(result["step_s"]) / seconds, float(np.sum(result["generated_tokens"])) / seconds


def same_algorithm(rounds: dict) -> dict:
    """The GRPO settings both sides report; exits if they differ (then the comparison is void)."""
    seen = {json.dumps(r["algorithm"], sort_keys=True) for results in rounds.values() for r in results}
    if len(seen) != 1:
        raise SystemExit(f"flaxgpt and TRL ran different GRPO settings: {sorted(seen)}")
    return json.loads(seen.pop())


def busy_warning(threads: list[int]) -> list[str]:
    """A warning (and a blank line) when the machine is oversubscribed and sides run threaded:
    PyTorch's OpenMP threads then collapse while XLA's degrade gently, which flatters flaxgpt."""
    if max(threads) == 1 or os.getloadavg()[0] <= os.cpu_count():
        return []
    return [
        f"**Load exceeds the {os.cpu_count()} CPUs**: PyTorch's OpenMP threads collapse under it "
        "while XLA's degrade gently, so the threaded ratio flatters flaxgpt; on a busy machine read "
        "the 1-thread one.",
        "",
    ]


def table(args, rounds: dict, profile: dict | None, load: str, origin: str) -> str:
    """The RESULTS.md section: one row per side and thread count, the ratios, the profile."""
    algo = same_algorithm(rounds)
    lines = [
        f"## GRPO speed: flaxgpt vs TRL GRPOTrainer ({platform.processor() or platform.machine()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{' and '.join(map(str, args.threads))} threads each)",
        "",
        "    python " + " ".join(["benchmarks/grpo_speed.py", *sys.argv[1:]]),
        "",
        f"{origin}; {args.batch} prompts x group {args.group}, up to {args.new_tokens} new tokens; "
        f"{args.steps} timed steps after {args.warmup} per process, best of {args.rounds} alternating "
        f"rounds. The same algorithm on both sides (TRL's GRPOConfig set to it): {json.dumps(algo)}. "
        f"Load average (1, 5, 15 min) at the start: {load} (a shared machine: the ratio, measured "
        "side by side, is the figure to read; CPU seconds are the whole process's, loading and "
        "compilation included, which load inflates little).",
        "",
        *busy_warning(args.threads),
        "| side | threads | steps/s | generated tokens/s | every round's steps/s | CPU s per process |",
        "|---|---|---|---|---|---|",
    ]
    best = {key: max((summary(r) for r in results), key=lambda s: s[0]) for key, results in rounds.items()}
    for (side, threads), (steps, tokens) in best.items():
        results = rounds[side, threads]
        each = ", ".join(f"{summary(r)[0]:.3g}" for r in results)
        v = results[0]["versions"]
        name = f"flaxgpt (jax {v['jax']})" if side == "flax" else f"TRL {v['trl']} (torch {v['torch']}, eager)"
        cpu = ", ".join(f"{r['cpu_s']:.0f}" for r in results)
        lines.append(f"| {name} | {threads} | {steps:.3g} | {tokens:.4g} | {each} | {cpu} |")
    for threads in args.threads:
        if ("trl", threads) in best:
            ratio = best["flax", threads][0] / best["trl", threads][0]
            lines += ["", f"flaxgpt / TRL steps/s at {threads} thread(s): **{ratio:.2f}x**"]
    if profile:
        seconds, total = profile["seconds"], profile["seconds"]["total"]
        lines += ["", f"Where a flaxgpt step goes ({args.threads[0]} thread(s), a separate profiling process; "]
        rows, width = profile["update_shape"]
        lines[-1] += f"the update's batch was packed into {rows} rows of {width} columns):"
        lines += ["", "| piece | ms/step | share |", "|---|---|---|"]
        lines += [f"| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |" for k, v in seconds.items() if k != "total"]
        lines.append(f"| total | {1e3 * total:.1f} | 100% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", default="", help="a flaxgpt run (default: random weights, world shape)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="updates per rollout")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--threads",
        type=lambda v: [int(t) for t in v.split(",")],
        default=sorted({1, cpus}),
        help="CPUs per side, a comma list (each round runs every count)",
    )
    parser.add_argument("--profile", action="store_true", help="+ where flaxgpt's step goes (at the first --threads)")
    parser.add_argument("--no-trl", action="store_true", help="flaxgpt's side only")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer model (checks the script)")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--side", choices=("flax", "profile"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        os.sched_setaffinity(0, range(args.threads[0]))  # before JAX starts its threads
        from flaxgpt.host_allocator import tune_host_allocator

        tune_host_allocator()  # as the training CLI does
        result = (flax_side if args.side == "flax" else flax_profile)(args, args.init_from)
        print(json.dumps(result))
        return
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.init_from or random_run(os.path.join(scratch, "run"), args.tiny)
        hf_dir, prompts = os.path.join(scratch, "hf"), os.path.join(scratch, "hf", "prompts.json")
        sides = ["flax"] if args.no_trl else ["flax", "trl"]
        if not args.no_trl:
            export_for_trl(run_dir, hf_dir)
            trl_prompts(args, run_dir, prompts)
        rounds: dict[tuple[str, int], list[dict]] = {(s, t): [] for t in args.threads for s in sides}
        for _ in range(args.rounds):
            for side, threads in rounds:
                rounds[side, threads].append(child(args, side, threads, run_dir, hf_dir, prompts))
        profile = child(args, "profile", args.threads[0], run_dir, hf_dir, prompts) if args.profile else None
    origin = f"weights of {args.init_from}" if args.init_from else "random weights of the world model's shape"
    text = table(args, rounds, profile, load, origin)
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
