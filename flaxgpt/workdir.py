"""One run per workdir: `WorkdirLock` refuses a second process that would write the same
checkpoints and metrics (every step logged twice, checkpoints overwritten by two states).

The lock is an `fcntl.flock` on WORKDIR/.flaxgpt-lock, which the kernel releases when its
holder exits in any way, SIGKILL included: a killed run never leaves its workdir locked.
The holder writes its pid, host and start time into the file for the refusal message.

In a multi-process run each process locks its own file (.flaxgpt-lock, .flaxgpt-lock.1,
...), so every process of a second job on the same workdir is refused at once, instead of
one refusal leaving the others waiting at their first collective.

Not guarded: a bucket workdir (`gs://...`): object stores offer no lock that dies with
its holder, so two jobs writing one bucket path are not detected; and a holder's children
forked without exec, which inherit the lock and keep it after their parent is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

from flaxgpt import fileio
from flaxgpt.errors import UserError

LOCK_FILE = ".flaxgpt-lock"


class WorkdirBusy(UserError):
    """Another process holds the workdir."""


class WorkdirLock:
    """Held for a whole run: `with WorkdirLock(workdir): ...`. Enter it after
    `jax.distributed.initialize` (it asks jax for this process's index) and before writing
    anything into the workdir."""

    def __init__(self, workdir: str, process_index: int | None = None):
        self.workdir = workdir
        self.process_index = process_index
        self._fd: int | None = None

    @property
    def path(self) -> str:
        if self.process_index is None:
            import jax

            self.process_index = jax.process_index()
        suffix = f".{self.process_index}" if self.process_index else ""
        return os.path.join(self.workdir, LOCK_FILE + suffix)

    def __enter__(self) -> WorkdirLock:
        if fileio.is_remote(self.workdir):
            return self
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use {self.workdir} as a workdir: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirBusy(
                f"workdir {self.workdir} is in use by {holder}; stop it or choose another --workdir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        # The file stays: removing it would let a later process lock a new file while a
        # waiting one still holds the old, unlinked one.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # releases the lock
        self._fd = None


def _holder(fd: int) -> str:
    """'pid 123 on host h since <time>' from the lock file, as far as it can be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it holds the lock but has not written its name yet
