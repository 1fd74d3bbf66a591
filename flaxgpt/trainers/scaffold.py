"""The run scaffold every trainer stands on (pretraining, SFT, the reward model, PPO).

A trainer describes its run as a `RunSpec` (how to build and restore its state, one step,
what a checkpoint records, how to evaluate, what to log) and calls `fit`, which owns what
runs have in common: restore-or-initialise (the newest checkpoint that restores), the
config written once the checkpoint agreed with it, the cadence of logging,
evaluation and saving (`Hook`s run every N steps and after the last), the final save, one
process-0 logging path, and preemption: SIGTERM or SIGINT saves a checkpoint at the
current step and stops (a second SIGINT stops at once). Whatever leaves the loop, pending
saves are finished or cleaned up. A LoRA run from a pinned base (`RunSpec.lora_base`) saves
adapter-only checkpoints and rebuilds the base on resume. `fit` names no trainer. (The
workdir lock is held around the whole run, tokenizer and data files included, by
`flaxgpt.train.run_trainer`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from flaxgpt import fileio, hf, lora, mfu
from flaxgpt.checkpoint import OPTIMIZER_STRUCTURE_KEYS, Checkpointer, CheckpointMismatch, StateMismatch
from flaxgpt.config import Config, ConfigError, to_dict, to_json
from flaxgpt.data.text import build_tokenizer
from flaxgpt.data.tokenizers import Tokenizer
from flaxgpt.errors import UserError
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.modeldir import HFFormatError, read_json
from flaxgpt.runs import BaseParams, inherit_model, params_from_hf, params_from_run, read_run, with_base
from flaxgpt.sharding import (
    batch_sharding,
    host_value,
    local_batch_rows,
    logical_rules,
    make_mesh,
    mesh_context,
    place_batch,
)

HostBatch = dict[str, np.ndarray]
# `fit`'s result key naming a stop signal that came during the last step or the final save: the
# run is complete, and a pipeline records it and starts no further stage
STOPPED = "stopped_by"
DATA_ORDER_KEYS = ("batch_size", "seed")  # train.*: with the step, they fix which rows a step reads


class NonFiniteLoss(UserError):
    """Too many steps had a non-finite loss or gradient (or a PPO step went non-finite)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after saving; `code` is the exit status to use."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def exit_code(signame: str) -> int:
    return 130 if signame == "SIGINT" else 143


@dataclass
class Runtime:
    """The mesh a run lives on, and how host batches get onto it."""

    workdir: str
    mesh: Mesh
    rules: tuple
    rows_sharding: NamedSharding  # batches: [batch, ...] split over the data-parallel axes
    # the tokenizer a fine-tuning run takes from its source: saved with the config, once the
    # checkpoint agreed (a refused resume keeps the workdir's own, which its checkpoints need)
    tokenizer: Tokenizer | None = None

    @classmethod
    def create(cls, cfg: Config, workdir: str) -> Runtime:
        cfg.validate()
        fileio.makedirs(workdir)
        mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
        return cls(workdir, mesh, rules, batch_sharding(mesh, rules))

    def context(self) -> contextlib.ExitStack:
        """The mesh and axis rules under which jitted code and sharding constraints resolve."""
        return mesh_context(self.mesh, self.rules)

    def rows(self, batch_size: int) -> np.ndarray:
        """The rows of a global batch that this process loads."""
        return local_batch_rows(self.rows_sharding, batch_size, 1)

    def place(self, local: HostBatch, batch_size: int) -> dict[str, jax.Array]:
        return place_batch(local, self.rows(batch_size), self.rows_sharding, batch_size)

    def write_config(self, cfg: Config) -> None:
        """config.json (and the source's tokenizer, if any): called once a resume is accepted."""
        if jax.process_index() == 0:
            if self.tokenizer is not None:
                self.tokenizer.save(self.workdir)
            fileio.write_atomic(os.path.join(self.workdir, "config.json"), to_json(cfg))

    def validation(
        self,
        eval_step: Callable[[Any, dict], dict],
        params: Any,
        batches: Callable[[int, np.ndarray], HostBatch],
        iters: int,
        batch_size: int,
    ) -> dict[str, float]:
        """val_loss (and val_<ratio>) summed exactly over `iters` fixed batches of `eval_step`'s
        sums; nothing when `iters` is 0."""
        rows = self.rows(batch_size)
        total: dict[str, Any] = {}
        for i in range(iters):
            out = jax.tree.map(float, host_value(eval_step(params, self.place(batches(i, rows), batch_size))))
            total = out if not total else jax.tree.map(lambda a, b: a + b, total, out)
        if not total:
            return {}
        figures = {"val_loss": total["loss_sum"] / max(total["weight_sum"], 1.0)}
        figures.update({f"val_{k}": num / max(den, 1.0) for k, (num, den) in total.get("ratios", {}).items()})
        return figures


@dataclass
class Hook:
    """`fn(state, step)` after every `every` steps and after the last; the figures it returns
    are logged with that step's row (None or {}: nothing to log)."""

    every: int
    fn: Callable[[Any, int], dict[str, float] | None]


@dataclass
class Throughput:
    """What a step processes, for the logged rate: `unit`s per second (`per_row` of them in a
    batch row), and MFU when `flops_per_item` is known."""

    unit: str  # "tokens" or "examples"
    per_row: int
    flops_per_item: float = 0.0
    dtype: str = "float32"  # the compute dtype whose peak MFU is relative to


StepFn = Callable[[Any, int], tuple[Any, dict]]  # (state, step index) -> (state, device metrics)


@dataclass
class RunSpec:
    """What a trainer hands `fit`."""

    describe: str  # the first log line, after "flaxgpt NAME (TRAINER): "
    model_cfg: Any  # recorded with each checkpoint; a restore must agree with it
    abstract_state: Callable[[], tuple[Any, Any]]  # () -> (ShapeDtypeStructs, shardings)
    init_state: Callable[[Any], Any]  # shardings -> a fresh state
    make_step: Callable[[Any, int, Callable[[str], None]], StepFn]  # (shardings, start, message) -> step
    row: Callable[[dict], dict[str, float]]  # a step's metrics -> its logged figures (host numbers)
    evaluate: Callable[[Any], dict[str, float]]  # state -> validation figures
    position: Callable[[int], dict] = lambda step: {"train_batches": step}  # recorded per checkpoint
    origin: str = "from scratch"  # how a fresh state starts
    throughput: Throughput | None = None
    hooks: list[Hook] = field(default_factory=list)
    begin: Callable[[Any, int, MetricsLogger], None] | None = None  # before the first step
    finalize: Callable[[Any], tuple[Any, dict]] | None = None  # after the last step, before its save
    report: Callable[[Any, MetricsLogger], dict] | None = None  # figures to return (also on a finished run)
    notes: list[str] = field(default_factory=list)  # what the trainer found while setting up, said first
    message: Callable[[str], None] = print  # the run's logger once `fit` has made it (process 0 only)
    figures: tuple[str, ...] = ("loss", "val_loss")  # the key figures: progress line and closing block
    next_commands: tuple[str, ...] = ("python -m flaxgpt.sample --workdir {workdir} --prompt 'Question:'",)
    # a LoRA run's pinned base (`BaseParams.source`): its checkpoints hold only the trained part of
    # the state's `params` (and the optimizer state), with this record and the base's fingerprint
    lora_base: dict | None = None


def fit(cfg: Config, rt: Runtime, spec: RunSpec) -> dict[str, Any]:
    """Train to `train.max_steps`, resuming from the workdir's newest checkpoint that restores.

    Returns the last logged row plus what `finalize` recorded and `report` adds (and `STOPPED`
    when a stop signal came too late to cut the run short).
    """
    with _StopSignals() as stop:
        checkpointer = Checkpointer(rt.workdir, cfg.checkpoint)
        logger = None
        try:
            notes: list[str] = []
            abstract, shardings = spec.abstract_state()
            restored = _restore(cfg, checkpointer, spec, rt, abstract, shardings, notes.append)
            state = restored[0] if restored else spec.init_state(shardings)
            spec.lora_base = _pinned_base(spec, state, restored)
            start = int(host_value(state.step))
            finished = bool(restored) and start >= cfg.train.max_steps
            if restored and not finished:
                _check_data_order(cfg, restored[1], f"{checkpointer.directory} step {start}")
            if not finished:  # only now: a refused resume, or a finished run asked again, keeps the run's config
                rt.write_config(cfg)
            logger = MetricsLogger(rt.workdir, cfg.logging, cfg.train.max_steps, start, to_dict(cfg))
            spec.message = stop.message = logger.message
            logger.shown = (*spec.figures, "lr", "tokens_per_sec")
            for note in spec.notes + notes:
                logger.message(note)
            origin = f"resumed from step {start}" if restored else spec.origin
            origin = f"finished earlier at step {start} (train.max_steps); its figures follow" if finished else origin
            logger.message(f"flaxgpt {cfg.name} ({cfg.train.trainer}): {spec.describe}, {origin}")
            with rt.context():
                saved = restored[1] if restored else {}
                result = _run(cfg, spec, state, start, shardings, checkpointer, logger, stop, saved)
            checkpointer.close()
            logger.end_progress()
            report = write_report(rt.workdir, logger.message) if cfg.logging.report and logger.enabled else ""
            for line in closing_block(rt.workdir, result, spec, finished, report):
                logger.message(line)
            if stop.agreed():  # during the last step or the final save: finished, but a pipeline stops
                result[STOPPED] = stop.signame
            return result
        except NonFiniteLoss as e:
            checkpointer.close()
            last = checkpointer.latest_step()
            kept = f"the last checkpoint is step {last}" if last is not None else "no checkpoint was saved"
            raise NonFiniteLoss(f"{e}; {kept}. Lower optimizer.lr (now {cfg.optimizer.lr:g})") from None
        finally:
            checkpointer.close()
            if logger is not None:
                logger.close()


def adapter_base(cfg: Config, init_params: Any) -> dict | None:
    """`RunSpec.lora_base` of a run: the pinned source of a LoRA run's base when it has one (a
    run or a Hugging Face model; a base drawn at random is saved whole) and
    checkpoint.adapters_only is on."""
    pinned = isinstance(init_params, BaseParams) and cfg.model.lora_rank and cfg.checkpoint.adapters_only
    return init_params.source if pinned else None


def _restore(cfg, checkpointer, spec, rt, abstract, shardings, log) -> tuple[Any, dict, int] | None:
    """`restore_latest`, with an adapter-only checkpoint's base rebuilt from its record."""
    held = lambda record: _adapters_only(abstract) if record.get(lora.BASE_RECORD) else abstract
    try:
        restored = checkpointer.restore_latest(held, spec.model_cfg, log)
    except StateMismatch as e:
        raise StateMismatch(f"{e}{_changed_since(rt.workdir, cfg, OPTIMIZER_STRUCTURE_KEYS)}") from None
    if not restored or not restored[1].get(lora.BASE_RECORD):
        return restored
    state, record, step = restored
    where = f"{checkpointer.directory} step {step}"
    params = with_base(
        state.params, record[lora.BASE_RECORD], spec.model_cfg, shardings.params, rt.mesh, rt.rules, where
    )
    return state.replace(params=params), record, step


def _check_data_order(cfg: Config, record: dict, where: str) -> None:
    """Refuse to continue with another batch size or seed than the checkpoint's: the data a step
    reads follows from (step, train.batch_size, train.seed), so a change would skip or replay it."""
    saved = record.get("train", {})  # absent in checkpoints written before it was recorded
    diffs = [
        f"train.{k}={saved[k]!r} there, {getattr(cfg.train, k)!r} here"
        for k in DATA_ORDER_KEYS
        if k in saved and saved[k] != getattr(cfg.train, k)
    ]
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {where} was trained with other data order settings ({'; '.join(diffs)}): resuming "
            "would skip or replay data. Set them as the checkpoint has them, or choose another --workdir"
        )


def _changed_since(workdir: str, cfg: Config, keys: tuple[str, ...]) -> str:
    """' (optimizer.grad_clip=1.0 in config.json, 0.0 here)' for those of `keys` that differ
    from the run's config.json (nothing when it cannot tell)."""
    path = os.path.join(workdir, "config.json")
    try:
        recorded = read_json(path) if fileio.exists(path) else {}
    except HFFormatError:
        return ""
    now, diffs = to_dict(cfg), []
    for key in keys:
        section, name = key.split(".")
        before, after = (recorded.get(section) or {}), now[section][name]
        before = before.get(name) if isinstance(before, dict) else None
        if before is not None and json.loads(json.dumps(after)) != before:
            diffs.append(f"{key}={before!r} in config.json, {after!r} here")
    return f" ({'; '.join(diffs)})" if diffs else ""


def _adapters_only(state: Any) -> Any:
    """What an adapter-only checkpoint holds of a state: all but the frozen base parameters."""
    return state.replace(params=lora.trained_part(state.params))


def _pinned_base(spec: RunSpec, state: Any, restored: tuple | None) -> dict | None:
    """The base record new checkpoints carry: the one the resumed checkpoint had, or the spec's
    source with the fingerprint of the base now in `state`; None for whole checkpoints."""
    if not spec.lora_base:
        return None
    if restored and restored[1].get(lora.BASE_RECORD):
        return restored[1][lora.BASE_RECORD]
    return {**spec.lora_base, "fingerprint": lora.base_fingerprint(state.params)}


def write_report(workdir: str, message: Callable[[str], None]) -> str:
    """WORKDIR/report (plots and report.html); its page, or "" after one line saying why not."""
    from flaxgpt import report

    try:
        return report.write(workdir).page
    except report.ReportError as e:  # nothing to plot is no reason to fail a run that trained
        message(f"no report: {e}")
        return ""


def closing_block(workdir: str, result: dict, spec: RunSpec, finished: bool, report: str) -> list[str]:
    """What a run ends with: its key figures, where it is, and what to run next."""
    shown = [f"{k} {v:.4g}" for k in spec.figures if isinstance(v := result.get(k), (int, float))]
    head = "finished earlier" if finished else "done"
    lines = [f"{head}: step {result['step']}" + "".join(f" | {f}" for f in shown)]
    consumed = [f"{k[len('tokens/') :]} {v:,}" for k, v in result.items() if k.startswith("tokens/")]
    if consumed:
        lines.append("  tokens:  " + " | ".join(consumed))
    lines.append(f"  workdir: {workdir} (metrics.jsonl, config.json, checkpoints)")
    if report:
        lines.append(f"  report:  {report}")
    lines += ["  next:"] + [f"    {c.replace('{workdir}', workdir)}" for c in spec.next_commands]
    return lines


def _run(cfg, spec, state, start, shardings, checkpointer, logger, stop, saved: dict) -> dict[str, Any]:
    tc = cfg.train
    base = {lora.BASE_RECORD: spec.lora_base} if spec.lora_base else {}
    record = lambda step, extra={}: {
        "step": step,
        "data": spec.position(step),
        "train": {k: getattr(tc, k) for k in DATA_ORDER_KEYS},
        "model": to_dict(spec.model_cfg),
        **base,
        **extra,
    }
    held = _adapters_only if spec.lora_base else lambda state: state
    save = lambda step, state, extra={}, force=False: checkpointer.save(step, held(state), record(step, extra), force)
    if spec.begin is not None:
        spec.begin(state, start, logger)
    if start >= tc.max_steps:  # a finished run asked again: report its figures (its last logged row's too)
        extra = {k: v for k, v in saved.items() if k not in record(0)}
        logged = [r for r in read_metrics(os.path.dirname(checkpointer.directory)) if r["step"] <= start]
        last_row = {**(logged[-1] if logged else {}), **spec.evaluate(state)}
        last_row.pop("step", None)
    else:
        state, last_row = _loop(cfg, spec, state, start, shardings, checkpointer, logger, stop, save)
        extra = {}
        if spec.finalize is not None:
            state, extra = spec.finalize(state)
        save(tc.max_steps, state, extra, force=True)
    reported = spec.report(state, logger) if spec.report is not None else {}
    return {"step": max(start, tc.max_steps), **last_row, **extra, **reported}


def _loop(cfg, spec, state, start, shardings, checkpointer, logger, stop, save) -> tuple[Any, dict]:
    """Steps start..max_steps: hooks and logging on their cadence, a save whenever one is due,
    and a save-and-stop when a stop signal arrived."""
    tc = cfg.train
    hooks = [Hook(cfg.eval.interval, lambda state, step: spec.evaluate(state)), *spec.hooks]
    meter = _Meter(spec.throughput, tc.batch_size)
    step_fn = spec.make_step(shardings, start, logger.message)
    last_row: dict[str, Any] = {}
    for step in range(start, tc.max_steps):
        state, metrics = step_fn(state, step)
        done = step + 1
        meter.count()
        due = [h for h in hooks if done % h.every == 0 or done == tc.max_steps]
        figures = [f for h in due if (f := h.fn(state, done))]
        if done % tc.log_interval == 0 or figures:
            row = {**spec.row(metrics), **meter.figures(), **source_tokens(spec.position(done))}
            for f in figures:
                row.update(f)
            logger.log(done, row)
            last_row = row
            meter.reset()
        if done < tc.max_steps:  # the last step is saved after `finalize`, signal or not
            save(done, state)
            if stop.agreed():
                raise _interrupted(stop.signame, done, checkpointer, state, save)
    return state, last_row


def source_tokens(position: dict) -> dict[str, int]:
    """tokens/LABEL: the tokens each mixture source has given so far (cumulative, from the data's
    position at that step, so a resumed run continues the count)."""
    return {f"tokens/{label}": int(s["tokens"]) for label, s in position.get("sources", {}).items()}


def _interrupted(signame, done, checkpointer, state, save) -> Interrupted:
    """Save at `done` (unless already saved), wait for the write, say so."""
    save(done, state, force=True)
    checkpointer.close()
    saved = checkpointer.latest_step()
    where = (
        f"checkpoint saved at step {done}; run the same command to resume"
        if saved == done
        else "checkpointing is off: nothing saved"
    )
    return Interrupted(f"{signame} at step {done}: {where}", exit_code(signame))


class _Meter:
    def __init__(self, throughput: Throughput | None, batch_size: int):
        self.throughput, self.batch_size = throughput, batch_size
        self.peak = 0.0
        if throughput is not None and throughput.flops_per_item:
            self.peak = mfu.peak_flops(throughput.dtype)[0] * jax.device_count()
        self.reset()

    def reset(self) -> None:
        self.clock, self.items = time.time(), 0

    def count(self) -> None:
        self.items += self.batch_size

    def figures(self) -> dict[str, float]:
        t = self.throughput
        if t is None:
            return {}
        rate = self.items * t.per_row / max(time.time() - self.clock, 1e-9)
        out = {f"{t.unit}_per_sec": rate}
        if self.peak:
            out["mfu"] = rate * t.flops_per_item / self.peak
        return out


class _StopSignals:
    """SIGTERM / SIGINT set a flag the loop checks after each step; a second SIGINT exits at
    once. All processes of a multi-process run stop at the same step."""

    def __init__(self):
        self.signame: str | None = None
        self.message: Callable[[str], None] = print  # the run's logger, once there is one
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signame == "SIGINT" and name == "SIGINT":
            self.message("second interrupt: stopping now, without saving")
            os._exit(130)
        self.signame = self.signame or name
        self.message(f"{name}: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now)")

    def agreed(self) -> bool:
        local = self.signame is not None
        if jax.process_count() == 1:
            return local
        agreed = bool(np.max(multihost_utils.process_allgather(np.int32(local))))
        self.signame = self.signame or ("SIGTERM" if agreed else None)
        return agreed


def starting_point(
    cfg: Config, rt: Runtime, tokenizer_text: Callable[[], str], output: str = "logits"
) -> tuple[Config, Tokenizer, Callable[[Any], Any] | None]:
    """(config with the model resolved, tokenizer, init_params) of a run.

    With `train.init_from` the model's structure and the tokenizer are the source run's
    (the tokenizer is copied into this workdir by `Runtime.write_config`) and the parameters start from its
    checkpoint; otherwise a tokenizer is built from `tokenizer_text()` and the model is
    initialised at random. `output` is the head this trainer needs.
    """
    tc = cfg.train
    if tc.init_from:
        source_cfg, tokenizer = read_run(tc.init_from)
        rt.tokenizer = tokenizer
        own = dataclasses.replace(cfg.model, output=output)
        model_cfg = inherit_model(own, source_cfg.model, tc.init_from)
        init = params_from_run(tc.init_from, tc.init_step, model_cfg, rt.mesh, rt.rules, tc.seed)
        return dataclasses.replace(cfg, model=model_cfg), tokenizer, init
    if tc.init_from_hf:
        model_cfg, tokenizer, hf_vocab = hf.import_model(tc.init_from_hf, dataclasses.replace(cfg.model, output=output))
        rt.tokenizer = tokenizer
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
