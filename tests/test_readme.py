"""The READMEs stay short enough to read and the file map stays true to the package; benchmark
scripts record their figures through one helper."""

from __future__ import annotations

import glob
import os
import re

from benchmarks._results import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP_HEADING = "## Where everything is"


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as f:
        return f.read()


def _file_map() -> set[str]:
    """The paths listed in the README's file map: the section under MAP_HEADING."""
    text = _read("README.md")
    assert MAP_HEADING in text, f"README.md has no '{MAP_HEADING}' section"
    section = text.split(MAP_HEADING, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^(\S+\.py)\b", section, flags=re.MULTILINE))


def test_file_map_lists_every_module_of_the_package_and_nothing_else():
    modules = {
        os.path.relpath(p, REPO)
        for p in glob.glob(os.path.join(REPO, "flaxgpt", "**", "*.py"), recursive=True)
        if os.path.getsize(p) > 0  # empty package markers say nothing
    }
    listed = _file_map()
    assert not modules - listed, f"missing from README.md's file map: {sorted(modules - listed)}"
    stale = {p for p in listed if not os.path.exists(os.path.join(REPO, p))}
    assert not stale, f"README.md's file map lists files that do not exist: {sorted(stale)}"


def test_readmes_stay_within_their_sizes():
    assert len(_read("README.md").splitlines()) <= 300
    assert len(_read("benchmarks", "README.md").splitlines()) <= 80


def test_benchmarks_append_results_only_through_the_helper(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("## earlier\n")
    record("## one\n\n| a |\n\n", str(path))
    record("\n## two\n", str(path))
    assert path.read_text() == "## earlier\n\n## one\n\n| a |\n\n## two\n"
    writers = [
        os.path.basename(p)
        for p in glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
        if '"RESULTS.md"' in _read("benchmarks", os.path.basename(p))
    ]
    assert writers == ["_results.py"], writers
