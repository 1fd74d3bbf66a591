"""`python -m flaxgpt.train --experiment NAME [--workdir DIR] [--set key=value ...]`

NAME is a file in experiments/ (without .py) or a path to a Python file that
defines `config() -> flaxgpt.config.Config` (one run), or `stages()` returning a list of
`flaxgpt.pipeline.Stage` (a pipeline such as chat_demo: each stage a run in WORKDIR/<stage>,
overridden with --set STAGE.section.key=value, or section.key=value for all stages).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence

from flaxgpt import cli
from flaxgpt.config import Config, ConfigError, apply_overrides, describe_keys, to_json

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
    spec = importlib.util.spec_from_file_location(f"flaxgpt_experiment_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # the user's file; other exceptions keep their traceback to debug it
        raise ConfigError(f"{e.filename}:{e.lineno}: {e.msg}") from e
    if hasattr(module, "stages"):
        from flaxgpt import pipeline

        stages = module.stages()
        for stage in stages:
            if stage.config.name == "unnamed":
                stage.config.name = f"{stem}.{stage.name}"
        pipeline.apply_stage_overrides(stages, list(overrides))
        pipeline.validate(stages)
        return stages
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {path} defines neither config() nor stages()")
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"experiment {path}: config() returned {type(cfg).__name__}, not flaxgpt.config.Config")
    if cfg.name == "unnamed":
        cfg.name = stem
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


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
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
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
        if isinstance(cfg, Config):
            print(to_json(cfg))
        else:
            from flaxgpt.pipeline import describe

            print(describe(cfg))
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
