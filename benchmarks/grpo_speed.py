"""GRPO speed: flaxgpt's GRPO trainer against TRL's GRPOTrainer on the world's tiny model.

    python benchmarks/grpo_speed.py                              # random weights, world model shape
    python benchmarks/grpo_speed.py --init-from runs/sft_world   # the SFT model: real answer lengths
    python benchmarks/grpo_speed.py --profile                    # + where flaxgpt's step time goes
    python benchmarks/grpo_speed.py --tiny --no-trl --steps 1    # checks the script in seconds

Both sides train the same model (the flaxgpt run, exported with `flaxgpt.convert`'s Hugging Face
export; the character tokenizer is written beside it), on the same world questions rendered by
flaxgpt's chat template, with the same group size, batch, lengths, temperature, learning rate,
clipping, k3 KL weight and updates per rollout (`experiments/grpo_world.py`'s settings), and the
world's labeler as the reward, a Python callable on both sides. flaxgpt runs its real trainer
step (`trainers/grpo.make_step`); TRL runs `benchmarks/trl_grpo_reference.py` (PyTorch eager on
the CPU, transformers' `generate`, no vLLM). Each side runs in its own process, pinned to the same
`--threads` CPUs, and the processes alternate (flax, trl, flax, trl, ...) so that load from other
work falls on both; the best round of each side counts. A step is one rollout batch (batch
prompts x group answers) and its updates; the first `--warmup` steps (compilation) are not timed.

`--profile` adds, in a further flaxgpt process, where a step's time goes: generation, the host's
part of the rollout (padding, sequences), scoring (decoding + the reward function), and the jitted
update, split into the old and reference log-probabilities and the epochs of forward, backward and
Adam. Each piece is timed to `block_until_ready` by wrapping the trainer's functions in that
process; the trainer itself is unchanged.
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
    return {"side": "flax", "step_s": step_s, "generated_tokens": generated, "versions": {"jax": jax.__version__}}


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
        placed: list = [None]
        place = run.rt.place
        run.rt.place = lambda host, n: placed.__setitem__(0, place(host, n)) or placed[0]
        total = 0.0
        with run.rt.context():
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    spent.clear()
                start = time.perf_counter()
                state, _ = step_fn(state, step)
                jax.block_until_ready(state)
                total += (time.perf_counter() - start) * (step >= args.warmup)
            update, logprobs = update_pieces(run)
            batch = placed[0]
            spent["update"] = mean_time(lambda: update(state, batch), args.steps) * args.steps
            spent["old + reference log-probs"] = mean_time(lambda: logprobs(state, batch), args.steps) * args.steps
            trimmed, narrow = used_columns(run, batch)
            spent["update at the used columns (not in the step)"] = (
                mean_time(lambda: trimmed(state, narrow), args.steps) * args.steps
            )
    spent = {k: v / args.steps for k, v in spent.items()}
    spent["update"] -= spent["old + reference log-probs"]
    spent["total"] = total / args.steps
    # what is left: the accuracy figure's decoding, batch placement, and the update's in-step timing
    # differing from its separate one (load on a shared machine shows here)
    inside = [k for k in spent if k != "total" and "not in the step" not in k]
    spent["remainder"] = spent["total"] - sum(spent[k] for k in inside)
    return {"side": "profile", "seconds": spent}


def update_pieces(run):
    """(the trainer's jitted update, without donation; the old and reference log-probabilities
    it starts with, jitted alone), for timing on a captured batch."""
    import jax

    from flaxgpt import rlhf
    from flaxgpt.trainers import grpo

    m, q, temperature = run.models, run.models.query_width, run.cfg.ppo.temperature

    def logprobs(state, batch):
        inputs = (batch["tokens"], batch["positions"], batch["segments"])
        lp = lambda params: rlhf.response_logprobs(m.policy, params, *inputs, q, temperature)[0]
        return lp(state.params["policy"]), lp(state.frozen["reference"])

    return jax.jit(functools.partial(grpo.update, m, run.cfg, run.optimizer)), jax.jit(logprobs)


def used_columns(run, batch: dict):
    """(the update jitted for narrower rows, the batch cut to the columns some row uses): the
    padding left of the longest prompt and right of the longest answer, which the trainer's update
    computes on (one compiled shape) and TRL's, padding to the batch's longest, does not."""
    import jax

    from flaxgpt.trainers import grpo

    used = np.asarray(batch["segments"]).any(axis=0)
    lo, hi, q = int(np.argmax(used)), len(used) - int(np.argmax(used[::-1])), run.models.query_width
    m = dataclasses.replace(run.models, query_width=q - lo)
    narrow = {k: batch[k][:, lo:hi] for k in ("tokens", "positions", "segments")}
    narrow.update(resp_mask=batch["resp_mask"][:, : hi - q], advantages=batch["advantages"])
    return jax.jit(functools.partial(grpo.update, m, run.cfg, run.optimizer)), narrow


def mean_time(fn, repeats: int) -> float:
    """Mean seconds of `fn` to block_until_ready, after one untimed (compiling) call."""
    import jax

    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


# ----------------------------------------------------------------------------- the comparison


def child(args, side: str, run_dir: str, hf_dir: str, prompts: str) -> dict:
    """One side in a process of its own (which pins itself to the first --threads CPUs); its JSON line."""
    common = ["--batch", args.batch, "--group", args.group, "--epochs", args.epochs]
    common += ["--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads]
    if side == "trl":
        cfg = grpo_config(args, run_dir)
        cmd = [TRL_SCRIPT, "--hf-dir", hf_dir, "--prompts", prompts, "--new-tokens", args.new_tokens]
        cmd += ["--world-seed", cfg.data.world_seed, "--world-system", cfg.data.world_system]
        cmd += ["--beta", cfg.grpo.beta, "--lr", cfg.optimizer.lr, "--temperature", cfg.ppo.temperature]
        cmd += ["--missing-eos-penalty", cfg.ppo.missing_eos_penalty]
    else:
        cmd = [os.path.abspath(__file__), "--side", side, "--init-from", run_dir, "--new-tokens", args.new_tokens]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, *map(str, cmd + common)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(result: dict) -> tuple[float, float]:
    """(steps/s, generated tokens/s) of one process's timed steps."""
    seconds = float(np.sum(result["step_s"]))
    return len(result["step_s"]) / seconds, float(np.sum(result["generated_tokens"])) / seconds


def busy_warning(threads: int) -> list[str]:
    """A warning (and a blank line) when the machine is oversubscribed and sides run threaded:
    PyTorch's OpenMP threads then collapse while XLA's degrade gently, which flatters flaxgpt."""
    if threads == 1 or os.getloadavg()[0] <= os.cpu_count():
        return []
    return [
        f"**Load exceeds the {os.cpu_count()} CPUs**: PyTorch's OpenMP threads collapse under it "
        "while XLA's degrade gently, so this ratio flatters flaxgpt; on a busy machine compare "
        "at `--threads 1`.",
        "",
    ]


def table(args, rounds: dict[str, list[dict]], profile: dict | None, load: str, origin: str) -> str:
    best = {side: max((summary(r) for r in results), key=lambda s: s[0]) for side, results in rounds.items()}
    lines = [
        f"## GRPO speed: flaxgpt vs TRL GRPOTrainer ({platform.processor() or platform.machine()}, "
        f"{datetime.date.today()}, {args.threads} threads each)",
        "",
        "    python " + " ".join(["benchmarks/grpo_speed.py", *sys.argv[1:]]),
        "",
        f"{origin}; {args.batch} prompts x group {args.group}, up to {args.new_tokens} new tokens, "
        f"{args.epochs} updates per rollout; {args.steps} timed steps after {args.warmup} per process, "
        f"best of {args.rounds} alternating rounds. Load average (1, 5, 15 min) at the start: {load} "
        "(a shared machine: the ratio, measured side by side, is the figure to read).",
        "",
        *busy_warning(args.threads),
        "| side | steps/s | generated tokens/s | every round's steps/s |",
        "|---|---|---|---|",
    ]
    for side, (steps, tokens) in best.items():
        each = ", ".join(f"{summary(r)[0]:.3g}" for r in rounds[side])
        name = "flaxgpt (jax " + rounds[side][0]["versions"].get("jax", "") + ")" if side == "flax" else side
        if side == "trl":
            v = rounds[side][0]["versions"]
            name = f"TRL {v['trl']} (torch {v['torch']}, eager)"
        lines.append(f"| {name} | {steps:.3g} | {tokens:.4g} | {each} |")
    if "trl" in best and "flax" in best:
        lines += ["", f"flaxgpt / TRL steps/s: **{best['flax'][0] / best['trl'][0]:.2f}x**"]
    if profile:
        total = profile["total"]
        lines += ["", "Where a flaxgpt step goes (a separate profiling process):", ""]
        lines += ["| piece | ms/step | share |", "|---|---|---|"]
        lines += [f"| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |" for k, v in profile.items() if k != "total"]
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
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-trl", action="store_true", help="flaxgpt's side only")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer model (checks the script)")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--side", choices=("flax", "profile"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        os.sched_setaffinity(0, range(args.threads))  # before JAX starts its threads
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
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                rounds[side].append(child(args, side, run_dir, hf_dir, prompts))
        profile = child(args, "profile", run_dir, hf_dir, prompts)["seconds"] if args.profile else None
    origin = f"weights of {args.init_from}" if args.init_from else "random weights of the world model's shape"
    text = table(args, rounds, profile, load, origin)
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
