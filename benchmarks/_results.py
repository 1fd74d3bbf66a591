"""The one place the benchmark scripts record their figures: each run appends a section (its
header line with machine, date and versions, the exact command, its tables) to
benchmarks/RESULTS.md, so measurements accumulate with the conditions they were taken in."""

from __future__ import annotations

import os

# FLAXGPT_BENCH_RESULTS sends the sections elsewhere (benchmarks/gpu_session.py collects a device
# session's sections in its output folder, to be appended here afterwards).
RESULTS = os.environ.get("FLAXGPT_BENCH_RESULTS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"
)


def record(text: str, path: str = RESULTS) -> None:
    """Append `text` to RESULTS.md as one section, after a blank line, ending in one newline."""
    with open(path, "a") as f:
        f.write("\n" + text.strip("\n") + "\n")
