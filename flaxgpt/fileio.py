"""Files of a run, on a local disk or in a bucket: a workdir (or a data path) may be
`gs://bucket/path`, which is how multi-host TPU jobs share checkpoints and outlive a preempted
VM. Local paths use the plain OS calls; remote ones go through `etils.epath` (installed with
orbax; `gs://` needs `gcsfs`: the `gcs` extra). Checkpoints themselves go through orbax,
which writes to buckets on its own."""

from __future__ import annotations

import os
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


def write_atomic(path: str, text: str) -> None:
    """Write through a temporary name and rename, so a reader never sees half a file."""
    with open_file(path + ".tmp", "w") as f:
        f.write(text)
    if is_remote(path):
        _remote(path + ".tmp").replace(_remote(path))
    else:
        os.replace(path + ".tmp", path)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)
