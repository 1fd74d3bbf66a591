"""See what a run did: PNG plots of every series in metrics.jsonl and one HTML page.

    python -m flaxgpt.report RUN_OR_PIPELINE_DIR [--compare DIR ...] [--out DIR]

Every numeric key a run logged is plotted against the step and against time, a panel per
key with its validation twin (`loss` beside `val_loss`) on the same axes, panels grouped by
kind (loss, evaluation, RL, optimisation, throughput, other) into one figure each. The page
(OUT/report.html, default RUN/report/) shows the figures (PNGs in the same folder, so it
opens offline), a table of final figures, the samples the run kept, and its config. A pipeline
directory (with summary.json) gets one page across its stages; `--compare` overlays other
runs (or pipelines, stage by stage) on the same axes.

Time is the rows' `time` (Unix seconds) when the logger writes one; otherwise it is rebuilt
from the logged throughput (tokens or examples per second, PPO's rollout and update seconds),
which leaves out evaluation and checkpointing, and the axis says so.

`write(run_dir, out_dir)` is the library entry point, for a training loop to call at the end.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flaxgpt import cli, fileio
from flaxgpt.errors import UserError
from flaxgpt.logging import METRICS_FILE, read_metrics
from flaxgpt.modeldir import HFFormatError, read_json

CONFIG_FILE, RESULT_FILE, SUMMARY_FILE, PAGE = "config.json", "result.json", "summary.json", "report.html"
NOT_SERIES = ("step", "time")
# (group, substrings of a key's name, without its val_/start_ prefix); the first match wins
GROUPS = (
    ("loss", ("loss", "ppl")),
    ("evaluation", ("accuracy", "exact", "bleu", "rouge", "labeler", "margin", "offset")),
    (
        "rl",
        ("reward", "score", "kl", "entropy", "clip", "advantage", "value", "variance", "response", "ended", "round"),
    ),
    ("throughput", ("per_sec", "mfu", "seconds")),
    ("optimisation", ("lr", "grad", "norm", "skipped")),
)
PANEL_COLUMNS = 3


class ReportError(UserError):
    """A directory that is not a run or a pipeline, or a run with nothing to plot."""


@dataclass
class Run:
    """One run's logged rows, config, result and samples, read from its workdir."""

    name: str
    path: str
    rows: list[dict]
    config: dict
    result: dict
    samples: list[tuple[str, str]] = field(default_factory=list)  # (where, text)


@dataclass
class Report:
    """What `write` made: the page, and every PNG with the labels of the series drawn on it."""

    page: str
    plots: dict[str, list[str]]


def _read_json(path: str) -> dict:
    if not fileio.exists(path):
        return {}
    try:
        return read_json(path)
    except HFFormatError as e:
        raise ReportError(f"{e}; expected the file a flaxgpt run writes") from None


def load_run(path: str, name: str = "") -> Run:
    """The run in `path`; ReportError if it has no metrics.jsonl or no rows in it."""
    metrics = os.path.join(path, METRICS_FILE)
    if not fileio.exists(metrics):
        raise ReportError(
            f"{path}: not a flaxgpt run or pipeline directory (no {METRICS_FILE} or {SUMMARY_FILE}); "
            "expected the --workdir of a flaxgpt.train run"
        )
    rows = [r for r in read_metrics(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not rows:
        raise ReportError(f"{metrics}: no metrics rows to plot; expected a run that logged at least one step")
    run = Run(name or _name(path), path, rows, _read_json(os.path.join(path, CONFIG_FILE)), {})
    run.result = _read_json(os.path.join(path, RESULT_FILE))
    run.samples = _samples(run)
    return run


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def _samples(run: Run) -> list[tuple[str, str]]:
    """Text the run kept: string values of its metrics rows and of result.json (e.g. `sample`)."""
    found = [
        (f"step {r['step']}: {k}", v)
        for r in run.rows
        for k, v in r.items()
        if isinstance(v, str) and _number(v) is None and v.strip()
    ]
    prompt = run.config.get("eval", {}).get("sample_prompt", "")  # the end-of-run sample continues it
    found += [
        (f"result: {k}", (prompt if k == "sample" else "") + v)
        for k, v in run.result.items()
        if isinstance(v, str) and v.strip()
    ]
    return found


def _number(value: Any) -> float | None:
    """A plottable float: numbers, and the 'nan' / 'inf' strings the logger writes for them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def _rate(row: dict, key: str) -> float | None:
    value = _number(row.get(key))
    return value if value is not None and math.isfinite(value) and value > 0 else None


def series_keys(rows: Sequence[dict]) -> list[str]:
    """Every key holding a number in some row, in first-seen order, without step and time."""
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k not in NOT_SERIES and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, None)
    return list(keys)


def base_key(key: str) -> str:
    """The panel a key is drawn in: `loss` beside `val_loss`, `task_accuracy` beside its `_greedy` twin."""
    for prefix in ("val_", "start_"):
        key = key[len(prefix) :] if key.startswith(prefix) else key
    return key[: -len("_greedy")] if key.endswith("_greedy") else key


def group_of(base: str) -> str:
    words = base.lower()
    for group, needles in GROUPS:
        if any(n in words for n in needles):
            return group
    return "other"


def panels(runs: Sequence[Run]) -> dict[str, dict[str, list[str]]]:
    """group -> panel (base key) -> the keys drawn in it, in the order the runs logged them."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for key in series_keys(run.rows):
            base = base_key(key)
            keys = grouped.setdefault(group_of(base), {}).setdefault(base, [])
            if key not in keys:
                keys.append(key)
    order = [g for g, _ in GROUPS] + ["other"]
    return {g: grouped[g] for g in order if g in grouped}


def elapsed(run: Run) -> tuple[list[float | None], str] | None:
    """Seconds since the run's first row, per row, and the axis label; None if nothing gives time."""
    if all(_number(r.get("time")) is not None for r in run.rows):
        first = run.rows[0]["time"]
        return [float(r["time"]) - first for r in run.rows], "wall time (s)"
    batch = run.config.get("train", {}).get("batch_size")
    block = run.config.get("model", {}).get("block_size")
    total, previous, times = 0.0, 0, []
    for row in run.rows:
        steps = max(row["step"] - previous, 0)
        previous = row["step"]
        tokens, examples = _rate(row, "tokens_per_sec"), _rate(row, "examples_per_sec")
        if tokens and batch and block:
            total += steps * batch * block / tokens
        elif examples and batch:
            total += steps * batch / examples
        elif "rollout_seconds" in row or "update_seconds" in row:
            total += steps * sum(_number(row.get(k)) or 0.0 for k in ("rollout_seconds", "update_seconds"))
        elif steps:
            return None  # a stretch of steps with nothing to time it by
        times.append(total)
    return times, "training time (s, from throughput)"


def _figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no global backend switched
    except ImportError as e:
        raise ReportError("flaxgpt.report needs matplotlib: pip install 'matplotlib>=3.8'") from e
    return Figure


# Larger magnitudes are drawn as gaps, as inf is: matplotlib's axis span of +-1e308 overflows.
PLOT_LIMIT = 1e300


def _points(run: Run, key: str, xs: Sequence[float | None]) -> tuple[list[float], list[float]]:
    pairs = [(x, _number(r[key])) for r, x in zip(run.rows, xs) if key in r and x is not None]
    pairs = [(x, y if abs(y) <= PLOT_LIMIT else math.nan) for x, y in pairs if y is not None and abs(x) <= PLOT_LIMIT]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_group(title: str, group: dict[str, list[str]], runs: Sequence[Run], axis: str) -> tuple[bytes, list[str]]:
    """One PNG of a group's panels against `axis` ('step' or 'time'), and the series drawn on it."""
    columns = min(PANEL_COLUMNS, len(group))
    rows = math.ceil(len(group) / columns)
    width, height = 4.4 * columns, 3.2 * rows + 0.5
    figure = _figure_class()(figsize=(width, height), dpi=100)
    # fixed margins in inches: a layout engine would measure every label, at twice the drawing time
    figure.subplots_adjust(
        left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.32, hspace=0.5
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    x_by_run = [(run, _x(run, axis)) for run in runs]
    labels = [label for ax, (base, keys) in zip(axes, group.items()) for label in _panel(ax, base, keys, x_by_run)]
    for ax in axes[len(group) :]:
        ax.set_visible(False)
    figure.suptitle(f"{title} against {axis}", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue(), labels


def _panel(ax: Any, base: str, keys: Sequence[str], x_by_run: Sequence[tuple[Run, Any]]) -> list[str]:
    """Draw one panel: each run in its colour (each key in its own where one run is shown), the first
    key solid and its twins dashed, points marked where they are few; returns the series' labels."""
    labels, xlabel, several = [], "step", len(x_by_run) > 1
    for r, (run, timeline) in enumerate(x_by_run):
        if timeline is None:
            continue
        xs, xlabel = timeline
        for k, key in enumerate(keys):
            x, y = _points(run, key, xs)
            if not x:
                continue
            label = f"{run.name}: {key}" if several else key
            marker = "o" if len(x) <= 40 or len(x) * 4 < len(run.rows) else None
            style = {"color": f"C{r if several else k}", "linestyle": "-" if k == 0 else "--", "marker": marker}
            ax.plot(x, y, label=label, markersize=3, linewidth=1.2, **style)
            labels.append(label)
    ax.set_title(base, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if labels:
        ax.legend(fontsize=7)
    return labels


def _x(run: Run, axis: str) -> tuple[list[float | None], str] | None:
    if axis == "step":
        return [float(r["step"]) for r in run.rows], "step"
    return elapsed(run)


@dataclass
class Section:
    """Runs shown together: a single run with those it is compared to, or one stage of pipelines."""

    title: str
    runs: list[Run]
    prefix: str = ""  # of its PNG names: the stage, in a pipeline
    notes: list[str] = field(default_factory=list)  # stages that could not be read, and why


def is_pipeline(path: str) -> bool:
    return fileio.exists(os.path.join(path, SUMMARY_FILE))


def stage_names(path: str) -> list[str]:
    """A pipeline's stages: those summary.json lists (finished, in order), then unfinished ones."""
    names = list(_read_json(os.path.join(path, SUMMARY_FILE)))
    if not fileio.is_remote(path):
        started = [
            d for d in os.listdir(path) if d not in names and os.path.exists(os.path.join(path, d, METRICS_FILE))
        ]
        names += sorted(started, key=lambda d: os.path.getmtime(os.path.join(path, d, METRICS_FILE)))
    return names


def _names(paths: Sequence[str]) -> list[str]:
    """Short legend names: the folder name, or the whole path where two folders share a name."""
    short = [_name(p) for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths)]


def sections(run_dir: str, compare: Sequence[str] = ()) -> list[Section]:
    """What a report shows: the run (or each stage of the pipeline) with the compared ones."""
    dirs = [run_dir, *compare]
    names = _names(dirs)
    for path in dirs:
        if not fileio.exists(path):
            raise ReportError(f"{path}: no such directory; expected a flaxgpt run or pipeline directory")
    if not is_pipeline(run_dir):
        return [Section(names[0], [load_run(d, n) for d, n in zip(dirs, names)])]
    mixed = [d for d in compare if not is_pipeline(d)]
    if mixed:
        raise ReportError(f"--compare {mixed[0]}: not a pipeline directory (no {SUMMARY_FILE}); compare like with like")
    stages = stage_names(run_dir)
    if not stages:
        raise ReportError(f"{run_dir}/{SUMMARY_FILE}: lists no stages and none has started; nothing to report")
    found = []
    for stage in stages:
        section = Section(stage, [], _safe(stage) + "_")
        for path, name in zip(dirs, names):
            if path == run_dir or fileio.exists(os.path.join(path, stage, METRICS_FILE)):
                try:
                    section.runs.append(load_run(os.path.join(path, stage), name))
                except ReportError as e:  # one stage not started yet must not hide the others
                    section.notes.append(str(e))
        found.append(section)
    return found


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _write_plots(section: Section, out_dir: str) -> dict[str, list[str]]:
    """Every group's PNGs against step and time, written into out_dir: file name -> series drawn."""
    plots = {}
    for group, panel_keys in panels(section.runs).items():
        for axis in ("step", "time"):
            png, labels = plot_group(f"{section.title}: {group}", panel_keys, section.runs, axis)
            if not labels:
                continue  # nothing timed: no time axis for this run
            name = f"{section.prefix}{group}_{axis}.png"
            with fileio.open_file(os.path.join(out_dir, name), "wb") as f:
                f.write(png)
            plots[name] = labels
    return plots


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def final_figures(run: Run) -> dict[str, Any]:
    """Each series' last logged value, then the figures the run returned (result.json)."""
    figures: dict[str, Any] = {}
    for row in run.rows:
        figures.update({k: v for k, v in row.items() if k != "time" and _number(v) is not None})
    figures.update({k: v for k, v in run.result.items() if _number(v) is not None})
    return figures


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(value)}


def _figures_html(runs: Sequence[Run]) -> str:
    figures = [final_figures(run) for run in runs]
    keys = list(dict.fromkeys(k for f in figures for k in f))
    parts = [
        "<h3>Final figures</h3>",
        _table(["figure", *[r.name for r in runs]], [[k, *[f.get(k) for f in figures]] for k in keys]),
    ]
    if len(runs) > 1:
        configs = [_flat(r.config) for r in runs]
        differing = [k for k in dict.fromkeys(k for c in configs for k in c) if len({c.get(k) for c in configs}) > 1]
        parts += [
            "<h3>Config differences</h3>",
            _table(["key", *[r.name for r in runs]], [[k, *[c.get(k, "") for c in configs]] for k in differing])
            if differing
            else "<p>none</p>",
        ]
    return "".join(parts)


def _section_html(section: Section, plots: dict[str, list[str]]) -> str:
    parts = [f'<h2 id="{html.escape(section.prefix or "run")}">{html.escape(section.title)}</h2>']
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in section.notes]
    if not section.runs:
        return "".join(parts)
    parts.append(_figures_html(section.runs))
    parts.append("<h3>Plots</h3>")
    images = [f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in plots]
    parts += [f'<div class="pair">{"".join(images[i : i + 2])}</div>' for i in range(0, len(images), 2)]
    samples = [(run.name, where, text) for run in section.runs for where, text in run.samples]
    if samples:
        parts.append("<h3>Samples</h3>")
        parts += [f"<p>{html.escape(n)} ({html.escape(w)})</p><pre>{html.escape(t)}</pre>" for n, w, t in samples]
    for run in section.runs:
        text = json.dumps(run.config, indent=2) if run.config else f"(no {CONFIG_FILE})"
        parts.append(
            f"<details><summary>config of {html.escape(run.name)}</summary><pre>{html.escape(text)}</pre></details>"
        )
    return "".join(parts)


STYLE = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}
.pair{display:flex;gap:8px;align-items:flex-start;margin:.5em 0}.pair img{width:50%;min-width:0}
pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}
.note{color:#a40}"""


def _pipeline_html(run_dir: str, compare: Sequence[str]) -> str:
    """The pipelines' summary.json side by side: a row per stage and figure."""
    dirs = [run_dir, *compare]
    summaries = [_read_json(os.path.join(d, SUMMARY_FILE)) for d in dirs]
    rows = [
        [stage, key, *[s.get(stage, {}).get(key) if isinstance(s.get(stage), dict) else None for s in summaries]]
        for stage, figures in summaries[0].items()
        if isinstance(figures, dict)
        for key in figures
    ]
    links = " · ".join(f'<a href="#{_safe(stage)}_">{html.escape(stage)}</a>' for stage in stage_names(run_dir))
    return f"<p>stages: {links}</p><h2>Pipeline summary</h2>" + _table(["stage", "figure", *_names(dirs)], rows)


def write(run_dir: str, out_dir: str | None = None, compare: Sequence[str] = ()) -> Report:
    """Plots and OUT/report.html of a run or pipeline (default OUT: RUN/report), overlaying `compare`."""
    out_dir = out_dir or os.path.join(run_dir, "report")
    found = sections(run_dir, compare)
    fileio.makedirs(out_dir)
    plots: dict[str, list[str]] = {}
    body = [_pipeline_html(run_dir, compare)] if is_pipeline(run_dir) else []
    for section in found:
        section_plots = _write_plots(section, out_dir)
        plots.update(section_plots)
        body.append(_section_html(section, section_plots))
    title = f"flaxgpt report: {_name(run_dir)}" + (f" compared with {', '.join(_names(compare))}" if compare else "")
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(fileio.absolute(run_dir))}</p>{''.join(body)}</body></html>\n"
    )
    path = os.path.join(out_dir, PAGE)
    fileio.write_atomic(path, page)
    return Report(path, plots)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m flaxgpt.report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("run_dir", metavar="RUN_OR_PIPELINE_DIR", help="the --workdir of a run or a pipeline")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="DIR", help="runs (or pipelines) to overlay (default: none)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN_OR_PIPELINE_DIR/report)")
    args = parser.parse_args(argv)
    report = write(args.run_dir, args.out, args.compare)
    print(f"report: {report.page} ({len(report.plots)} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
