"""glibc host-allocator tuning for XLA:CPU: freed step buffers kept for reuse instead of being
unmapped and faulted back in on every step (FLAXGPT_HOST_ALLOCATOR), and the advice the training
loop prints when a CPU step's buffers outgrow a thread arena.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import jax

from flaxgpt.config import ConfigError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


ALLOCATOR_SETTINGS = ("tuned", "one-arena", "default")


def host_allocator_setting() -> str:
    """FLAXGPT_HOST_ALLOCATOR (default `tuned`), checked against ALLOCATOR_SETTINGS."""
    setting = os.environ.get("FLAXGPT_HOST_ALLOCATOR", "tuned")
    if setting not in ALLOCATOR_SETTINGS:
        raise ConfigError(f"FLAXGPT_HOST_ALLOCATOR={setting!r}: expected one of {', '.join(ALLOCATOR_SETTINGS)}")
    return setting


def tune_host_allocator() -> bool:
    """Make glibc keep freed host memory for reuse instead of handing it back to the kernel.

    Why: XLA:CPU allocates each step's temporary buffers anew (tens of MB for tiny models, GBs
    for large ones). By default glibc serves large requests (above a threshold that tops out at
    32 MB) with fresh mmap'd pages and unmaps them on free, so every step faults its pages back
    in: for shakespeare_char that was ~13,000 page faults and ~30 ms of kernel time in a 60-75 ms
    step. `tuned` (the default) turns mmap and trimming off (-1: a positive threshold is an int,
    so a freed 3 GB buffer would still be trimmed), so freed blocks are reused.
    `one-arena` also makes every thread allocate from the main heap. XLA runs on worker threads,
    and a thread's own arena cannot hold a block over 64 MB, so glibc maps such blocks afresh
    whatever the other settings say (GPT-2 124M's 3.4 GB buffer at sequence 1024: 0.89M faults
    and ~5 s of kernel time per step; none with one arena). Not the default: with one arena the
    threads share its lock, and XLA's compiles took ~25 % longer and shakespeare_char's CLI run
    ~15 % longer (benchmarks/README.md); use it when a CPU step's buffers exceed 64 MB
    (`host_allocator_advice`, which the training loop consults before its first step).
    `default` leaves glibc alone. The price of tuning: memory freed after a peak stays with the
    process (as with jemalloc/tcmalloc caching). Process-wide, set from FLAXGPT_HOST_ALLOCATOR
    for the CLIs and benchmarks; call it before the first computation. Returns whether anything
    was applied (glibc only).
    """
    setting = host_allocator_setting()
    if setting == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    options = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20)]
    if setting == "one-arena":
        options.append((_M_ARENA_MAX, 1))
    return all(mallopt(param, value) == 1 for param, value in options)


# A glibc thread arena's heap cannot grow past this (HEAP_MAX_SIZE on 64-bit): bigger blocks
# that an XLA:CPU worker thread allocates are mapped afresh, and faulted in, on every step.
THREAD_ARENA_LIMIT_BYTES = 64 << 20
# Below this, faulting the buffers in costs too little per step to pay one arena's slower
# compiles: the advice is for GPT-2-sized steps (gigabytes of buffers), not the tiny defaults.
ADVICE_MIN_BYTES = 1 << 30


def host_allocator_advice(jitted: Any, *args: Any) -> str | None:
    """What to change when a CPU step's XLA buffers outgrow a thread arena, else None.

    Compiles `jitted` for `args` ahead of its first call (the call then reuses the executable)
    and reads the temporary buffer size XLA plans for each run. Above 64 MiB, the `tuned`
    allocator cannot keep the buffer: `one-arena` can (GPT-2 124M at sequence 1024 on a CPU: 3.4 GB
    of buffers, 13.0 -> 9.2 s per step). It stays advice, not automatic, because the allocator is
    set before XLA's threads start, and one arena slows compiles (tune_host_allocator)."""
    if jax.default_backend() != "cpu" or host_allocator_setting() != "tuned" or not sys.platform.startswith("linux"):
        return None
    analysis = jitted.lower(*args).compile().memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
    if temp <= max(THREAD_ARENA_LIMIT_BYTES, ADVICE_MIN_BYTES):
        return None
    return (
        f"this step's XLA buffers take {temp / 2**20:,.0f} MiB per run, more than a thread arena's "
        f"{THREAD_ARENA_LIMIT_BYTES >> 20} MiB, so every step maps and faults them in afresh; run with "
        "FLAXGPT_HOST_ALLOCATOR=one-arena to keep them (benchmarks/README.md: GPT-2 124M on a CPU "
        "13.0 -> 9.2 s per step)"
    )
