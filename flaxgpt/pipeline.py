"""Pipelines: several runs in order, each starting from an earlier one (pretrain -> SFT -> RM ...).

An experiment file defines `stages() -> list[Stage]` instead of `config()`. Each stage is an
ordinary run with its own workdir (WORKDIR/<stage name>), so it can be inspected, sampled
from, or rerun alone. A finished stage leaves WORKDIR/<stage>/result.json (its figures, its
config and the final steps of the stages it started from) and is skipped when the pipeline is
started again with the same config; an interrupted one resumes from its checkpoint. A finished
stage whose config changed since (`--set sft.train.max_steps=100`; logging settings aside) runs
again as a single run would: it trains on to a larger train.max_steps, or reports its figures
again. A stage whose sources have trained further since (in this call or an interrupted earlier
one) is run afresh, its earlier workdir moved aside to WORKDIR/<stage>.old-N
(nothing is deleted). A stop signal during a stage's last step or final save lets the stage
finish and write its result, then stops the pipeline (exit 143 or 130) before the next stage.
WORKDIR/summary.json collects each stage's key figures as it finishes, with its wall time and
the CPU seconds its process spent (user + system, all threads: a figure that other work on a
shared machine inflates far less than the wall time), summed over the attempts that ended by
returning or raising (a SIGKILLed attempt's time is lost). A figure a stage's summary names but
its run did not report is left out of summary.json, with a note.

Overrides name a stage first (`--set sft.train.max_steps=100`) or apply to every stage
(`--set train.seed=1`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
from jax.experimental import multihost_utils

from flaxgpt import fileio
from flaxgpt.config import Config, ConfigError, apply_overrides, to_dict
from flaxgpt.errors import UserError
from flaxgpt.modeldir import HFFormatError, read_json
from flaxgpt.trainers.scaffold import STOPPED, exit_code

RESULT_FILE, SUMMARY_FILE = "result.json", "summary.json"
TIME_FILE = "time.json"  # WORKDIR/<stage>/: the wall and CPU seconds of the stage's attempts so far
UNRECORDED = ("logging",)  # config sections that do not change what a stage produces


class StageResultError(UserError):
    """A finished stage's result.json cannot be read."""


@dataclass
class Stage:
    name: str
    config: Config
    init_from: str = ""  # an earlier stage whose final checkpoint this one starts from
    reward_from: str = ""  # PPO: an earlier stage that trained the reward model
    # summary.json key -> key of the stage's result (default: every figure the run returns)
    summary: dict[str, str] = field(default_factory=dict)
    # config keys ("train.init_from_hf") the user must set: the stage has no sensible default
    requires: tuple[str, ...] = ()


def apply_stage_overrides(stages: Sequence[Stage], assignments: Sequence[str]) -> None:
    """`stage.section.key=value` sets one stage; `section.key=value` sets every stage."""
    names = [s.name for s in stages]
    sections = [f.name for f in dataclasses.fields(Config)]
    for assignment in assignments:
        head, _, rest = assignment.partition(".")
        if head in names:
            try:
                apply_overrides(next(s for s in stages if s.name == head).config, [rest])
            except ConfigError as e:  # name the key as the user wrote it, stage first
                key = rest.split("=")[0]
                message = str(e)
                message = f"{head}.{message}" if message.startswith(key) else message.replace(key, f"{head}.{key}", 1)
                raise ConfigError(message) from None
        elif head.split("=")[0] in sections:
            for stage in stages:
                apply_overrides(stage.config, [assignment])
        else:
            close = difflib.get_close_matches(head, names + sections, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{assignment.split('=')[0]}' in a pipeline: start it with a "
                f"stage ({', '.join(names)}) or a section ({', '.join(sections)}){hint}"
            )


def validate(stages: Sequence[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"two pipeline stages are named '{stage.name}'")
        for ref in (stage.init_from, stage.reward_from):
            if ref and ref not in seen:
                raise ConfigError(f"stage '{stage.name}' uses '{ref}', which is not an earlier stage")
        seen.add(stage.name)
        for key in stage.requires:
            section, _, name = key.partition(".")
            if not getattr(getattr(stage.config, section), name):
                raise ConfigError(f"stage '{stage.name}' needs --set {stage.name}.{key}=...")
        try:
            stage_config(stage, "WORKDIR").validate()
        except ConfigError as e:
            raise ConfigError(f"stage '{stage.name}': {e}") from None
        _check_summary(stage)


def _check_summary(stage: Stage) -> None:
    """Refuse a summary naming held-out RL figures that ppo.eval_prompts=0 turns off."""
    cfg = stage.config
    if cfg.train.trainer not in ("ppo", "grpo") or cfg.ppo.eval_prompts:
        return
    held = [v for v in stage.summary.values() if v.startswith(("start_", "val_"))]
    if held:
        raise ConfigError(
            f"stage '{stage.name}': ppo.eval_prompts=0 evaluates no held-out prompts, but its summary needs "
            f"{', '.join(held)}; set {stage.name}.ppo.eval_prompts to at least 1"
        )


def stage_config(stage: Stage, workdir: str) -> Config:
    """The stage's config with the earlier stages it starts from filled in."""
    cfg = stage.config
    if stage.init_from:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, init_from=os.path.join(workdir, stage.init_from))
        )
    if stage.reward_from:
        cfg = dataclasses.replace(
            cfg, ppo=dataclasses.replace(cfg.ppo, reward_from=os.path.join(workdir, stage.reward_from))
        )
    return cfg


def run_pipeline(
    stages: Sequence[Stage], workdir: str, run_stage: Callable[[Config, str], dict[str, Any]]
) -> dict[str, Any]:
    """Run (or skip, if finished with the same config) each stage in order; returns the summary
    written to WORKDIR/summary.json."""
    validate(stages)
    fileio.makedirs(workdir)
    summary: dict[str, Any] = {}
    steps: dict[str, Any] = {}  # each stage's final step, as this call found or made it
    for stage in stages:
        stage_dir = os.path.join(workdir, stage.name)
        sources = {name: steps[name] for name in (stage.init_from, stage.reward_from) if name}
        result = _finished(stage, stage_dir, sources)
        if result is None:
            result = _run_stage(stage, stage_config(stage, workdir), stage_dir, run_stage, sources)
        steps[stage.name] = result.get("step")
        summary[stage.name] = _summary_row(stage, result)
        _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
        if result.get(STOPPED):
            if jax.process_index() == 0:  # as a stopped single run says it (flaxgpt.train)
                print(
                    f"stopped: {result[STOPPED]} in stage {stage.name}, which finished; run the same command to go on",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(exit_code(result[STOPPED]))
    _log(f"=== summary ({os.path.join(workdir, SUMMARY_FILE)})\n{json.dumps(summary, indent=2)}")
    _close(stages, workdir)
    return summary


def _finished(stage: Stage, stage_dir: str, sources: dict[str, Any]) -> dict | None:
    """The stage's recorded result when it finished with the config it has now, from the steps of
    the stages it starts from that they have now (`sources`), else None. A stage whose sources
    trained further since is moved aside, to start afresh."""
    result_file = os.path.join(stage_dir, RESULT_FILE)
    if not fileio.exists(result_file):
        return None
    result = _read_json(result_file)
    if result.get("sources", sources) != sources:  # results written before sources were recorded: as now
        _set_aside(stage, stage_dir)
        return None
    changed = _changes(result.get("config", _recorded(stage)), _recorded(stage))
    if changed:
        _log(f"=== stage {stage.name}: its config changed since it finished ({changed}); running it again")
        return None
    _log(f"=== stage {stage.name}: finished earlier ({result_file})")
    return result


def _run_stage(stage: Stage, cfg: Config, stage_dir: str, run_stage: Callable, sources: dict[str, Any]) -> dict:
    """The stage's result, written to its result.json with its config and its sources' steps."""
    result_file = os.path.join(stage_dir, RESULT_FILE)
    _log(f"=== stage {stage.name} ({cfg.train.trainer}) -> {stage_dir}")
    started, cpu = time.time(), cpu_seconds()
    try:
        result = {k: v for k, v in run_stage(cfg, stage_dir).items() if _jsonable(v)}
    finally:
        spent = _add_time(stage_dir, time.time() - started, cpu_seconds() - cpu)
    result.update(spent, config=_recorded(stage), sources=sources)
    _write_json(result_file, {k: v for k, v in result.items() if k != STOPPED})
    return result


def _add_time(stage_dir: str, wall: float, cpu: float) -> dict[str, float]:
    """The stage's wall and CPU seconds over its attempts, this one added (kept in TIME_FILE)."""
    path = os.path.join(stage_dir, TIME_FILE)
    try:
        earlier = _read_json(path) if fileio.exists(path) else {}
    except StageResultError:  # a damaged tally: count from this attempt
        earlier = {}
    spent = {
        "wall_seconds": round(earlier.get("wall_seconds", 0.0) + wall, 1),
        "cpu_seconds": round(earlier.get("cpu_seconds", 0.0) + cpu, 1),
    }
    if fileio.exists(stage_dir):
        _write_json(path, spent)
    return spent


def _set_aside(stage: Stage, stage_dir: str) -> None:
    """Move a stage's earlier workdir out of the way: what it started from has trained further."""
    if not fileio.exists(stage_dir):
        return
    n = 1
    while fileio.exists(f"{stage_dir}.old-{n}"):
        n += 1
    if jax.process_index() == 0:
        fileio.rename(stage_dir, f"{stage_dir}.old-{n}")
    if jax.process_count() > 1:  # every process then finds the stage unfinished
        multihost_utils.sync_global_devices(f"flaxgpt pipeline: {stage.name} set aside")
    _log(f"=== stage {stage.name}: what it starts from trained further; its earlier run moved to {stage_dir}.old-{n}")


def _recorded(stage: Stage) -> dict:
    """The part of a stage's config its result depends on, as JSON reads it back."""
    return json.loads(json.dumps({k: v for k, v in to_dict(stage.config).items() if k not in UNRECORDED}))


def _changes(before: dict, now: dict) -> str:
    """'train.max_steps 3 -> 100' for each key that differs (the first three named)."""
    old, new = _flat(before), _flat(now)
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _summary_row(stage: Stage, result: dict) -> dict:
    """The stage's summary.json entry: its summary's figures (one it did not report is left out,
    with a note), its wall and CPU seconds."""
    missing = [v for v in stage.summary.values() if v not in result]
    if missing:
        _log(f"note: stage '{stage.name}' reported no {', '.join(missing)}; left out of {SUMMARY_FILE}")
    figures = {k: v for k, v in result.items() if k not in ("config", "sources", STOPPED)}
    row = {k: result[v] for k, v in stage.summary.items() if v in result} if stage.summary else figures
    return {**row, "wall_seconds": result.get("wall_seconds"), "cpu_seconds": result.get("cpu_seconds")}


def cpu_seconds() -> float:
    """CPU time this process has used so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _close(stages: Sequence[Stage], workdir: str) -> None:
    """One report across the stages (when the last stage asks for reports), and where to go next."""
    from flaxgpt.trainers.scaffold import write_report

    if jax.process_index() != 0:
        return
    last = os.path.join(workdir, stages[-1].name)
    report = write_report(workdir, _log) if stages[-1].config.logging.report else ""
    _log(f"pipeline done: {workdir}" + (f"\n  report:  {report}" if report else ""))
    _log(f"  next:\n    python -m flaxgpt.chat --workdir {last}\n    python -m flaxgpt.serve --workdir {last}")


def describe(stages: Sequence[Stage]) -> str:
    """JSON of every stage's config, for --print-config."""
    return json.dumps(
        {s.name: {"init_from": s.init_from, "reward_from": s.reward_from, **to_dict(s.config)} for s in stages},
        indent=2,
    )


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _read_json(path: str) -> dict:
    try:
        return read_json(path)
    except HFFormatError as e:
        raise StageResultError(f"{e}; remove it to run that stage again") from None


def _write_json(path: str, value: Any) -> None:
    if jax.process_index() == 0:
        fileio.write_atomic(path, json.dumps(value, indent=2))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
