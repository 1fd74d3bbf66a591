"""`python -m flaxgpt.train --experiment NAME [--workdir DIR] [--set key=value ...]`

NAME is a file in experiments/ (without .py) or a path to a Python file that
defines `config() -> flaxgpt.config.Config` (one run), or `stages()` returning a list of
`flaxgpt.pipeline.Stage` (a pipeline such as chat_demo: each stage a run in WORKDIR/<stage>,
overridden with --set STAGE.section.key=value, or section.key=value for all stages).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from flaxgpt import cli
from flaxgpt.config import Config, ConfigError, ModelConfig, apply_overrides, describe_keys, to_json

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_dirs() -> list[str]:
    """Where experiments are looked up: ./experiments, then the checkout's experiments/."""
    dirs = [os.path.join(os.getcwd(), "experiments"), os.path.join(_PACKAGE_ROOT, "experiments")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def list_experiments() -> list[str]:
    names = set()
    for d in experiment_dirs():
        names.update(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))
    return sorted(names)


def find_experiment(name: str) -> str:
    if name.endswith(".py") or os.sep in name:
        if os.path.isfile(name):
            return os.path.abspath(name)
        raise ConfigError(f"experiment file not found: {name}")
    for d in experiment_dirs():
        path = os.path.join(d, name + ".py")
        if os.path.isfile(path):
            return path
    close = difflib.get_close_matches(name, list_experiments(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(list_experiments())}"
    raise ConfigError(f"unknown experiment '{name}'{hint}")


def load_experiment(name: str, overrides: Sequence[str] = ()) -> Config | list:
    """The experiment's config with `overrides` applied and validated, or, for a pipeline
    (a file defining `stages()`), its list of `flaxgpt.pipeline.Stage`."""
    path = find_experiment(name)
    stem = os.path.splitext(os.path.basename(path))[0]
    # a source loader of its own: a path named without .py is Python source too
    loader = importlib.machinery.SourceFileLoader(f"flaxgpt_experiment_{stem}", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except SyntaxError as e:  # the user's file; other exceptions keep their traceback to debug it
        raise ConfigError(f"{e.filename}:{e.lineno}: {e.msg}") from e
    if hasattr(module, "stages"):
        return _pipeline_stages(module.stages(), path, stem, overrides)
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {path} defines neither config() nor stages()")
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"experiment {path}: config() returned {type(cfg).__name__}, not flaxgpt.config.Config")
    if cfg.name == "unnamed":
        cfg.name = stem
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


def _pipeline_stages(stages: Any, path: str, stem: str, overrides: Sequence[str]) -> list:
    """A pipeline's stages with `overrides` applied and validated; a config error names the stage."""
    from flaxgpt import pipeline

    if not isinstance(stages, list) or not all(isinstance(s, pipeline.Stage) for s in stages):
        got = type(stages).__name__ if not isinstance(stages, list) else "a list holding other things"
        raise ConfigError(f"experiment {path}: stages() returned {got}, expected a list of flaxgpt.pipeline.Stage")
    for stage in stages:
        if stage.config.name == "unnamed":
            stage.config.name = f"{stem}.{stage.name}"
    pipeline.apply_stage_overrides(stages, list(overrides))
    pipeline.validate(stages)
    return stages


def run_trainer(cfg: Config, workdir: str) -> dict:
    """Run `cfg` with the trainer it names, holding the workdir's lock; returns the run's final
    figures. A run stopped by SIGTERM or SIGINT (after saving) says so in one line and exits
    143 or 130."""
    import importlib

    if cfg.train.compile_only:  # the ahead-of-time compile report for this process's devices, no training
        return importlib.import_module("flaxgpt.compile").compile_only(cfg)
    from flaxgpt.trainers.scaffold import Interrupted
    from flaxgpt.workdir import WorkdirLock

    try:
        with WorkdirLock(workdir):  # one run per workdir, for the whole run
            return importlib.import_module(f"flaxgpt.trainers.{cfg.train.trainer}").run(cfg, workdir)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.code) from None


def resolved(cfg: Config, source: ModelConfig | None = None) -> Config:
    """`cfg` with its model as the run writes it to config.json: recipe-derived fields (position,
    norm, mlp, d_ff, head_dim, tie_embeddings...) filled in, the reward model's scalar head, and
    the structure of `source`, the model a fine-tuning run starts from, where given."""
    own = dataclasses.replace(cfg.model, output="scalar" if cfg.train.trainer == "reward" else cfg.model.output)
    if source is None:
        return dataclasses.replace(cfg, model=own.resolved())
    from flaxgpt.runs import inherit_model

    return dataclasses.replace(cfg, model=inherit_model(own, source, cfg.train.init_from or "the earlier stage"))


def _source_model(cfg: Config) -> ModelConfig | None:
    """The model of the run or Hugging Face directory `cfg` starts from, where it exists already;
    otherwise a note on stderr says the printed structure is the experiment's own."""
    tc = cfg.train
    start = tc.init_from or tc.init_from_hf
    if not start:
        return None
    if tc.init_from and os.path.isfile(os.path.join(tc.init_from, "config.json")):
        from flaxgpt.runs import read_run

        return read_run(tc.init_from)[0].model
    if tc.init_from_hf and os.path.isdir(tc.init_from_hf):
        from flaxgpt.hf import import_model

        return import_model(tc.init_from_hf, cfg.model)[0]
    print(f"note: {start} is not there yet: the model printed is the experiment's own", file=sys.stderr)
    return None


def print_config(cfg: Config | list) -> None:
    """The config as the run will write it (model fields resolved; a pipeline's stages each from
    the stage they start from); model.vocab_size stays 0 where the tokenizer sets it."""
    if isinstance(cfg, Config):
        print(to_json(resolved(cfg, _source_model(cfg))))
        return
    from flaxgpt.pipeline import describe

    models: dict[str, ModelConfig] = {}
    stages = []
    for stage in cfg:
        source = models[stage.init_from] if stage.init_from else _source_model(stage.config)
        stages.append(dataclasses.replace(stage, config=resolved(stage.config, source)))
        models[stage.name] = stages[-1].config.model
    print(describe(stages))


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.train", description=__doc__)
    parser.add_argument("--experiment", "-e", help="experiment name (see --list) or path to a .py file")
    parser.add_argument("--workdir", "-w", help="where checkpoints and logs go (default: runs/NAME)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set optimizer.lr=3e-4 (keys and valid ranges: --list-keys)",
    )
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as the run writes it to config.json (recipe-derived model fields filled in) and exit",
    )
    parser.add_argument(
        "--list-keys",
        action="store_true",
        help="list every config key (of --experiment, else the defaults) with its value and valid range, and exit",
    )
    dist = parser.add_argument_group("multi-process runs (automatic on multi-host Cloud TPU VMs)")
    dist.add_argument("--coordinator-address", help="HOST:PORT of process 0 (or FLAXGPT_COORDINATOR_ADDRESS)")
    dist.add_argument(
        "--num-processes", type=cli.ranged(int, ">= 1"), help="processes in the run (or FLAXGPT_NUM_PROCESSES)"
    )
    dist.add_argument("--process-id", type=cli.ranged(int, ">= 0"), help="this process's index (or FLAXGPT_PROCESS_ID)")
    args = parser.parse_args(argv)

    if args.list:
        for name in list_experiments():
            print(name)
        return 0
    if args.list_keys and not args.experiment:
        print("\n".join(describe_keys(Config())))
        return 0
    if not args.experiment:
        parser.error("--experiment is required (see --list)")
    overrides = [kv for group in args.overrides for kv in group]
    cfg = load_experiment(args.experiment, overrides)
    if args.list_keys:
        runs = [("", cfg)] if isinstance(cfg, Config) else [(f"{stage.name}.", stage.config) for stage in cfg]
        print("\n".join(line for prefix, run in runs for line in describe_keys(run, prefix)))
        return 0
    if args.print_config:
        print_config(cfg)
        return 0

    from flaxgpt.host_allocator import tune_host_allocator  # imported late: --list and --print-config stay fast
    from flaxgpt.sharding import initialize_distributed

    tune_host_allocator()
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    stem = os.path.splitext(os.path.basename(args.experiment))[0]
    workdir = args.workdir or os.path.join("runs", cfg.name if isinstance(cfg, Config) else stem)
    if isinstance(cfg, Config):
        run_trainer(cfg, workdir)
    else:
        from flaxgpt.pipeline import run_pipeline

        run_pipeline(cfg, workdir, run_trainer)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
