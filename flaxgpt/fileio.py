"""Files of a run, on a local disk or in a bucket: a workdir (or a data path) may be
`gs://bucket/path`, which is how multi-host TPU jobs share checkpoints and outlive a preempted
VM. Local paths use the plain OS calls; remote ones go through `etils.epath` (installed with
orbax; `gs://` needs `gcsfs`: the `gcs` extra). Checkpoints themselves go through orbax,
which writes to buckets on its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from typing import IO, Any


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _remote(path: str) -> Any:
    from etils import epath

    return epath.Path(path)


def open_file(path: str, mode: str = "r", **kwargs: Any) -> IO:
    if is_remote(path):
        return _remote(path).open(mode, **{k: v for k, v in kwargs.items() if k == "encoding"})
    return open(path, mode, **kwargs)


def exists(path: str) -> bool:
    return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _remote(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def write_atomic(path: str, content: str | bytes) -> None:
    """Write through a temporary name and rename, so a reader never sees half a file: if
    writing fails (a full disk, text that cannot be encoded) the old file stays as it was
    and the temporary one is removed. The temporary name is unique per process and thread,
    so two writers never write into one temporary file."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    binary = isinstance(content, bytes)
    try:
        with open_file(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            f.write(content)
            if not is_remote(path):
                f.flush()
                os.fsync(f.fileno())  # the rename must not reach the disk before the data
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise


def rename(src: str, dst: str) -> None:
    """Move a file or directory, replacing a file at `dst`."""
    if is_remote(src):
        _remote(src).replace(_remote(dst))
    else:
        os.replace(src, dst)


def remove(path: str) -> None:
    if is_remote(path):
        _remote(path).unlink()
    else:
        os.remove(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return [p.name for p in _remote(path).iterdir()]
    return os.listdir(path)


def rmtree(path: str) -> None:
    if is_remote(path):
        _remote(path).rmtree()
    else:
        shutil.rmtree(path)


def tree_size(path: str) -> int:
    """Bytes of disk the files under a local directory take (whole blocks, as `du` counts)."""
    return sum(os.stat(os.path.join(root, f)).st_blocks * 512 for root, _, files in os.walk(path) for f in files)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)
