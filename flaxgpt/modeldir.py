"""Reading files of a model directory (a Hugging Face model, or a run's workdir) from inside it.

Every file that an import or a run opens because a directory's own files name it (a shard of
`model.safetensors.index.json`, the tokenizer of `imported_tokenizer.meta.json`, any file
reached through a symlink) goes through `inside()`: a name that is absolute, climbs out with
`..`, or resolves through a symlink to somewhere else is refused with an `HFFormatError`. The
one exception is the Hugging Face cache's own layout, where `snapshots/<revision>/*` are
symlinks into the same repository's `blobs/`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flaxgpt import fileio
from flaxgpt.errors import UserError

# Largest JSON file (config.json, tokenizer_config.json, an index, a run's tokenizer meta) read
# whole: real ones are kilobytes; a Llama-3 index is ~25 KB.
MAX_JSON_BYTES = 64 * 2**20
HF_DIRECTORY = "a Hugging Face model directory (train.init_from_hf, convert --hf)"


class HFFormatError(UserError):
    """A Hugging Face directory (or an imported run's files) that flaxgpt will not read: an
    unsupported architecture, a malformed or lying file, a missing or mis-shaped tensor, or a
    path leading out of the directory. The message names the file and the field."""


def _roots(directory: str) -> list[str]:
    root = os.path.realpath(directory)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))  # the Hugging Face cache layout
    return roots


def inside(directory: str, name: Any, source: str) -> str:
    """The path of `name` (a relative file name that `source` gives) inside `directory`;
    HFFormatError if it is not a plain relative name or leads outside the directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise HFFormatError(f"{source}: file name {name!r} is not a relative file name")
    if os.path.isabs(name) or "://" in name or name.startswith("~"):
        raise HFFormatError(f"{source}: names {name!r}, outside {directory}: only files inside it are read")
    if fileio.is_remote(directory):
        if ".." in name.replace("\\", "/").split("/"):
            raise HFFormatError(f"{source}: names {name!r}, outside {directory}: only files inside it are read")
        return directory.rstrip("/") + "/" + name
    path = os.path.realpath(os.path.join(directory, name))
    if not any(os.path.commonpath([root, path]) == root for root in _roots(directory)):
        raise HFFormatError(f"{source}: {name!r} leads outside {directory} (to {path}): only files inside it are read")
    return path


def require_directory(directory: str, what: str = HF_DIRECTORY) -> None:
    """HFFormatError unless `directory` is an existing directory (`what`: what it should be)."""
    if not isinstance(directory, str) or not directory:
        raise HFFormatError(f"no directory given: expected {what}")
    if fileio.is_remote(directory):
        return
    if not os.path.exists(directory):
        raise HFFormatError(f"{directory} does not exist: expected {what}")
    if not os.path.isdir(directory):
        raise HFFormatError(f"{directory} is not a directory: expected {what}")


def read_json(path: str, expect: type = dict) -> Any:
    """A small JSON file, as `expect`; HFFormatError naming the file if it is not one."""
    try:
        if not fileio.is_remote(path) and os.path.getsize(path) > MAX_JSON_BYTES:
            size = os.path.getsize(path)
            raise HFFormatError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES} a JSON file here may have")
        with fileio.open_file(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        value = json.loads(data.decode("utf-8"))
    except HFFormatError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HFFormatError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except IsADirectoryError:
        raise HFFormatError(f"{path}: is a directory, expected a JSON file") from None
    if not isinstance(value, expect):
        raise HFFormatError(f"{path}: holds a JSON {type(value).__name__}, expected a JSON object")
    return value
