"""The one checkpoint path: orbax `CheckpointManager` saving the whole train state
plus a JSON record (data position, model config) under WORKDIR/checkpoints.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save never leaves a half-written checkpoint that a restart
would pick up (it leaves STEP.orbax-checkpoint-tmp, removed when the next run starts).
A checkpoint damaged afterwards (a file deleted or cut short) is skipped on resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxgpt import fileio
from flaxgpt.config import CheckpointConfig, ModelConfig, to_dict
from flaxgpt.errors import UserError

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written

# Model fields that change parameter shapes or meaning; a restore must agree on all of them.
STRUCTURAL_FIELDS = (
    "recipe",
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_kv_heads",
    "d_model",
    "head_dim",
    "d_ff",
    "position",
    "norm",
    "mlp",
    "use_bias",
    "qkv_bias",
    "qk_norm",
    "norm_plus_one",
    "post_norms",
    "tie_embeddings",
    "scan_layers",
    "param_dtype",
    "output",
    "lora_rank",
    "lora_targets",
)
# Model fields that keep the shapes but change what the parameters mean: a restore must agree too.
MEANING_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_context",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_attention_factor",
    "sliding_window",
    "global_every",
    "embed_scale",
    "attn_softcap",
    "logit_softcap",
    "query_pre_attn_scalar",
    "norm_eps",
    "lora_alpha",
)
# Config keys that change the optimizer state's tree (clipping on or off, which leaves decay)
OPTIMIZER_STRUCTURE_KEYS = ("optimizer.grad_clip", "optimizer.no_decay")
_TREE_MISMATCH = "tree structures do not match"  # orbax's words for a state of another structure


class CheckpointMismatch(UserError):
    """The checkpoint was written by a model of another shape or vocabulary."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions, a bucket refusing writes)."""


class CheckpointUnreadable(UserError):
    """Checkpoints exist, but none of them can be restored."""


class StateMismatch(CheckpointUnreadable):
    """The checkpoints are sound, but their train state has another structure than this
    config's (the model agreeing, the optimizer's settings differ): nothing to move out."""


UNREADABLE_DIR = "checkpoints-unreadable"  # WORKDIR/<this>/<step>: what a resume set aside


class Checkpointer:
    """Saves and restores a run's state; every failure reaches the caller as one `UserError`.

    With async saves a write runs while training goes on: its outcome is checked before the
    next save starts and in `close`, and the error names the step that failed. Call `close`
    on every exit (try/finally): it finishes the pending save or removes what it left.
    """

    def __init__(self, workdir: str, cfg: CheckpointConfig, read_only: bool = False):
        """`read_only`: a reader beside the run that writes (a server, a fine-tuning start) neither
        creates nor cleans up anything, so a save in progress there is left alone."""
        self.directory = fileio.absolute(os.path.join(workdir, "checkpoints"))
        self.cfg = cfg
        self._pending: int | None = None  # the step of a save that may still be running
        self._failed_steps: list[int] = []  # saves already reported as failed
        self._sizes: dict[int, int] = {}  # bytes each finished checkpoint takes on a local disk
        _quiet_orbax_errors()
        options = ocp.CheckpointManagerOptions(
            # below 1, orbax would delete the checkpoint just written (config.py rejects it too)
            max_to_keep=max(cfg.max_to_keep, 1),
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,  # what a killed save left behind
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointWriteError(f"cannot use {self.directory} for checkpoints: {_reason(e)}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict, force: bool = False) -> bool:
        """Save if step is due (or force); `record` must be JSON-able. Raises
        `CheckpointWriteError` for this save or for a previous async one that failed."""
        if not self.cfg.enabled:
            return False
        if not force and step % self.cfg.every_steps:
            return False
        self._finish_pending()
        if step in self.manager.all_steps():
            return False
        self._check_free_space(step)
        self._pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
                force=True,
            )
        except Exception as e:
            self._failed(step, e)
        if not self.cfg.async_save:
            self._finish_pending()
        return True

    def _finish_pending(self) -> None:
        """Wait for the save in flight; on failure remove its temporary directory and raise."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._failed(step, e)
        if jax.process_index() == 0 and not fileio.exists(self._step_dir(step)):
            # orbax logs (does not raise) a commit that failed and leaves the step unrenamed
            self._failed(step, OSError("the save did not complete"))

    def _failed(self, step: int, error: BaseException) -> None:
        self._pending = None
        self._failed_steps.append(step)
        self._drain()
        self._remove_tmp_dirs(step)
        self.manager.reload()
        raise CheckpointWriteError(
            f"could not write checkpoint {step} to {self.directory}: {_reason(error)}"
        ) from error

    def _remove_tmp_dirs(self, step: int) -> None:
        if jax.process_index() == 0:
            for name in fileio.listdir(self.directory):
                if name.startswith(f"{step}{TMP_SUFFIX}"):
                    fileio.rmtree(os.path.join(self.directory, name))

    def _drain(self) -> None:
        """Let orbax's background writes of a failed save end before its directory is removed:
        orbax raises the commit's error once and leaves its metadata writes queued, and one of
        those landing after the removal would fail again at `close`."""
        with contextlib.suppress(Exception):  # the save's own error is the one reported
            self.manager.wait_until_finished()
        for _ in range(16):  # check_for_errors also waits for the queued metadata writes, one error a call
            with contextlib.suppress(Exception):
                self.manager.check_for_errors()
                return

    def _check_free_space(self, step: int) -> None:
        """Refuse a save the local disk cannot hold (the previous checkpoint's size), before
        orbax starts writing it: orbax removes the oldest checkpoint only once the new one is
        complete, so the new one needs room of its own. Process 0 measures; all processes
        refuse together, so none is left waiting inside a save the others gave up."""
        latest = self.manager.latest_step()
        if latest is None or fileio.is_remote(self.directory):
            return
        short = ""
        if jax.process_index() == 0:
            if latest not in self._sizes:
                self._sizes[latest] = fileio.tree_size(self._step_dir(latest))
            needed, free = self._sizes[latest], shutil.disk_usage(self.directory).free
            short = f" (checkpoint {latest} took {_size(needed)}, {_size(free)} free)" if free < needed else ""
        if not _everywhere(not short):
            raise CheckpointWriteError(
                f"could not write checkpoint {step} to {self.directory}: No space left on device{short}"
            )

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def restore(self, step: int, abstract_state: Any, model_cfg: ModelConfig) -> tuple[Any, dict]:
        """Restore onto the shardings in `abstract_state`, after checking the model agrees.
        `abstract_state` may be a function of the step's record (what that checkpoint holds)."""
        record = self.read_record(step)
        check_model_compatible(record.get("model", {}), model_cfg, f"{self.directory} step {step}")
        target = abstract_state(record) if callable(abstract_state) else abstract_state
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["record"]

    def restore_latest(
        self, abstract_state: Any, model_cfg: ModelConfig, log: Callable[[str], None]
    ) -> tuple[Any, dict, int] | None:
        """(state, record, step) of the newest checkpoint that restores; None when there is none.

        A checkpoint that cannot be read (a file removed or cut short, an empty step directory)
        is skipped, moved to WORKDIR/checkpoints-unreadable so that the run saves that step
        again, and named through `log`. A model mismatch is the user's to fix: it raises
        `CheckpointMismatch` at once, without trying older checkpoints.
        """
        self.manager.reload()
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, record = self.restore(step, abstract_state, model_cfg)
                error = None
            except CheckpointMismatch:
                raise
            except Exception as e:
                error = e
            if _everywhere(error is None):
                self._set_aside(skipped, step, log)
                return state, record, step
            skipped.append((step, self._why_unreadable(step, error)))
        if not skipped:
            return None
        if all(_TREE_MISMATCH in why for _, why in skipped):
            steps, keys = ", ".join(str(s) for s, _ in skipped), " and ".join(OPTIMIZER_STRUCTURE_KEYS)
            raise StateMismatch(
                f"the checkpoints in {self.directory} (steps {steps}) hold an optimizer state of another "
                f"structure than this config's: set {keys} as the run had them"
            )
        raise CheckpointUnreadable(
            f"no checkpoint in {self.directory} can be restored: "
            + "; ".join(f"{s}: {why}" for s, why in skipped)
            + f". Move them out of {self.directory} to start afresh, or choose another --workdir"
        )

    def _why_unreadable(self, step: int, error: BaseException | None) -> str:
        if error is None:
            return "unreadable on another process"
        path = self._step_dir(step)
        if fileio.exists(path) and not fileio.listdir(path):
            return "empty directory"
        return _reason(error).replace(path + "/", "")

    def _set_aside(self, skipped: list[tuple[int, str]], restored: int, log: Callable[[str], None]) -> None:
        """Move unreadable checkpoints newer than `restored` out of the manager's directory:
        left in place, they would stop the run from saving those steps again and count
        towards max_to_keep."""
        for step, why in skipped:
            target = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, str(step))
            if jax.process_index() == 0:
                fileio.makedirs(os.path.dirname(target))
                if fileio.exists(target):
                    target += f"-{int(time.time())}"
                fileio.rename(self._step_dir(step), target)
            log(f"checkpoint {step} unreadable ({why}); using {restored} ({step} moved to {target})")
        if skipped:
            _everywhere(True)  # the moves are done before any process reads the directory again
            self.manager.reload()

    def restore_params(self, step: int, abstract_params: Any, model_cfg: ModelConfig, path: tuple = ()) -> Any:
        """Only the parameters of a saved train state (no optimizer state is read), or the
        subtree of them at `path` (e.g. ("policy",) of a PPO state). A checkpoint that cannot
        be read is a `CheckpointUnreadable` naming the steps there are to choose instead.
        `abstract_params` may be a function of the step's record, as in `restore`."""
        try:
            record = self.read_record(step)
            check_model_compatible(record.get("model", {}), model_cfg, f"{self.directory} step {step}")
            target = abstract_params(record) if callable(abstract_params) else abstract_params
            for key in reversed(("params",) + tuple(path)):
                target = {key: target}
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            )
        except CheckpointMismatch:
            raise
        except Exception as e:
            others = [s for s in self.manager.all_steps() if s != step]
            raise CheckpointUnreadable(
                f"checkpoint {step} in {self.directory} cannot be read ({self._why_unreadable(step, e)}); "
                + (f"its other checkpoints are at steps {sorted(others)}" if others else "it has no other checkpoint")
            ) from e
        params = restored["state"]
        for key in ("params",) + tuple(path):
            params = params[key]
        return params

    def close(self) -> None:
        """Finish the pending save (or remove what it left and raise `CheckpointWriteError`),
        then stop orbax's threads. Safe to call on any exit path."""
        try:
            self._finish_pending()
        except CheckpointWriteError:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        if not self._failed_steps:
            self.manager.close()
            return
        # a failed save was reported once; orbax may still hold a write of it that fails again
        with contextlib.suppress(Exception):
            self.manager.close()
        for step in self._failed_steps:
            with contextlib.suppress(OSError):
                self._remove_tmp_dirs(step)


def _reason(error: BaseException) -> str:
    """One line of why a read or write failed: the OS's words where there are some."""
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if code:  # tensorstore reports OS errors inside a ValueError
        return os.strerror(int(code.group(1)))
    lines = text.split(" [tensorstore_spec")[0].strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process: all processes must restore the same step."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class _NoOrbaxTracebacks(logging.Filter):
    """Orbax logs each failed background write with its traceback (dozens for one full disk)
    and warns about each file a damaged checkpoint lacks; the Checkpointer reports those
    failures as one line each. FLAXGPT_DEBUG=1 shows orbax's own records."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.levelno >= logging.WARNING and f"{os.sep}orbax{os.sep}" in record.pathname
        return not ours or bool(os.environ.get("FLAXGPT_DEBUG"))


def _quiet_orbax_errors() -> None:
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl.filters):
        absl.addFilter(_NoOrbaxTracebacks())


def check_model_compatible(saved: dict, model_cfg: ModelConfig, where: str) -> None:
    current = to_dict(model_cfg)
    diffs = [
        f"model.{k}: checkpoint has {saved[k]!r}, config has {current[k]!r}"
        for k in STRUCTURAL_FIELDS + MEANING_FIELDS
        if k in saved and saved[k] != current[k]
    ]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {where} does not fit this model:\n  " + "\n  ".join(diffs))
