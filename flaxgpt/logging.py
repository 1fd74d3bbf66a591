"""The one logging path: WORKDIR/metrics.jsonl, TensorBoard, optional Weights & Biases,
and a progress line on the terminal.

Only the main process (index 0) writes. On resume the metrics file is cut back
to the restored step, so it reads as if the run had never stopped: rows past that
step and damaged lines go (one message says how many), every other row stays, and
the file is replaced atomically, so a kill during the rewrite loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from flaxgpt import fileio
from flaxgpt.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
REMOTE_FLUSH_SECONDS = 30.0


def read_metrics(workdir: str) -> list[dict]:
    """Every row of WORKDIR/metrics.jsonl that parses (a torn or damaged line is left out)."""
    return _read_rows(os.path.join(workdir, METRICS_FILE))[0]


def _read_rows(path: str) -> tuple[list[dict], int]:
    """(rows that parse, number of damaged lines). A last line without its newline that does
    not parse is a row cut short by a kill: it is left out without being counted."""
    if not fileio.exists(path):
        return [], 0
    *lines, last = fileio.read_bytes(path).split(b"\n")  # last: b"" after a final newline
    rows, bad = [], 0
    for line in [*lines, last]:
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif line.strip() and line is not last:
            bad += 1
    return rows, bad


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class MetricsLogger:
    def __init__(self, workdir: str, cfg: LoggingConfig, total_steps: int, start_step: int, run_config: dict):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self._tb = self._wandb = self._bar = None
        self.shown: tuple[str, ...] = ("loss", "val_loss", "lr", "tokens_per_sec")  # the trainer's figures
        self._last_line = ""
        if not self.enabled:
            return
        self.path = os.path.join(workdir, METRICS_FILE)
        rows, dropped = self._resumed_rows(start_step)
        # rewrite: drops what a killed run logged past its checkpoint. A bucket cannot append:
        # there the rows are kept and the file rewritten at most every REMOTE_FLUSH_SECONDS.
        self._remote_rows = rows if fileio.is_remote(workdir) else None
        self._flushed = time.time()
        if self._remote_rows is None:
            fileio.write_atomic(self.path, "".join(rows))
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        else:
            self._flush_remote()
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            # TensorBoard's event files are appended to: on a bucket workdir they stay on this host
            tb_dir = (
                os.path.join(workdir, "tb")
                if not fileio.is_remote(workdir)
                else os.path.join("/tmp", "flaxgpt-tb", workdir.replace("://", "/"))
            )
            # the file is named by the second it is opened in: a run resumed within that second would
            # truncate the previous run's file, so the resumed step is in the name too
            self._tb = SummaryWriter(tb_dir, purge_step=start_step + 1, filename_suffix=f".{start_step}")
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs wandb: pip install 'flaxgpt[wandb]'") from e
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                mode=cfg.wandb_mode,
                dir=workdir,
                config=run_config,
                name=os.path.basename(os.path.abspath(workdir)),
                resume="allow",
            )
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps or None, initial=start_step, unit="step", dynamic_ncols=True)
        if dropped:
            self.message(f"{self.path}: dropped {dropped}; kept {len(rows)} rows up to step {start_step}")

    def _resumed_rows(self, start_step: int) -> tuple[list[str], str]:
        """The file's rows up to `start_step` (as lines), and what was dropped, in words."""
        rows, bad = _read_rows(self.path)
        kept = [json.dumps(r) + "\n" for r in rows if r["step"] <= start_step]
        dropped = [_count(len(rows) - len(kept), "row") + " past the restored step"] if len(rows) > len(kept) else []
        dropped += [_count(bad, "damaged line")] if bad else []
        return kept, " and ".join(dropped)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one row; `metrics` values must already be host numbers."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self._remote_rows is None:
            self._file.write(json.dumps(row) + "\n")
        else:
            self._remote_rows.append(json.dumps(row) + "\n")
            if time.time() - self._flushed > REMOTE_FLUSH_SECONDS:
                self._flush_remote()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self._progress(step, row)

    def message(self, text: str) -> None:
        """A human-readable line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _progress(self, step: int, row: dict) -> None:
        """The step's line; without a total (0: an open-ended run) no total and no eta."""
        shown = {k: row[k] for k in self.shown if isinstance(row.get(k), (int, float))}
        total = f"/{self.total_steps}" if self.total_steps > 0 else ""
        line = " | ".join([f"step {step}{total}"] + [f"{k} {v:.4g}" for k, v in shown.items()])
        if self._bar is not None:
            # the postfix first: the update redraws the bar with this step's figures, not the last ones
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
            self._last_line = line
        elif self.mode == "plain" and not total:
            print(line, flush=True)
        elif self.mode == "plain":
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / max(done, 1) * max(self.total_steps - step, 0)
            print(line + f" | eta {_duration(eta)}", flush=True)

    def end_progress(self) -> None:
        """Close the bar, leaving the last logged step's line below it (a bar alone scrolls away)."""
        if self._bar is None:
            return
        self._bar.close()
        self._bar = None
        if self._last_line:
            print(self._last_line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.end_progress()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._remote_rows is None:
            self._file.close()
        else:
            self._flush_remote()

    def _flush_remote(self) -> None:
        fileio.write_atomic(self.path, "".join(self._remote_rows))
        self._flushed = time.time()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the row parseable
    return value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
