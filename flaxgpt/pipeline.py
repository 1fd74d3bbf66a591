"""Pipelines: several runs in order, each starting from an earlier one (pretrain -> SFT -> RM ...).

An experiment file defines `stages() -> list[Stage]` instead of `config()`. Each stage is an
ordinary run with its own workdir (WORKDIR/<stage name>), so it can be inspected, sampled
from, or rerun alone. A finished stage leaves WORKDIR/<stage>/result.json and is skipped
when the pipeline is started again; an interrupted one resumes from its checkpoint.
WORKDIR/summary.json collects each stage's key figures as it finishes, with its wall time and
the CPU seconds its process spent (user + system, all threads: a figure that other work on a
shared machine inflates far less than the wall time).

Overrides name a stage first (`--set sft.train.max_steps=100`) or apply to every stage
(`--set train.seed=1`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax

from flaxgpt import fileio
from flaxgpt.config import Config, ConfigError, apply_overrides, to_dict

RESULT_FILE, SUMMARY_FILE = "result.json", "summary.json"


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
            apply_overrides(next(s for s in stages if s.name == head).config, [rest])
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
        stage_config(stage, "WORKDIR").validate()


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
    """Run (or skip, if finished) each stage in order; returns the summary written to WORKDIR/summary.json."""
    validate(stages)
    fileio.makedirs(workdir)
    summary: dict[str, Any] = {}
    for stage in stages:
        stage_dir = os.path.join(workdir, stage.name)
        cfg = stage_config(stage, workdir)
        result_file = os.path.join(stage_dir, RESULT_FILE)
        if fileio.exists(result_file):
            with fileio.open_file(result_file) as f:
                result = json.load(f)
            _log(f"=== stage {stage.name}: finished earlier ({result_file})")
        else:
            _log(f"=== stage {stage.name} ({cfg.train.trainer}) -> {stage_dir}")
            started, cpu = time.time(), cpu_seconds()
            result = {k: v for k, v in run_stage(cfg, stage_dir).items() if _jsonable(v)}
            result["wall_seconds"] = round(time.time() - started, 1)
            result["cpu_seconds"] = round(cpu_seconds() - cpu, 1)
            _write_json(result_file, result)
        missing = [k for k in stage.summary.values() if k not in result]
        if missing:
            raise KeyError(f"stage '{stage.name}' reported no {missing}; it reported {sorted(result)}")
        summary[stage.name] = {k: result[v] for k, v in stage.summary.items()} if stage.summary else result
        for key in ("wall_seconds", "cpu_seconds"):
            summary[stage.name][key] = result.get(key)
        _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    _log(f"=== summary ({os.path.join(workdir, SUMMARY_FILE)})\n{json.dumps(summary, indent=2)}")
    _close(stages, workdir)
    return summary


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


def _write_json(path: str, value: Any) -> None:
    if jax.process_index() == 0:
        fileio.write_atomic(path, json.dumps(value, indent=2))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
