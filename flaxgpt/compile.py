"""`python -m flaxgpt.compile --experiment NAME --topology v5p:8x8x8 [--set key=value ...] [--json]`

Compiles, ahead of time and with abstract inputs only (no weights are allocated), every jitted
program a run executes, for the devices of a TPU topology (libtpu compiles for pods on any
machine: `pip install -e '.[tpu]'`) or, without --topology, for this process's own devices:

  train_step   the optimizer step with its real state, shardings and donation (pretrain, SFT,
               reward model, DPO/KTO/ORPO on their record rows; `train.grad_accum_steps`
               micro-batches scanned inside)
  eval_step    the validation loss
  reference_logprobs  DPO, KTO: the reference log-probabilities computed once before training
  prefill      generation's prompt pass, which fills the KV cache (sampling, serving, SFT answers,
               PPO and GRPO rollouts: rollout_prefill)
  decode_step  one generated token for the whole batch against the cache
  ppo_score    PPO: log-probs of policy and reference, values, rewards and advantages of a rollout
  ppo_update   PPO: epochs x minibatches of clipped policy and value updates
  reward_score GRPO with ppo.reward_from: the reward model on the rollout
  grpo_update  GRPO: grpo.epochs updates on the whole rollout, with its reference log-probs

For each: per-device memory of parameters, optimizer state, inputs, temporaries and the total
against the device's capacity (XLA's `memory_analysis`); hardware FLOPs per call (XLA's
`cost_analysis`, which counts a loop's body once: with scanned layers or micro-batches the FLOPs
come from two calibration compiles of the same program unrolled at 1 and 2 layers, scaled to the
real depth and trip count; remat's recomputation is in it; never taken below the model FLOPs
plus that recomputation, as XLA counts a Pallas kernel as nothing); a roofline lower bound on the
call's time from the chip's datasheet peak FLOP/s and HBM bandwidth, hence an upper bound on MFU
(model FLOPs, `flaxgpt.mfu`'s convention: remat is not credited); and the compile time.

A program that does not fit ends the command with exit status 1 and one line
`does not fit: ...; try ...`. `--set train.compile_only=true` on `python -m flaxgpt.train`
prints the same report for the run's own devices (CPU, GPU) and exits without training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The trainers' own step builders, compiled here exactly as the trainers jit them. Today's names:
# this is the one place to follow them when they move.
from flaxgpt import cli, generate, lora, mfu, preference, rlhf
from flaxgpt.config import Config, ModelConfig
from flaxgpt.errors import UserError
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.rewards import ranking_objective, rewards_at_last
from flaxgpt.runs import inherit_model, read_run
from flaxgpt.sharding import batch_sharding, logical_rules, make_mesh
from flaxgpt.state import abstract_train_state
from flaxgpt.trainers import dpo, grpo, kto, orpo
from flaxgpt.trainers.scaffold import Runtime
from flaxgpt.trainers.step import make_eval_step, make_train_step

GiB = 2**30


# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Chip:
    """Datasheet figures of one JAX device (a TPU chip; a core on v2/v3, where each core is a device)."""

    kind: str
    hbm_bytes: float
    hbm_bandwidth: float | None  # bytes/s; None: unknown (no memory term in the roofline)
    peak_flops: float  # dense bfloat16 FLOP/s


# Cloud TPU system-architecture pages and NVIDIA datasheets. v2/v3 list per-chip figures for two
# cores; JAX exposes each core as a device, so the figures here are halved.
CHIPS: dict[str, Chip] = {
    "TPU v2": Chip("TPU v2 (core)", 8 * GiB, 300e9, 23e12),
    "TPU v3": Chip("TPU v3 (core)", 16 * GiB, 450e9, 61.5e12),
    "TPU v4": Chip("TPU v4", 32 * GiB, 1228e9, 275e12),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 819e9, 197e12),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 2765e9, 459e12),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 1640e9, 918e12),
    "NVIDIA H100": Chip("NVIDIA H100 SXM", 80e9, 3.35e12, 989e12),
    "NVIDIA H200": Chip("NVIDIA H200 SXM", 141e9, 4.8e12, 989e12),
    "NVIDIA A100": Chip("NVIDIA A100 SXM 80GB", 80e9, 2.04e12, 312e12),
}


def chip_of(device: Any, dtype: str) -> Chip:
    kind = getattr(device, "device_kind", "") or device.platform
    for name in sorted(CHIPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if kind.startswith(name):
            chip = CHIPS[name]
            known = mfu.known_peak(device, dtype)  # the float32 figure on GPUs
            return dataclasses.replace(chip, peak_flops=known or chip.peak_flops)
    if device.platform == "gpu":
        limit = (device.memory_stats() or {}).get("bytes_limit", 0)
        return Chip(kind, float(limit), None, mfu.peak_flops(dtype)[0])
    # CPU devices (simulated ones included) share the host's memory and cores
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = len(jax.devices())
    return Chip(f"{kind} (host memory / {n} devices)", host / n, None, mfu.peak_flops(dtype)[0] / n)


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of a TPU topology such as v5p:8x8x8 or v5e:4x4, compiled for from any machine."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise UserError(f"--topology needs jax.experimental.topologies: {e}") from e
    match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
    if not match:
        raise UserError(f"--topology {name!r}: expected GENERATION:AxB[xC], e.g. v5e:4x4 or v5p:8x8x8")
    dims = [int(d) for d in match.group(2).split("x")]
    kwargs: dict[str, Any] = {}
    if math.prod(dims) < 4:  # smaller than one host's default 2x2x1 chips: the slice is one host
        kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    if slices > 1:
        kwargs["num_slices"] = slices
    # libtpu takes a machine-wide lock file when it loads; compiling for a topology needs no TPU,
    # so let several such processes (a test worker, a benchmark) load it side by side
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu missing or the name unknown to it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if _libtpu_present() else "; libtpu is not installed: pip install -e '.[tpu]'"
        raise UserError(f"--topology {name}: {first}{hint}") from e


def _libtpu_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


# ----------------------------------------------------------------------------- programs


@dataclass
class Program:
    """One jitted function with its abstract arguments, and how to count its work."""

    name: str
    jitted: Any  # jax.jit(...) with the shardings the run uses
    args: tuple  # ShapeDtypeStructs carrying NamedShardings (pytrees)
    roles: tuple  # per argument: "params", "opt_state", "state" (params + optimizer state) or "inputs"
    model_flops: float  # what the model needs per call (mfu.flops_per_token; 2N per forward token)
    trips: int = 1  # iterations of an outer loop XLA counts once (micro-batches, PPO minibatches)
    hardware_flops: float = 0.0  # the least the chip runs per call: model FLOPs + remat's recompute
    compiled: Any = None  # set once compiled (the decode step takes the prefill's cache shardings)
    compile_cpu_s: float = 0.0


@dataclass
class Report:
    program: str
    params_gib: float
    opt_state_gib: float
    inputs_gib: float
    temp_gib: float
    total_gib: float
    capacity_gib: float
    flops: float  # hardware FLOPs per device per call, loops corrected, remat included
    bytes_accessed: float
    model_flops: float  # per device per call: the MFU convention (no remat credit)
    bound_s: float  # roofline lower bound on one call
    mfu_bound: float
    compile_s: float
    flops_source: str = "cost_analysis"
    compile_cpu_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _structs(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _n_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _lm_batch(batch: int, length: int, sharding: NamedSharding) -> dict:
    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
    return {
        "inputs": ints,
        "targets": ints,
        "positions": ints,
        "segment_ids": ints,
        "loss_weights": jax.ShapeDtypeStruct((batch, length), jnp.float32, sharding=sharding),
    }


def _ranking_batch(batch: int, k: int, length: int, sharding: NamedSharding) -> dict:
    three = lambda dtype: jax.ShapeDtypeStruct((batch, k, length), dtype, sharding=sharding)
    two = lambda dtype: jax.ShapeDtypeStruct((batch, k), dtype, sharding=sharding)
    return {
        "inputs": three(jnp.int32),
        "segment_ids": three(jnp.int32),
        "positions": three(jnp.int32),
        "last": two(jnp.int32),
        "ranks": two(jnp.float32),
        "valid": two(jnp.float32),
    }


def generation_programs(
    model: Transformer, params: Any, batch: int, prompt: int, new_tokens: int, mesh: Mesh, prefix: str = ""
) -> list[Program]:
    """Prefill and one decode step of `generate` (prompts and tokens replicated, as `on_params_mesh`
    places them; the cache takes the sharding XLA gives it in the prefill)."""
    rep = NamedSharding(mesh, PartitionSpec())
    total = prompt + new_tokens
    n = _n_params(params)
    prefill = jax.jit(lambda p, tokens, mask: generate._prefill(model, p, tokens, mask, total))
    tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rep)
    mask = jax.ShapeDtypeStruct((batch, prompt), jnp.bool_, sharding=rep)
    progs = [
        Program(
            prefix + "prefill",
            prefill,
            (params, tokens, mask),
            ("params", "inputs", "inputs"),
            2.0 * n * batch * prompt,
        )
    ]

    def decode_args() -> tuple:
        compiled = progs[0].compiled or prefill.lower(params, tokens, mask).compile()
        cache_shapes = jax.eval_shape(prefill, params, tokens, mask)[1]
        cache = _structs(cache_shapes, compiled.output_shardings[1])
        one = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)
        return params, cache, one, one

    step = jax.jit(lambda p, cache, token, position: generate._step(model, p, cache, token, position), donate_argnums=1)
    progs.append(
        _LazyProgram(
            prefix + "decode_step", step, decode_args, ("params", "inputs", "inputs", "inputs"), 2.0 * n * batch
        )
    )
    return progs


class _LazyProgram(Program):
    """A program whose arguments come from compiling another one first (the decode step's cache)."""

    def __init__(self, name, jitted, make_args, roles, model_flops, trips=1):
        super().__init__(name, jitted, (), roles, model_flops, trips)
        self._make_args = make_args

    def resolve(self) -> None:
        if not self.args:
            self.args = self._make_args()


def _train_flops_per_token(mc: ModelConfig, params: Any) -> tuple[float, float]:
    """(model FLOPs, remat's extra hardware FLOPs) of one trained token of `params`'s model: with
    LoRA only the adapters get weight gradients."""
    n = _n_params(params)
    trained = lora.count_trained(params) if mc.lora_rank else None
    return mfu.flops_per_token(mc, n, trained), mfu.remat_flops_per_token(mc, n)


# the preference trainers' objectives and the row prefixes of their records (preference.pair_rows,
# feedback_rows): a pair is a chosen and a rejected row, a feedback record its own and a mismatched one
PREFERENCE = {"dpo": dpo.method, "kto": kto.method, "orpo": orpo.method}
ROW_PREFIXES = {"pairs": ("chosen_", "rejected_"), "feedback": ("", "kl_")}


def _objective(cfg: Config, model: Transformer, sharding: NamedSharding) -> tuple[Any, Callable, int]:
    """(loss sums, None for next-token; b -> the abstract batch of b examples; rows of block_size
    tokens per example). Preference rows are padded to the longest record, at most block_size:
    compiled at block_size, the most a run can meet."""
    tc, block = cfg.train, cfg.model.block_size
    if tc.trainer == "reward":
        k = cfg.data.world_ranking_k
        return ranking_objective(model, cfg.reward.margin), lambda b: _ranking_batch(b, k, block, sharding), k
    if tc.trainer not in PREFERENCE:
        return None, lambda b: _lm_batch(b, block, sharding), 1
    method = PREFERENCE[tc.trainer](cfg)
    prefixes = ROW_PREFIXES[method.kind]
    columns = [
        "valid",
        *(["desirable"] if method.kind == "feedback" else []),
        *(f"ref_{p}logp" for p in method.reference),
    ]

    def batch(b: int) -> dict:
        rows = {p + k: v for p in prefixes for k, v in _lm_batch(b, block, sharding).items()}
        return rows | {c: jax.ShapeDtypeStruct((b, 1), jnp.float32, sharding=sharding) for c in columns}

    return method.objective(model), batch, len(prefixes)


def lm_programs(cfg: Config, mesh: Mesh, rules: tuple) -> list[Program]:
    """Pretraining, SFT, the reward model and the preference trainers (DPO, KTO, ORPO): the loop's
    train step, the eval step, the reference log-probabilities computed once before training (DPO,
    KTO), generation (SFT answers, samples, the preference runs' world answers)."""
    tc, mc = cfg.train, cfg.model
    reward = tc.trainer == "reward"
    model = Transformer(dataclasses.replace(mc, output="scalar") if reward else mc)
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps, lora.trainable_mask if mc.lora_rank else None)
    schedule = learning_rate_schedule(cfg.optimizer, tc.max_steps)
    example = jax.ShapeDtypeStruct((1, mc.block_size), jnp.int32)  # abstract: nothing runs
    state, shardings = abstract_train_state(model, optimizer, example, mesh, rules)
    rows = batch_sharding(mesh, rules)
    eval_batch = cfg.eval.batch_size or tc.batch_size
    loss_sums, batch_of, per_example = _objective(cfg, model, rows)
    tokens, eval_tokens = (b * per_example * mc.block_size for b in (tc.batch_size, eval_batch))
    per_token, recompute = _train_flops_per_token(mc, state.params)
    forward = mfu.forward_flops_per_token(mc, _n_params(state.params))
    step = jax.jit(
        make_train_step(model, optimizer, schedule, tc, loss_sums),
        in_shardings=(shardings, rows),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    evaluate = jax.jit(make_eval_step(model, loss_sums))
    eval_args = (state.params, batch_of(eval_batch))
    progs = [
        Program(
            "train_step",
            step,
            (state, batch_of(tc.batch_size)),
            ("state", "inputs"),
            per_token * tokens,
            tc.grad_accum_steps,
            (per_token + recompute) * tokens,
        ),
        Program("eval_step", evaluate, eval_args, ("params", "inputs"), forward * eval_tokens),
    ]
    reference = PREFERENCE[tc.trainer](cfg).reference if tc.trainer in PREFERENCE else ()
    if reference:
        ref_forward = preference.reference_forward(model, reference)
        progs.append(Program("reference_logprobs", ref_forward, eval_args, ("params", "inputs"), forward * eval_tokens))
    answers = tc.trainer == "sft" or (tc.trainer in PREFERENCE and cfg.data.source == "world")  # SFT's metrics
    if answers or tc.trainer == "pretrain":
        new = cfg.sft.max_new_tokens if answers else min(cfg.eval.sample_tokens, mc.block_size // 2)
        new = max(1, min(new, mc.block_size - 1))
        progs += generation_programs(model, state.params, eval_batch, mc.block_size - new, new, mesh)
    return progs


def ppo_programs(cfg: Config, mesh: Mesh, rules: tuple) -> list[Program]:
    """PPO: the rollout's prefill and decode step, scoring the rollout, and the update. The reward
    and value models are shaped like the policy (a reward run's own shape is not known before it
    exists), with the value model separate unless `ppo.value_model='head'`."""
    p, tc, mc = cfg.ppo, cfg.train, dataclasses.replace(cfg.model, output="logits")
    rt = Runtime("", mesh, rules, batch_sharding(mesh, rules))
    scalar = dataclasses.replace(mc, output="scalar", dropout=0.0)
    query_width = rlhf.query_width(p, mc.block_size)
    models = rlhf.Models(
        Transformer(mc), Transformer(scalar), Transformer(scalar), p.value_model == "head", query_width
    )
    updates = tc.max_steps * p.epochs * p.minibatches
    optimizer = build_optimizer(cfg.optimizer, updates, lora.trainable_mask if mc.lora_rank else None)
    run = rlhf.PPO(dataclasses.replace(cfg, model=mc), rt, None, models, {}, optimizer, None, None, None, [])
    state, shardings = rlhf.abstract_state(run, *rlhf.boxed_params(models))
    score_rollout = jax.jit(functools.partial(rlhf.score_rollout, models, p))
    update = jax.jit(
        functools.partial(rlhf.update, models, p, optimizer),
        in_shardings=(shardings, rt.rows_sharding, None, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    rows, b, t = rt.rows_sharding, tc.batch_size, mc.block_size
    n_policy = _n_params(state.params["policy"])
    n_value = n_policy if p.value_model == "separate" else 0
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)
    column = lambda dtype: jax.ShapeDtypeStruct((b, 1), dtype, sharding=rows)
    score_args = (state, ints, jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows), column(jnp.int32))
    score_args += (column(jnp.float32), column(jnp.float32))
    forward = lambda params, tokens: 2.0 * params * tokens
    score_flops = forward(3 * n_policy + n_value, b * t)  # policy, reference, value, reward
    q = query_width
    resp = t - q
    batch = {
        "tokens": ints,
        "positions": ints,
        "segments": ints,
        **{
            k: jax.ShapeDtypeStruct((b, resp), jnp.float32, sharding=rows)
            for k in ("resp_mask", "logprobs", "values", "advantages", "returns")
        },
    }
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    trained = [_train_flops_per_token(mc, state.params["policy"])]
    if p.value_model == "separate":
        trained.append(_train_flops_per_token(scalar, state.params["value"]))
    update_tokens = b * t * p.epochs  # every row once an epoch, in minibatches
    update_flops = sum(model for model, _ in trained) * update_tokens
    update_hardware = sum(model + extra for model, extra in trained) * update_tokens
    progs = generation_programs(models.policy, state.params["policy"], b, q, p.max_new_tokens, mesh, "rollout_")
    progs.append(Program("ppo_score", score_rollout, score_args, ("state",) + ("inputs",) * 5, score_flops))
    update_args = (state, batch, None, kl)  # no pretraining mix (ptx) batch
    progs.append(
        Program(
            "ppo_update",
            update,
            update_args,
            ("state",) + ("inputs",) * 3,
            update_flops,
            p.epochs * p.minibatches,
            update_hardware,
        )
    )
    return progs


def grpo_programs(cfg: Config, mesh: Mesh, rules: tuple) -> list[Program]:
    """GRPO: the rollout's prefill and decode step for batch_size x group_size answers, the reward
    model's scores (ppo.reward_from, shaped like the policy as for PPO) and the update (grpo.epochs
    full-batch steps; the rollout policy's and the reference's log-probabilities inside it)."""
    p, g, tc = cfg.ppo, cfg.grpo, cfg.train
    mc = dataclasses.replace(cfg.model, output="logits")
    rt = Runtime("", mesh, rules, batch_sharding(mesh, rules))
    q = rlhf.query_width(p, mc.block_size)
    policy = Transformer(mc)
    scorer = Transformer(dataclasses.replace(mc, output="scalar", dropout=0.0)) if p.reward_from else None
    models = rlhf.Models(policy, policy, scorer, False, q)
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps * g.epochs, lora.trainable_mask if mc.lora_rank else None)
    run = rlhf.PPO(dataclasses.replace(cfg, model=mc), rt, None, models, {}, optimizer, None, None, None, [])
    state, shardings = grpo.abstract_state(run)
    n, t, rows = tc.batch_size * g.group_size, q + p.max_new_tokens, rt.rows_sharding
    width = grpo.packed_width(q + g.group_size * p.max_new_tokens)  # the longest group, one per row at most
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, width), jnp.int32, sharding=rows) for k in grpo.PACKED}
    batch.update({k: jax.ShapeDtypeStruct((n, t - q), jnp.int32, sharding=rows) for k in ("source", "targets")})
    batch["resp_mask"] = jax.ShapeDtypeStruct((n, t - q), jnp.float32, sharding=rows)
    batch["advantages"] = jax.ShapeDtypeStruct((n, 1), jnp.float32, sharding=rows)
    per_token, recompute = _train_flops_per_token(mc, state.params["policy"])
    forward = mfu.forward_flops_per_token(mc, _n_params(state.params["policy"]))
    update = jax.jit(functools.partial(grpo.update, models, run.cfg, optimizer), donate_argnums=0)
    update_flops = (g.epochs * per_token + 2 * forward) * n * t  # + old and reference log-probabilities
    progs = generation_programs(policy, state.params["policy"], n, q, p.max_new_tokens, mesh, "rollout_")
    if scorer is not None:
        rep = NamedSharding(mesh, PartitionSpec())
        last = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep)
        inputs = (*(jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=rep) for _ in range(3)), last)
        score = jax.jit(functools.partial(rewards_at_last, scorer))
        reward_flops = mfu.forward_flops_per_token(mc, _n_params(state.frozen["reward"])) * n * t
        progs.append(
            Program(
                "reward_score", score, (state.frozen["reward"], *inputs), ("params",) + ("inputs",) * 4, reward_flops
            )
        )
    hardware = update_flops + g.epochs * recompute * n * t
    progs.append(Program("grpo_update", update, (state, batch), ("state", "inputs"), update_flops, 1, hardware))
    return progs


def build_programs(cfg: Config, mesh: Mesh, rules: tuple) -> list[Program]:
    """Every jitted program the run of `cfg.train.trainer` executes, with abstract arguments."""
    builders = {"ppo": ppo_programs, "grpo": grpo_programs}
    return builders.get(cfg.train.trainer, lm_programs)(cfg, mesh, rules)


# ----------------------------------------------------------------------------- compiling and measuring


def _compile(prog: Program) -> tuple[Any, float]:
    if isinstance(prog, _LazyProgram):
        prog.resolve()
    start, cpu = time.perf_counter(), time.process_time()
    prog.compiled = prog.jitted.lower(*prog.args).compile()
    prog.compile_cpu_s = time.process_time() - cpu  # all threads' CPU time: a busy machine inflates only the wall time
    return prog.compiled, time.perf_counter() - start


def _cost(compiled: Any) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _calibration_config(cfg: Config, layers: int) -> Config:
    """The run unrolled at `layers` layers, one micro-batch per step: a program without loops,
    whose cost XLA counts in full."""
    tc = cfg.train
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, n_layer=layers, scan_layers=False),
        train=dataclasses.replace(tc, batch_size=tc.batch_size // tc.grad_accum_steps, grad_accum_steps=1),
        eval=dataclasses.replace(cfg.eval, batch_size=cfg.eval.batch_size or tc.batch_size),
    )


def calibrated_costs(cfg: Config, mesh: Mesh, rules: tuple, names: set[str]) -> dict[str, tuple[float, float]]:
    """{program: (FLOPs, bytes accessed) per call} for the real depth, from compiles unrolled at 1
    and 2 layers: cost(L) = cost(1) + (L - 1) (cost(2) - cost(1)), times the outer trip count."""
    costs = []
    for layers in (1, 2):
        progs = [p for p in build_programs(_calibration_config(cfg, layers), mesh, rules) if p.name in names]
        costs.append({p.name: _cost(_compile(p)[0]) for p in progs})
    depth = cfg.model.n_layer
    return {
        name: tuple(one + (depth - 1) * (two - one) for one, two in zip(costs[0][name], costs[1][name]))
        for name in costs[0]
    }


def _role_bytes(prog: Program) -> dict[str, float]:
    out = {"params": 0.0, "opt_state": 0.0, "inputs": 0.0}
    for arg, role in zip(prog.args, prog.roles):
        if role == "state":
            held = _shard_bytes(arg.params) + _shard_bytes(getattr(arg, "frozen", None))
            opt = _shard_bytes(arg.opt_state)
            out["params"] += held
            out["opt_state"] += opt
            out["inputs"] += _shard_bytes(arg) - held - opt  # step, key, counters
        else:
            out[role] += _shard_bytes(arg)
    return out


def measure(prog: Program, chip: Chip, dtype: str, calibration: dict | None = None) -> Report:
    start = time.perf_counter()
    try:
        compiled, seconds = _compile(prog)
    except Exception as e:  # XLA:TPU refuses outright when the temporaries cannot fit
        temp = _oom_bytes(str(e))
        if temp is None:
            raise
        roles = _role_bytes(prog)
        held = sum(roles.values())
        return Report(
            prog.name,
            *(roles[k] / GiB for k in ("params", "opt_state", "inputs")),
            temp / GiB,
            (held + temp) / GiB,
            chip.hbm_bytes / GiB,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            time.perf_counter() - start,
            flops_source="none: XLA refused to compile",
            notes=[str(e).strip().splitlines()[0][:300]],
        )
    mem = compiled.memory_analysis()
    roles = _role_bytes(prog)
    temp = float(getattr(mem, "temp_size_in_bytes", 0))
    total = float(mem.argument_size_in_bytes) + float(mem.output_size_in_bytes) - float(mem.alias_size_in_bytes) + temp
    notes = []
    if calibration is not None and prog.name in calibration:
        flops, accessed = (x * prog.trips for x in calibration[prog.name])
        source = "cost_analysis, 1+2-layer calibration"
    else:
        flops, accessed = (x * prog.trips for x in _cost(compiled))
        source = "cost_analysis" + (f" x {prog.trips} trips" if prog.trips > 1 else "")
    devices = len(jax.tree.leaves(prog.args)[0].sharding.device_set)
    model_flops = prog.model_flops / devices
    floor = max(prog.hardware_flops, prog.model_flops) / devices
    if flops < floor:  # XLA counts a Pallas kernel (TPU splash attention) as no FLOPs
        flops, source = floor, source + " < model FLOPs + remat recompute: that instead"
    compute_s = flops / chip.peak_flops if chip.peak_flops else 0.0
    memory_s = accessed / chip.hbm_bandwidth if chip.hbm_bandwidth else 0.0
    bound = max(compute_s, memory_s)
    if not chip.hbm_bandwidth:
        notes.append("no HBM bandwidth figure: compute-only bound")
    return Report(
        program=prog.name,
        params_gib=roles["params"] / GiB,
        opt_state_gib=roles["opt_state"] / GiB,
        inputs_gib=roles["inputs"] / GiB,
        temp_gib=temp / GiB,
        total_gib=total / GiB,
        capacity_gib=chip.hbm_bytes / GiB,
        flops=flops,
        bytes_accessed=accessed,
        model_flops=model_flops,
        bound_s=bound,
        mfu_bound=model_flops / (chip.peak_flops * bound) if bound > 0 else 0.0,
        compile_s=seconds,
        flops_source=source,
        notes=notes,
        compile_cpu_s=prog.compile_cpu_s,
    )


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> float | None:
    """The temporaries an out-of-memory compile error says the program needs ("HLO temporaries (28.1G)
    exceeds available HBM (15.75G)"), NaN when it gives no figure, None for another error."""
    for pattern in (
        r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds",
        r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm",
    ):
        match = re.search(pattern, message)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    if "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message:
        return float("nan")
    return None


def _not_fit_line(program: str, need: float, have: float, tips: list[str]) -> str:
    needs = "more than it has" if math.isnan(need) else f"{need:.2f} GiB"
    tried = "; try " + ", ".join(tips) if tips else "; try more fsdp, model.remat=full, a smaller batch"
    return f"does not fit: {program} needs {needs} per chip of {have:.2f} GiB{tried}"


def suggestions(cfg: Config, rep: Report, mesh: Mesh) -> list[str]:
    """What would shrink this program's memory, most effective first."""
    tips, n = [], mesh.devices.size
    fsdp, tc = mesh.shape["fsdp"], cfg.train
    if rep.params_gib + rep.opt_state_gib > 0.3 * rep.capacity_gib and fsdp < n:
        tips.append(f"more fsdp (mesh.fsdp={n // mesh.shape['tensor']} mesh.data=1)")
    if cfg.model.remat == "none":
        tips.append("model.remat=full")
    if tc.trainer == "ppo":
        tips.append(
            f"smaller minibatches (ppo.minibatches={2 * cfg.ppo.minibatches}) or train.batch_size={tc.batch_size // 2}"
        )
    elif tc.trainer == "grpo":  # one full-batch update: no micro-batches
        tips.append(
            f"fewer answers a step (train.batch_size={max(tc.batch_size // 2, 1)} or a smaller grpo.group_size)"
        )
    elif tc.batch_size // tc.grad_accum_steps > 1:
        tips.append(
            f"a smaller batch (train.grad_accum_steps={2 * tc.grad_accum_steps}"
            f" or train.batch_size={tc.batch_size // 2})"
        )
    if not cfg.model.lora_rank and rep.opt_state_gib > rep.temp_gib:
        tips.append("LoRA (model.lora_rank=16: no optimizer state for the base)")
    return tips


# ----------------------------------------------------------------------------- the run's report


@dataclass
class RunReport:
    name: str
    trainer: str
    target: str  # topology or "this process's devices"
    devices: int
    chip: Chip
    mesh: dict
    params: int
    reports: list[Report]
    notes: list[str]
    compile_s: float  # all compiles, calibration included

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = all(r.fits for r in self.reports)
        return out


def resolve_for_compile(cfg: Config) -> tuple[Config, list[str]]:
    """The config with a concrete vocabulary: from train.init_from's run when it exists, else
    model.vocab_size, else an assumed size (the tokenizer sets it at run time)."""
    notes = []
    mc = cfg.model
    source = cfg.train.init_from
    if source and os.path.isfile(os.path.join(source, "config.json")):
        mc = inherit_model(mc, read_run(source)[0].model, source)
        notes.append(f"model from {source}")
    if not mc.vocab_size:
        multiple = max(mc.vocab_multiple, 1)
        guess = cfg.data.spm_vocab_size if cfg.data.tokenizer == "sentencepiece" else 256
        vocab = -(-guess // multiple) * multiple
        notes.append(
            f"model.vocab_size=0 is set by the tokenizer at run time; {vocab} assumed here (--set model.vocab_size=N)"
        )
        mc = dataclasses.replace(mc, vocab_size=vocab)
    return dataclasses.replace(cfg, model=mc.resolved()), notes


def compile_run(
    cfg: Config,
    devices: Sequence[Any],
    target: str,
    only: Sequence[str] = (),
    calibrate: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> RunReport:
    """Compile every program of `cfg` for `devices`; raises DoesNotFit (after measuring all)."""
    cfg, notes = resolve_for_compile(cfg)
    mesh, rules = make_mesh(cfg.mesh, devices), logical_rules(cfg.mesh.rules)
    chip = chip_of(devices[0], cfg.model.dtype)
    start = time.perf_counter()
    with jax.set_mesh(mesh), _axis_rules(rules):
        progs = build_programs(cfg, mesh, rules)
        if only:
            unknown = sorted(set(only) - {p.name for p in progs})
            if unknown:
                raise UserError(f"--programs {','.join(unknown)}: this run has {', '.join(p.name for p in progs)}")
            progs = [p for p in progs if p.name in only]
        loops = cfg.model.scan_layers or cfg.train.grad_accum_steps > 1
        calibration = None
        if loops and calibrate:
            log("calibrating FLOPs: the programs unrolled at 1 and 2 layers")
            calibration = calibrated_costs(cfg, mesh, rules, {p.name for p in progs})
        elif loops:
            notes.append("FLOPs count each scanned loop body once (--no-calibrate)")
        reports = []
        for prog in progs:
            log(f"compiling {prog.name}")
            reports.append(measure(prog, chip, cfg.model.dtype, calibration))
        state = next((p.args[0] for p in progs if p.roles[0] == "state"), None)
        trained = None if state is None else state.params.get("policy", state.params)
        params = _n_params(trained if trained is not None else progs[0].args[0]) if progs else 0
    run = RunReport(
        cfg.name,
        cfg.train.trainer,
        target,
        len(devices),
        chip,
        dict(mesh.shape),
        params,
        reports,
        notes,
        time.perf_counter() - start,
    )
    misfits = [r for r in reports if not r.fits]
    if misfits:
        worst = max(misfits, key=lambda r: r.total_gib if math.isfinite(r.total_gib) else math.inf)
        raise DoesNotFit(
            _not_fit_line(worst.program, worst.total_gib, worst.capacity_gib, suggestions(cfg, worst, mesh)),
            run,
        )
    return run


def _axis_rules(rules: tuple):
    import flax.linen as nn

    return nn.logical_axis_rules(rules)


class DoesNotFit(UserError):
    """A program needs more memory per device than the device has; `.run` holds the measurements."""

    def __init__(self, message: str, run: RunReport | None = None):
        super().__init__(message)
        self.run = run


def format_report(run: RunReport) -> str:
    c = run.chip
    bw = f", {c.hbm_bandwidth / 1e9:,.0f} GB/s" if c.hbm_bandwidth else ""
    lines = [
        f"{run.name} ({run.trainer}): {run.params / 1e9:.3f}B parameters on {run.target}: {run.devices} x {c.kind} "
        f"({c.hbm_bytes / GiB:.1f} GiB, {c.peak_flops / 1e12:,.0f} TFLOP/s{bw}), mesh {run.mesh}",
        f"{'program':<20}{'params':>8}{'opt':>8}{'inputs':>8}{'temp':>8}{'total':>8}  {'of':>6}  "
        f"{'TFLOP':>9}{'bound ms':>10}{'MFU<=':>7}{'compile s':>11}{'(CPU s)':>9}",
    ]
    for r in run.reports:
        lines.append(
            f"{r.program:<20}{r.params_gib:8.3f}{r.opt_state_gib:8.3f}{r.inputs_gib:8.3f}{r.temp_gib:8.3f}"
            f"{r.total_gib:8.3f}  {r.capacity_gib:6.1f}  {r.flops / 1e12:9.3f}{r.bound_s * 1e3:10.2f}"
            f"{r.mfu_bound:7.1%}{r.compile_s:11.1f}{r.compile_cpu_s:9.1f}" + ("" if r.fits else "  DOES NOT FIT")
        )
    lines.append(
        "GiB and FLOPs per device per call; TFLOP: what the hardware runs (XLA's count, remat's recompute "
        "included); bound = max(TFLOP / peak, bytes accessed / bandwidth); MFU<= = model FLOPs (6N + attention "
        "per trained token, 4N + 2N_trained with LoRA; remat not credited) / (peak x bound); "
        f"{run.compile_s:.0f} s of compiling in all"
    )
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)


def compile_only(cfg: Config) -> dict:
    """`train.compile_only=true`: the report for this process's devices; exit 1 if it does not fit."""
    try:
        run = compile_run(cfg, jax.devices(), f"this process's {jax.default_backend()} devices")
    except DoesNotFit as e:
        if e.run is not None:
            print(format_report(e.run))
        print(str(e), file=sys.stderr)
        raise SystemExit(1) from None
    print(format_report(run))
    return run.to_json()


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.compile", description=__doc__)
    parser.add_argument("--experiment", "-e", required=True, help="experiment name or path (as flaxgpt.train)")
    parser.add_argument(
        "--topology", "-t", help="TPU topology, e.g. v5e:2x2, v5p:8x8x8 (default: this process's devices)"
    )
    parser.add_argument(
        "--slices", type=cli.ranged(int, ">= 0"), default=0, help="TPU slices (default: the product of mesh.dcn_*)"
    )
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--programs", help="comma-separated subset, e.g. train_step,decode_step")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the 1- and 2-layer FLOP calibration compiles")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from flaxgpt.train import load_experiment

    overrides = [kv for group in args.overrides for kv in group]
    log = (lambda line: None) if args.json else (lambda line: print(line, flush=True))  # stderr: errors only
    runs = []
    try:
        loaded = load_experiment(args.experiment, overrides)
        stages = [(s.name, s.init_from, s.config) for s in loaded] if isinstance(loaded, list) else [("", "", loaded)]
        models: dict[str, ModelConfig] = {}  # a pipeline's stages start from an earlier stage's model
        for stage, init_from, cfg in stages:
            if init_from in models:
                own = {k: getattr(cfg.model, k) for k in ("lora_rank", "lora_alpha", "lora_targets", "dropout")}
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(models[init_from], **own))
            models[stage] = resolve_for_compile(cfg)[0].model
            dcn = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp * cfg.mesh.dcn_tensor
            slices = args.slices or dcn
            if args.topology:
                devices = topology_devices(args.topology, slices)
                target = args.topology + (f" x {slices} slices" if slices > 1 else "")
            else:
                devices, target = jax.devices(), f"this process's {jax.default_backend()} devices"
            only = [p for p in (args.programs or "").split(",") if p]
            run = compile_run(cfg, devices, target, only, not args.no_calibrate, log)
            runs.append(run)
            if not args.json:
                print(("" if not stage else f"[{stage}] ") + format_report(run), flush=True)
    except DoesNotFit as e:
        if e.run is not None:
            runs.append(e.run)
            if not args.json:
                print(format_report(e.run), flush=True)
        if args.json:
            print(json.dumps([r.to_json() for r in runs], indent=1, default=str))
        print(str(e), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_json() for r in runs], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
