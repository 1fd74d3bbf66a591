"""benchmarks/gpu_session.py, the one device call of issue 26: its summary judges each goal from
the parts' figures, and its dry run (tiny shapes on the CPU) runs parts end to end and writes
the files a device session brings back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_session():
    spec = importlib.util.spec_from_file_location("gpu_session", os.path.join(REPO, "benchmarks", "gpu_session.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_judges_each_goal_and_says_what_was_not_measured():
    session = load_session()
    part = {"rc": 0, "seconds": 1.0, "timed_out": False, "status": "ok"}
    gpt2 = {"name": "gpt2_124m", "shape": {"batch": 16}, "ours": 600e3, "mfu": 0.52, "mfu_measured": 0.7}
    results = {
        "parts": {"gpt2": part, "llama": dict(part, status="timed out after 110 s", rc=-15), "decode": part},
        "gpt2": {"rows": [dict(gpt2, shipped=300e3)], "conditions": {"measured_peak": 7.5e14}},
        "torch_compile": {"tokens_per_sec": 700e3, "batch": 16, "backend": "inductor", "warmup_s": 60.0},
        "llama": None,
        "decode": {
            "rows": [{"batch": 1, "ours": 3000.0, "hf": 1000.0}, {"batch": 64, "ours": 100e3, "hf": 80e3}],
            "batch1_bound": 19300.0,
            "param_bytes": 249e6,
            "hbm_bandwidth": 4.8e12,
        },
    }
    text = session.summary(results, dry_run=False)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["GPT-2 124M MFU (datasheet peak)"].endswith("| 52.0% | met |")
    assert rows["GPT-2 124M vs PyTorch eager"].endswith("| 2.00x | met |")
    assert rows["GPT-2 124M vs PyTorch torch.compile"].endswith("| 0.86x | NOT met |")
    assert rows["Llama-1B-shaped MFU (datasheet peak)"].endswith("| — | not measured |")
    assert rows["decode batch 1 vs transformers"].endswith("| 3.00x | met |")
    assert rows["decode batch 64 vs transformers"].endswith("| 1.25x | NOT met |")
    assert "15.5% of the bandwidth bound" in text
    assert rows["llama"] == "| llama | timed out after 110 s | 1 |"


def test_real_commands_carry_the_issue_shapes(tmp_path):
    session = load_session()
    args = session.argparse.Namespace(
        dry_run=False, attention="auto", out=str(tmp_path), gpt2_batch=16, llama_batch=8, llama_remat="none"
    )
    commands = {name: " ".join(cmd) for name, cmd in session.part_commands(args, str(tmp_path)).items()}
    assert set(commands) == set(session.PARTS)
    assert "--only gpt2_124m --batch 16" in commands["gpt2"] and "--dtype bfloat16" in commands["gpt2"]
    assert "--only llama_1b --batch 8" in commands["llama"]
    assert "--prompt 128 --new 256 --batches 1,64" in commands["decode"] and "--hf" in commands["decode"]
    assert "--batch=16" in commands["torch_compile"] and "--compile-backend=inductor" in commands["torch_compile"]
    assert "--device=cuda" in commands["torch_compile"]
    assert session.BUDGET_S + 30 <= session.RUN_TIMEOUT_S and f"timeout_s: {session.RUN_TIMEOUT_S}" in session.__doc__
    assert session.RUN_TIMEOUT_S <= 600  # one device command's limit


@pytest.mark.slow
def test_dry_run_runs_parts_and_writes_what_the_device_returns(tmp_path):
    """Three parts of the dry run (the Llama step with its profile, decode against transformers,
    the PyTorch reference under torch.compile): ~40 s of CPU."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_session.py"), "--dry-run", "--out", str(out)]
        + ["--parts", "llama", "decode", "torch_compile"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = set(os.listdir(out))
    assert {"session.log", "summary.md", "results.json", "RESULTS_section.md", "profile_llama_1b.md"} <= files
    assert len(files) <= 8  # what the device returns
    results = json.loads((out / "results.json").read_text())
    assert [p["status"] for p in results["parts"].values()] == ["ok"] * 3
    assert results["llama"]["rows"][0]["name"] == "llama_1b"
    assert [r["batch"] for r in results["decode"]["rows"]] == [1, 4] and results["decode"]["rows"][0]["hf"] > 0
    assert results["torch_compile"]["compiled"] is True
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| decode batch 4 vs transformers | 2.00x |" in summary
    sections = (out / "RESULTS_section.md").read_text()
    assert "## train_throughput" in sections and "## decode" in sections and "## gpu_session" in sections
