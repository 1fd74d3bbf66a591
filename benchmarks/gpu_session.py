"""Issue 26's measurements in one device call: every part under its own time limit, everything
it prints and writes in one folder (--out, the device's $OUT), so one part's failure or
timeout loses none of the others.

THE CALL a session lent an H200 makes (the `run` tool), from the repository root:

    command:   PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_session.py --out $OUT
    carry:     (none: the H200 image has jax 0.11.2, flax, optax, torch 2.11, transformers 5.17)
    timeout_s: 540

Each part has a limit; a global --budget of 480 s caps them together (a part that would end
later gets what is left), inside the 540 s above: ~6 min expected (estimated from the H100
session's compile times), plus a minute or two of machine start, of the 15-minute device budget.
If a part failed or timed out, rerun only it AT ONCE (the machine stays warm for 30 s), e.g.
`... gpu_session.py --out $OUT --parts decode` (with a knob below), with timeout_s a minute
under status's budget_left_s; else call give_back. Then, here: append
files_at/RESULTS_section.md to benchmarks/RESULTS.md, read files_at/summary.md (each goal met
or not) and the profiles.

Parts (--parts, run in this order; limits in seconds):
  env            20  versions (jax, flax, torch, transformers), the device, nvidia-smi's clocks
  gpt2          120  GPT-2 124M (vocab 50304, 16 x 1024, bf16) train step: tokens/s, MFU against
                     the datasheet peak and a measured 8192^2 bf16 matmul; profile of 5 steps ->
                     profile_gpt2_124m.md; PyTorch eager (bf16 autocast, SDPA flash, fused AdamW)
                     in its own process                            (train_throughput.py)
  llama         170  Llama-3.2-1B-shaped (GQA 32/8, SwiGLU, RoPE, tied 128256 vocab, 1.24B)
                     8 x 2048 bf16, no remat (built again with remat full if it runs out of
                     memory): MFU; profile of 3 steps -> profile_llama_1b.md
  decode        110  GPT-2 124M greedy decode, prompt 128, 256 new tokens, bf16, batch 1 and 64:
                     flaxgpt's KV-cache engine vs transformers' generate; batch 1 against the
                     bandwidth bound (parameter bytes per token / 4.8 TB/s)   (decode.py --hf)
  torch_compile 150  the PyTorch reference at GPT-2's 16 x 1024 under torch.compile (inductor):
                     last, as its build is the likeliest to overrun   (torch_reference.py)
  gpt2_b32       60  only when named: flaxgpt's GPT-2 step at 32 x 1024 (no PyTorch)
Knobs for a rerun: --gpt2-batch (16), --llama-batch (8), --llama-remat (none: 1.24B at 8 x 2048
needs ~50-70 GB with cuDNN's attention, estimated by hand; XLA:CPU's buffer plan, with einsum
attention's saved probabilities, is 186 GiB), --attention (auto), --limit PART=SECONDS (e.g. torch_compile=240),
--budget SECONDS (480).

Files written to --out (the device returns at most 8): session.log (all output), summary.md
(each goal against its figure, each part's exit and time), results.json (every figure),
RESULTS_section.md (the scripts' sections for benchmarks/RESULTS.md), profile_gpt2_124m.md,
profile_llama_1b.md, traces.tgz (the profiler traces, for TensorBoard/XProf, if under 15 MB).

Dry run, on any machine (CPU here), before device time is spent: tiny shapes of every part,
PyTorch's compiled variant with the `eager` backend (inductor's C++ build takes minutes on 2
cores), each step that needs CUDA skipped with the reason printed:

    python benchmarks/gpu_session.py --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
# Parts in the order they run: the likeliest to overrun (torch.compile's build) last. gpt2_b32 runs
# only when named. Limits in seconds; BUDGET_S caps them all together (the last part gets what is left).
PARTS = ("env", "gpt2", "llama", "decode", "torch_compile", "gpt2_b32")
DEFAULT_PARTS = ("env", "gpt2", "llama", "decode", "torch_compile")
LIMITS = {"env": 20, "gpt2": 120, "llama": 170, "decode": 110, "torch_compile": 150, "gpt2_b32": 60}
BUDGET_S = 480  # the whole session: a part that would end past it gets what is left
# A dry run only checks that every part runs: limits that only a hung part reaches, on a loaded CPU.
DRY_LIMITS, DRY_BUDGET_S = dict.fromkeys(PARTS, 600), 3600
RUN_TIMEOUT_S = 540  # the device call's timeout_s (the header): the budget plus start-up and the summary
# GPT-2 124M as train_throughput.py's gpt2_124m (and its --tiny shape), for torch_reference.py
GPT2 = dict(vocab=50304, block_size=1024, n_layer=12, n_head=12, d_model=768, steps=20, rounds=5)
GPT2_TINY = dict(vocab=256, block_size=64, n_layer=2, n_head=4, d_model=64, batch=2, steps=2, rounds=2)
TRACES_MAX_BYTES = 15 << 20  # the device returns files up to 16 MiB
# The targets: GPT-2 MFU, ratios to PyTorch eager and compiled; Llama MFU; decode ratio.
GOALS = {"gpt2_mfu": 0.50, "gpt2_vs_eager": 1.5, "gpt2_vs_compiled": 1.0, "llama_mfu": 0.45, "decode_vs_hf": 2.0}


def part_commands(args: argparse.Namespace, work: str) -> dict[str, list[str]]:
    """Each part's command line (the real shapes, or tiny ones with --dry-run)."""
    py = sys.executable
    train = [py, os.path.join(BENCH, "train_throughput.py"), "--dtype", "bfloat16", "--attention", args.attention]
    traces = ["--trace-dir", os.path.join(work, "traces"), "--profile-dir", args.out]
    if args.dry_run:
        gpt2 = [*train, "--tiny", "--only", "gpt2_124m", "--profile-steps", "2", "--torch-timeout", "100"]
        gpt2_b32 = [*train, "--tiny", "--only", "gpt2_124m", "--batch", "4", "--no-torch"]
        llama = [*train, "--tiny", "--only", "llama_1b", "--no-torch", "--profile-steps", "2"]
        decode = ["--tiny", "--prompt", "8", "--new", "16", "--batches", "1,4", "--repeats", "1"]
        shape, device, backend = GPT2_TINY, "cpu", "eager"
    else:
        gpt2 = [*train, "--only", "gpt2_124m", "--batch", str(args.gpt2_batch)]
        gpt2 += ["--profile-steps", "5", "--torch-timeout", "60"]
        gpt2_b32 = [*train, "--only", "gpt2_124m", "--batch", "32", "--no-torch"]
        llama = [*train, "--only", "llama_1b", "--batch", str(args.llama_batch), "--no-torch", "--profile-steps", "3"]
        decode = ["--prompt", "128", "--new", "256", "--batches", "1,64", "--repeats", "2"]
        shape, device, backend = dict(GPT2, batch=args.gpt2_batch), "cuda", "inductor"
    return {
        "env": [py, os.path.abspath(__file__), "--env-report", os.path.join(work, "env.json")],
        "gpt2": [*gpt2, *traces, "--json", os.path.join(work, "gpt2.json")],
        "gpt2_b32": [*gpt2_b32, "--json", os.path.join(work, "gpt2_b32.json")],
        "torch_compile": [
            py,
            os.path.join(BENCH, "torch_reference.py"),
            *(f"--{k}={v}" for k, v in shape.items()),
            f"--device={device}",
            "--dtype=bfloat16",
            "--compile",
            f"--compile-backend={backend}",
        ],
        "llama": [*llama, "--remat", args.llama_remat, "--remat-on-oom", "full", *traces]
        + ["--json", os.path.join(work, "llama.json")],
        "decode": [
            py,
            os.path.join(BENCH, "decode.py"),
            "--model",
            "gpt2_124m",
            "--dtype",
            "bfloat16",
            "--hf",
            *decode,
            "--json",
            os.path.join(work, "decode.json"),
        ],
    }


def env_report(path: str) -> None:
    """The versions and the device, printed and written to `path` (the env part)."""
    import importlib.metadata

    report: dict = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers"):
        try:
            report[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
        report["nvidia_smi"] = (done.stdout or done.stderr).strip()
    else:
        report["nvidia_smi"] = None
        print("no nvidia-smi: not an NVIDIA machine (clocks and driver not read)")
    import jax

    device = jax.devices()[0]
    report["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    import flaxgpt.generate  # noqa: F401 - what the parts import: fails here first, and says so
    import flaxgpt.trainers.step  # noqa: F401

    print(json.dumps(report, indent=1))
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


_running: list[subprocess.Popen] = []  # the part in flight, for the SIGTERM handler


def _stop_running_part(signum, frame) -> None:
    """SIGTERM (e.g. the device call's own limit): take the running part's process group down too."""
    for proc in _running:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_part(name: str, cmd: list[str], limit: float, log, env: dict) -> dict:
    """Run one part in a process group of its own (same session: whatever ends the device call
    ends it too), its output to the console and the log; stop the whole group (PyTorch's
    subprocesses too) when it outlasts `limit` seconds."""
    banner = f"\n===== part {name}: limit {limit:.0f} s: {' '.join(cmd)}"
    print(banner, flush=True)
    log.write(banner + "\n")
    start = time.perf_counter()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **group
    )
    _running[:] = [proc]

    last = [""]  # the last line that looks like a JSON object (torch_reference.py's figures)

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith("{") and line.rstrip().endswith("}"):
                last[0] = line.strip()
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.wait()
    reader.join(timeout=5)
    _running.clear()
    seconds = time.perf_counter() - start
    status = f"timed out after {limit:.0f} s" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
    end = f"===== part {name}: {status}, {seconds:.0f} s"
    print(end, flush=True)
    log.write(end + "\n")
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "status": status, "json_line": last[0]}


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(results: dict, dry_run: bool) -> str:
    """Each of the issue's goals against its figure (met / NOT met / not measured), then the parts."""
    fmt_pct = lambda x: f"{x:.1%}"
    fmt_x = lambda x: f"{x:.2f}x"
    goals = []  # (goal, target text, measured, met)

    def goal(text: str, target: float, value: float | None, fmt) -> None:
        met = "not measured" if value is None else ("met" if value >= target else "NOT met")
        goals.append((text, fmt(target), fmt(value) if value is not None else "—", met))

    gpt2 = ((results.get("gpt2") or {}).get("rows") or [None])[0]
    goal("GPT-2 124M MFU (datasheet peak)", GOALS["gpt2_mfu"], gpt2 and gpt2["mfu"], fmt_pct)
    ratio = lambda row, key: row["ours"] / row[key] if row and row.get(key) else None
    goal("GPT-2 124M vs PyTorch eager", GOALS["gpt2_vs_eager"], ratio(gpt2, "shipped"), fmt_x)
    compiled = results.get("torch_compile") or {}
    same_batch = gpt2 and compiled.get("batch") == gpt2["shape"]["batch"]
    vs_compiled = gpt2["ours"] / compiled["tokens_per_sec"] if same_batch and compiled.get("tokens_per_sec") else None
    goal("GPT-2 124M vs PyTorch torch.compile", GOALS["gpt2_vs_compiled"], vs_compiled, fmt_x)
    b32 = ((results.get("gpt2_b32") or {}).get("rows") or [None])[0]
    if b32:
        goal(f"GPT-2 124M MFU at batch {b32['shape']['batch']}", GOALS["gpt2_mfu"], b32["mfu"], fmt_pct)
    llama = ((results.get("llama") or {}).get("rows") or [None])[0]
    goal("Llama-1B-shaped MFU (datasheet peak)", GOALS["llama_mfu"], llama and llama["mfu"], fmt_pct)
    decode = results.get("decode") or {}
    for row in decode.get("rows", []):
        goal(f"decode batch {row['batch']} vs transformers", GOALS["decode_vs_hf"], ratio(row, "hf"), fmt_x)
    lines = [
        f"## gpu_session — {datetime.date.today()}{' — DRY RUN (tiny shapes: not figures)' if dry_run else ''}",
        f"command: `python benchmarks/gpu_session.py {' '.join(sys.argv[1:])}`",
        "",
        "| goal (issue 26) | target | measured | |",
        "|---|---|---|---|",
        *(f"| {g} | {t} | {m} | {met} |" for g, t, m, met in goals),
    ]
    extra = []
    if gpt2:
        extra.append(
            f"GPT-2 124M: {gpt2['ours']:,.0f} tok/s, MFU {gpt2['mfu']:.1%} of the datasheet peak, "
            f"{gpt2['mfu_measured']:.1%} of the measured matmul peak "
            f"({results['gpt2']['conditions']['measured_peak'] / 1e12:,.1f} TFLOP/s)"
            + (f"; PyTorch eager {gpt2['shipped']:,.0f} tok/s" if gpt2.get("shipped") else "")
        )
    if compiled.get("tokens_per_sec"):
        extra.append(
            f"PyTorch torch.compile ({compiled.get('backend')}), batch {compiled.get('batch')}: "
            f"{compiled['tokens_per_sec']:,.0f} tok/s after {compiled.get('warmup_s', 0):.0f} s "
            "of compiling and warm-up"
        )
    if llama:
        extra.append(
            f"Llama-1B-shaped ({llama['params'] / 1e9:.2f}B params, {llama['shape']['batch']} x "
            f"{llama['shape']['block']}, remat {llama.get('remat')}): "
            f"{llama['ours']:,.0f} tok/s, MFU {llama['mfu']:.1%}, {llama['mfu_measured']:.1%} of the measured peak"
        )
    one = next((r for r in decode.get("rows", []) if r["batch"] == 1), None)
    if one:
        extra.append(
            f"decode batch 1: {one['ours']:,.0f} tok/s = {one['ours'] / decode['batch1_bound']:.1%} of the "
            f"bandwidth bound {decode['batch1_bound']:,.0f} tok/s ({decode['param_bytes'] / 1e6:,.0f} MB of "
            f"parameters per token / {decode['hbm_bandwidth'] / 1e12:.1f} TB/s)"
        )
    env = results.get("env") or {}
    if env:
        extra.append(
            "versions: "
            + ", ".join(f"{k} {env.get(k)}" for k in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"))
            + f"; device {env.get('device', {}).get('kind')}"
        )
    lines += ["", *(f"- {e}" for e in extra)]
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {p['status']} | {p['seconds']:.0f} |" for n, p in results["parts"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "gpu-session"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    parser.add_argument("--budget", type=float, help=f"seconds for all parts together ({BUDGET_S}; dry run: more)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="one part's limit")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_SESSION_DRY") == "1")
    parser.add_argument("--gpt2-batch", type=int, default=16)
    parser.add_argument("--llama-batch", type=int, default=8)
    parser.add_argument("--llama-remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument("--env-report", help=argparse.SUPPRESS)  # the env part, in its own process
    args = parser.parse_args()
    if args.env_report:
        env_report(args.env_report)
        return 0
    limits = dict(DRY_LIMITS if args.dry_run else LIMITS)
    args.budget = args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    for item in args.limit:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limit {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[part] = float(seconds)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-session-")
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLAXGPT_BENCH_RESULTS=os.path.join(args.out, "RESULTS_section.md"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # PyTorch's CPU threads spin against each other on a busy machine
        print(
            "dry run: tiny shapes; PyTorch compiled with backend 'eager' (inductor's build is minutes on a CPU); "
            "without CUDA: the PyTorch processes run on the CPU, model.attention=auto takes XLA's einsums (cuDNN's "
            "fused attention needs an NVIDIA GPU), nvidia-smi is not read, and the bandwidth bound is the H200's"
        )
    commands = part_commands(args, work)
    signal.signal(signal.SIGTERM, _stop_running_part)
    results: dict = {"parts": {}, "dry_run": args.dry_run}
    start = time.perf_counter()
    with open(os.path.join(args.out, "session.log"), "a") as log:
        for name in [p for p in PARTS if p in args.parts]:
            part_env = dict(env)
            if name in ("llama", "gpt2_b32"):  # no PyTorch beside it: JAX may reserve the GPU's memory
                part_env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
            left = args.budget - (time.perf_counter() - start)
            if left < 15:
                print(f"===== part {name}: skipped, {left:.0f} s left of the session's {args.budget:.0f} s")
                results["parts"][name] = {"rc": None, "seconds": 0.0, "timed_out": False, "status": "skipped"}
                continue
            results["parts"][name] = run_part(name, commands[name], min(limits[name], left), log, part_env)
            if name == "torch_compile":  # torch_reference.py prints its figures as one line of JSON
                try:
                    results[name] = json.loads(results["parts"][name]["json_line"])
                except ValueError:
                    results[name] = None
            else:
                results[name] = load(os.path.join(work, f"{name}.json"))
            with open(os.path.join(args.out, "results.json"), "w") as f:  # after each part: a kill loses nothing
                json.dump(results, f, indent=1)
    traces = os.path.join(work, "traces")
    if os.path.isdir(traces):
        tgz = os.path.join(args.out, "traces.tgz")
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(traces, arcname="traces")
        if os.path.getsize(tgz) > TRACES_MAX_BYTES:
            print(f"traces.tgz is {os.path.getsize(tgz) >> 20} MiB, over what the device returns: removed")
            os.remove(tgz)
    text = summary(results, args.dry_run)
    print("\n" + text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    sys.path.insert(0, ROOT)
    from benchmarks._results import record

    record(text, os.path.join(args.out, "RESULTS_section.md"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"written to {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    return 0 if all(p["rc"] == 0 for p in results["parts"].values()) else 1  # a skipped part fails too


if __name__ == "__main__":
    sys.exit(main())
