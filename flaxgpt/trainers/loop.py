"""The training loop every trainer shares (pretraining, SFT, the reward model).

A trainer builds its model, data and objective, then calls `fit`, which owns what they
have in common: restore-or-initialise the sharded state (or start from another run's
parameters), the jitted step with the state donated, host work only at log, eval and
checkpoint steps, the non-finite-step guard, and the final save. Batches are a pure
function of the step, so a killed run resumes exactly where its checkpoint left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from flaxgpt import fileio, hf, lora, perf
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, ConfigError, to_dict, to_json
from flaxgpt.data.prefetch import prefetch
from flaxgpt.data.text import build_tokenizer
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.inference import inherit_model, params_from_hf, params_from_run, read_run
from flaxgpt.logging import MetricsLogger
from flaxgpt.model import Transformer, count_params
from flaxgpt.optim import build_optimizer, learning_rate_schedule
from flaxgpt.sharding import batch_sharding, host_value, local_batch_rows, logical_rules, make_mesh, place_batch
from flaxgpt.state import TrainState, abstract_train_state, create_train_state
from flaxgpt.trainers.lm import LossSums, make_train_step

HostBatch = dict[str, np.ndarray]


class NonFiniteLoss(RuntimeError):
    """Too many steps had a non-finite loss or gradient; the last checkpoint is intact."""


@dataclass
class Runtime:
    """The mesh a run lives on, and how host batches get onto it."""

    workdir: str
    mesh: Mesh
    rules: tuple
    rows_sharding: NamedSharding  # batches: [batch, ...] split over the data-parallel axes

    @classmethod
    def create(cls, cfg: Config, workdir: str) -> Runtime:
        cfg.validate()
        fileio.makedirs(workdir)
        mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
        return cls(workdir, mesh, rules, batch_sharding(mesh, rules))

    def context(self) -> contextlib.ExitStack:
        """The mesh and axis rules under which jitted code and sharding constraints resolve."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def rows(self, batch_size: int) -> np.ndarray:
        """The rows of a global batch that this process loads."""
        return local_batch_rows(self.rows_sharding, batch_size, 1)

    def place(self, local: HostBatch, batch_size: int) -> dict[str, jax.Array]:
        return place_batch(local, self.rows(batch_size), self.rows_sharding, batch_size)

    def write_config(self, cfg: Config) -> None:
        if jax.process_index() == 0:
            with fileio.open_file(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(to_json(cfg))

    def validation(
        self,
        eval_step: Callable[[Any, dict], dict],
        params: Any,
        batches: Callable[[int, np.ndarray], HostBatch],
        iters: int,
        batch_size: int,
    ) -> dict[str, float]:
        """val_loss (and val_<ratio>) summed exactly over `iters` fixed batches of `eval_step`'s sums."""
        rows = self.rows(batch_size)
        total: dict[str, Any] = {}
        for i in range(iters):
            out = jax.tree.map(float, host_value(eval_step(params, self.place(batches(i, rows), batch_size))))
            total = out if not total else jax.tree.map(lambda a, b: a + b, total, out)
        figures = {"val_loss": total["loss_sum"] / max(total["weight_sum"], 1.0)}
        figures.update({f"val_{k}": num / max(den, 1.0) for k, (num, den) in total.get("ratios", {}).items()})
        return figures


@dataclass
class Objective:
    """What a trainer hands `fit`."""

    loss_sums: LossSums | None  # None: next-token cross-entropy
    train_batch: Callable[[int, np.ndarray], HostBatch]  # (step, this process's rows) -> rows
    evaluate: Callable[[Any], dict[str, float]]  # params -> validation figures (under the mesh)
    position: Callable[[int], dict] = lambda step: {"train_batches": step}  # recorded per checkpoint


def fit(
    cfg: Config,
    rt: Runtime,
    model: Transformer,
    objective: Objective,
    *,
    init_params: Callable[[Any], Any] | None = None,
    finalize: Callable[[TrainState], tuple[TrainState, dict]] | None = None,
    report: Callable[[TrainState, MetricsLogger], dict] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Train to `train.max_steps`, resuming from the workdir's latest checkpoint if any.

    init_params   parameter shardings -> starting parameters (fine-tuning from another run)
    finalize      runs once when the last step is done, before the final save: may change
                  the state (e.g. the reward model's offset) and add to the checkpoint record
    report        runs at the end of every call, even on a finished run: figures to return
    Returns the last logged row plus whatever `report` adds.
    """
    tc, model_cfg = cfg.train, model.cfg
    rt.write_config(cfg)
    schedule = learning_rate_schedule(cfg.optimizer, tc.max_steps)
    optimizer = build_optimizer(cfg.optimizer, tc.max_steps, lora.trainable_mask if model_cfg.lora_rank else None)
    example = jnp.zeros((1, model_cfg.block_size), jnp.int32)

    checkpointer = Checkpointer(rt.workdir, cfg.checkpoint)
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract, shardings = abstract_train_state(model, optimizer, example, rt.mesh, rt.rules)
        state, _ = checkpointer.restore(latest, abstract, model_cfg)
    else:
        state, shardings = create_train_state(model, optimizer, example, rt.mesh, rt.rules, tc.seed, init_params)
    start = int(host_value(state.step))

    logger = MetricsLogger(rt.workdir, cfg.logging, tc.max_steps, start, to_dict(cfg))
    origin = (
        f"resumed from step {start}"
        if latest is not None
        else (f"from {tc.init_from or tc.init_from_hf}" if init_params else "from scratch")
    )
    logger.message(
        f"flaxgpt {cfg.name} ({tc.trainer}): {lora.describe_size(state.params, model_cfg.lora_rank)}, "
        f"vocab {model_cfg.vocab_size}, mesh {dict(rt.mesh.shape)}, {origin}"
        + (f"; {description}" if description else "")
    )
    record = lambda step, extra={}: {
        "step": step,
        "data": objective.position(step),
        "model": to_dict(model_cfg),
        **extra,
    }

    # MFU of language-model steps (pretraining, SFT: every row is block_size tokens of compute)
    flops_token = perf.flops_per_token(model_cfg, count_params(state.params))
    mfu_denominator = (perf.peak_flops(model_cfg.dtype)[0] * jax.device_count()) if tc.trainer != "reward" else 0.0
    batch = tc.batch_size
    rows = rt.rows(batch)  # this process loads only these rows
    last_row: dict[str, Any] = {}
    with rt.context():
        train_step = jax.jit(
            make_train_step(model, optimizer, schedule, tc, objective.loss_sums),
            in_shardings=(shardings, rt.rows_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        skipped_seen = int(host_value(state.skipped))
        clock, items_since = time.time(), 0
        batches = prefetch(lambda step: objective.train_batch(step, rows), start, tc.max_steps, cfg.data.prefetch)
        for step, local in batches:
            placed = place_batch(local, rows, rt.rows_sharding, batch)
            if step == start and (advice := perf.host_allocator_advice(train_step, state, placed)):
                logger.message(advice)
            state, metrics = train_step(state, placed)
            done = step + 1
            items_since += batch
            eval_due = done % cfg.eval.interval == 0 or done == tc.max_steps
            if done % tc.log_interval == 0 or eval_due:
                m = host_value(metrics)
                now = time.time()
                row = {k: float(v) for k, v in m.items() if k not in ("tokens", "skipped", "z_loss")}
                if tc.z_loss:
                    row["z_loss"] = float(m["z_loss"])
                row["tokens_per_sec" if tc.trainer != "reward" else "examples_per_sec"] = (
                    items_since * (model_cfg.block_size if tc.trainer != "reward" else 1) / max(now - clock, 1e-9)
                )
                if mfu_denominator:
                    row["mfu"] = row["tokens_per_sec"] * flops_token / mfu_denominator
                skipped_seen = _check_skipped(int(m["skipped"]), skipped_seen, done, tc.max_skipped_steps, logger)
                if eval_due:
                    row.update(objective.evaluate(state.params))
                logger.log(done, row)
                last_row = row
                clock, items_since = time.time(), 0
            if done < tc.max_steps:
                checkpointer.save(done, state, record(done))

        extra: dict = {}
        if start < tc.max_steps:
            if finalize is not None:
                state, extra = finalize(state)
            checkpointer.save(tc.max_steps, state, record(tc.max_steps, extra), force=True)
        else:  # a finished run asked again: report its figures
            extra = {k: v for k, v in checkpointer.read_record(latest).items() if k not in record(0)}
            last_row = objective.evaluate(state.params)
        reported = report(state, logger) if report is not None else {}
    checkpointer.close()
    logger.close()
    return {"step": tc.max_steps, **last_row, **extra, **reported}


def _check_skipped(total: int, seen: int, step: int, limit: int, logger: MetricsLogger) -> int:
    if total > seen:
        logger.message(
            f"step {step}: {total - seen} update(s) skipped for a non-finite loss or "
            f"gradient ({total} in this run so far, limit {limit})"
        )
    if total > limit:
        raise NonFiniteLoss(
            f"{total} steps had a non-finite loss or gradient (train.max_skipped_steps="
            f"{limit}); stopping. The last checkpoint holds finite parameters."
        )
    return total


def starting_point(
    cfg: Config, rt: Runtime, tokenizer_text: Callable[[], str], output: str = "logits"
) -> tuple[Config, Tokenizer, Callable[[Any], Any] | None]:
    """(config with the model resolved, tokenizer, init_params for `fit`) of a run.

    With `train.init_from` the model's structure and the tokenizer are the source run's
    (the tokenizer is copied into this workdir) and the parameters start from its
    checkpoint; otherwise a tokenizer is built from `tokenizer_text()` and the model is
    initialised at random. `output` is the head this trainer needs.
    """
    tc = cfg.train
    if tc.init_from:
        source_cfg, tokenizer = read_run(tc.init_from)
        if jax.process_index() == 0:
            tokenizer.save(rt.workdir)
        own = dataclasses.replace(cfg.model, output=output)
        model_cfg = inherit_model(own, source_cfg.model, tc.init_from)
        init = params_from_run(tc.init_from, tc.init_step, model_cfg, rt.mesh, rt.rules, tc.seed)
        return dataclasses.replace(cfg, model=model_cfg), tokenizer, init
    if tc.init_from_hf:
        model_cfg, tokenizer, hf_vocab = hf.import_model(tc.init_from_hf, dataclasses.replace(cfg.model, output=output))
        if jax.process_index() == 0:
            tokenizer.save(rt.workdir)
        init = params_from_hf(tc.init_from_hf, model_cfg, hf_vocab, rt.mesh, rt.rules, tc.seed)
        return dataclasses.replace(cfg, model=model_cfg), tokenizer, init
    text = tokenizer_text()
    tokenizer = build_tokenizer(cfg, text, text, rt.workdir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, output=output))
    return resolve_vocab(cfg, tokenizer), tokenizer, None


def resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """The config with model.vocab_size filled from the tokenizer (rounded up to vocab_multiple)."""
    multiple = max(cfg.model.vocab_multiple, 1)
    vocab = cfg.model.vocab_size or -(-tokenizer.vocab_size // multiple) * multiple
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    valid = tokenizer.vocab_size if vocab > tokenizer.vocab_size else 0
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab, valid_vocab=valid).resolved()
    )
