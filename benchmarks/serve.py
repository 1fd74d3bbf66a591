"""Serving throughput against transformers' `generate`, and the server's memory over many requests.

    python benchmarks/serve.py [--workdir RUN] [--clients 1,16] [--requests 32] [--rounds 3]
                               [--max-tokens 48] [--slots 16] [--memory-requests 1000] [--hf-threads 2,1]

The server is the real one (`python -m flaxgpt.serve` in a process of its own, on a free
127.0.0.1 port); its clients are `openai` clients, one thread each, streaming chat completions.
The workload is --requests chat requests asking the run's world questions (as the chat demo's
users would; temperature 1, request i with seed i, up to --max-tokens tokens, ended by the
model's end of turn), dealt to 1, then 16 concurrent clients; transformers' `generate` answers
the same prompts (the same token ids) one at a time, in a process of its own per torch thread
count (benchmarks/hf_generate.py, on the run exported with `flaxgpt.convert`; by default as many
threads as this process has cores, and 1, since torch's OpenMP threads collapse when other jobs
share the cores); the ratio is to the faster of them.
The three alternate within each of --rounds rounds, so that load from other jobs on the machine
falls on all of them; the load average is printed beside the figures. Compilation and warm-up
are excluded (the whole workload runs once before timing). Without --workdir a randomly
initialised run (4 layers, 256 wide, context 256) is made in a temporary directory.

--memory-requests N then sends N more requests through 16 clients and reads the server's RSS
before them and after 100, N/2 and N. Prints the tables and appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import queue
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import record  # noqa: E402


def tiny_run(directory: str) -> str:
    from flaxgpt import config as C
    from flaxgpt.trainers import pretrain

    cfg = C.Config(
        name="serve-bench",
        model=C.ModelConfig(recipe="llama", n_layer=4, n_head=4, d_model=256, block_size=256),
        data=C.DataConfig(source="world", world_documents=200),
        train=C.TrainConfig(batch_size=2, max_steps=1, log_interval=1),
        eval=C.EvalConfig(interval=1, iters=1, sample_tokens=0),
        checkpoint=C.CheckpointConfig(every_steps=1),
        logging=C.LoggingConfig(progress="none"),
    )
    workdir = os.path.join(directory, "run")
    pretrain.run(cfg, workdir)
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str, tmp: str, slots: int) -> tuple[subprocess.Popen, str]:
    """`python -m flaxgpt.serve` on the run, in its own process; (process, base URL) once healthy."""
    port = free_port()
    log = open(os.path.join(tmp, "server.log"), "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "flaxgpt.serve", "--workdir", workdir, "--port", str(port)]
    command += ["--db", os.path.join(tmp, "feedback.sqlite"), "--slots", str(slots), "--max-queue", "256"]
    process = subprocess.Popen(command + ["--reload-every", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n" + open(log.name).read()[-3000:])
        try:
            if health(url)["status"] == "ok":
                return process, url
        except OSError:
            pass
        time.sleep(0.5)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.load(r)


def settled(url: str, seconds: float = 10) -> dict:
    """/health once the engine holds no request (or after `seconds`): rows a finished or
    abandoned request never freed would show here."""
    deadline = time.monotonic() + seconds
    while (state := health(url))["active"] + state["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


def one_request(
    client, model: str, messages: list[dict], seed: int, max_tokens: int, leave: bool = False
) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens) of one streamed chat request; `leave`:
    the client hangs up after the first token (then the tokens are unknown: 0)."""
    start, first = time.perf_counter(), None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
            if leave:
                stream.close()
                break
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or time.perf_counter() - start, time.perf_counter() - start, tokens


def refused_request(client, model: str, messages: list[dict], block_size: int) -> tuple[float, float, int]:
    """A request asking for the whole context, which the server must refuse (400)."""
    import openai

    start = time.perf_counter()
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=block_size, stream=True)
    except openai.BadRequestError:
        return 0.0, time.perf_counter() - start, 0
    raise SystemExit(f"a request for max_tokens={block_size} was not refused")


def serve_load(jobs: list, clients: int) -> dict:
    """`jobs` (functions making one request: `one_request` or `refused_request` with their
    arguments) run by `clients` concurrent clients, each taking the next job when its previous
    answer has streamed in; the figures of `summary`."""
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: list[tuple[float, float, int]] = []

    def worker() -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            results.append(job())

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(results, time.perf_counter() - start)


def summary(results: list[tuple[float, float, int]], wall: float) -> dict:
    ttft, latency, tokens = (np.array(x, dtype=float) for x in zip(*results))
    return {"requests": len(results), "wall": wall, "tokens": tokens.sum(), "ttft": ttft, "latency": latency}


def pooled(rounds: list[dict]) -> dict:
    """The rounds of one configuration as one measurement (tokens/s: all tokens over all walls)."""
    wall, tokens = sum(r["wall"] for r in rounds), sum(r["tokens"] for r in rounds)
    ttft, latency = (np.concatenate([r[k] for r in rounds]) for k in ("ttft", "latency"))
    pct = lambda x, q: float(np.percentile(x, q))
    return {
        "requests/s": sum(r["requests"] for r in rounds) / wall,
        "tokens/s": tokens / wall,
        "ttft": (pct(ttft, 50), pct(ttft, 99)),
        "latency": (pct(latency, 50), pct(latency, 99)),
        "tokens/request": tokens / sum(r["requests"] for r in rounds),
        "per round": [r["tokens"] / r["wall"] for r in rounds],
    }


class HFGenerate:
    """benchmarks/hf_generate.py on the run exported to Hugging Face's format, kept running."""

    def __init__(self, hf_dir: str, threads: int):
        script = os.path.join(ROOT, "benchmarks", "hf_generate.py")
        self.process = subprocess.Popen(
            [sys.executable, script, hf_dir, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"benchmarks/hf_generate.py exited with {self.process.wait()}")
        return json.loads(line)

    def run(self, prompts: list[list[int]], seeds: list[int], max_tokens: int, stop: list[int]) -> dict:
        job = {"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0}
        self.process.stdin.write(json.dumps({**job, "stop": stop}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return summary([tuple(r) for r in answer["requests"]], answer["wall"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def world_chats(workdir: str, n: int, max_tokens: int) -> tuple[list[list[dict]], list[list[int]], list[int]]:
    """n chat requests asking the run's world questions, their prompt ids as the server renders
    them (room left for max_tokens), and the ids that end an answer."""
    from flaxgpt import chat_template, runs
    from flaxgpt.data.world import WorldTask

    cfg, tokenizer = runs.read_run(workdir)
    task = WorldTask.from_config(cfg)
    chats = [task.prompt(q) for q in task.questions("ppo_eval", n)]
    budget = cfg.model.block_size - max_tokens
    prompts = [chat_template.render(m, tokenizer, budget).ids for m in chats]
    return chats, prompts, chat_template.stop_tokens(tokenizer)


def measure(args, client, model: str, hf: dict[str, HFGenerate], workdir: str) -> tuple[dict, list[float]]:
    """Each configuration's rounds (flaxgpt at each client count, then transformers at each
    thread count), alternating."""
    chats, prompts, stop = world_chats(workdir, args.requests, args.max_tokens)
    jobs = [functools.partial(one_request, client, model, m, i, args.max_tokens) for i, m in enumerate(chats)]
    clients = [int(c) for c in args.clients.split(",")]
    hf_run = lambda key: hf[key].run(prompts, list(range(len(prompts))), args.max_tokens, stop)
    serve_load(jobs, max(clients))  # compile every prompt width
    for key in hf:
        hf_run(key)
    rounds: dict = {c: [] for c in clients + list(hf)}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for c in clients:
            rounds[c].append(serve_load(jobs, c))
        for key in hf:
            rounds[key].append(hf_run(key))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k}: {v[-1]['tokens'] / v[-1]['wall']:.0f} tokens/s" for k, v in rounds.items()),
            flush=True,
        )
    loads.append(os.getloadavg()[0])
    return {**{k: pooled(v) for k, v in rounds.items()}, "prompt tokens": np.mean([len(p) for p in prompts])}, loads


def memory(client, model: str, pid: int, workdir: str, n: int, max_tokens: int) -> list[tuple[int, float]]:
    """(requests served, server RSS in MiB) before n more requests through 16 clients and after
    100, n/2 and n of them. Of every 16 requests, one is refused (too long) and two clients hang
    up after the first token, so that the paths that free a request early are counted too."""
    from flaxgpt import runs

    chats, _, _ = world_chats(workdir, 64, max_tokens)
    block_size = runs.read_run(workdir)[0].model.block_size

    def job(i: int):
        messages = chats[i % len(chats)]
        if i % 16 == 15:
            return functools.partial(refused_request, client, model, messages, block_size)
        return functools.partial(one_request, client, model, messages, i, max_tokens, leave=i % 8 == 3)

    marks = sorted({m for m in (100, n // 2, n) if 0 < m <= n})
    points, done = [(0, rss_mib(pid))], 0
    for mark in marks:
        serve_load([job(i) for i in range(done, mark)], 16)
        done = mark
        points.append((done, rss_mib(pid)))
        print(f"RSS after {done} requests: {points[-1][1]:.1f} MiB", flush=True)
    return points


def ratio(a: dict, b: dict) -> str:
    """a's tokens/s over b's, pooled and (the range) round by round."""
    rounds = [x / y for x, y in zip(a["per round"], b["per round"])]
    return f"{a['tokens/s'] / b['tokens/s']:.1f}x (rounds {min(rounds):.1f}-{max(rounds):.1f}x)"


def table(figures: dict, clients: list[int], hf: dict[str, HFGenerate]) -> list[str]:
    """One row per configuration; the ratio is to the fastest transformers configuration."""
    best = max((figures[k]["tokens/s"] for k in hf), default=None)
    lines = [
        "| server | concurrent clients | requests/s | generated tokens/s (per round) | TTFT p50 / p99 (ms) "
        "| latency p50 / p99 (s) | tokens/request | vs transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in clients + list(hf):
        m = figures[key]
        name, count = (f"transformers `generate`, {key}", "1 (no HTTP)") if key in hf else ("flaxgpt.serve", str(key))
        ratio = f"{m['tokens/s'] / best:.2f}x" if best else "-"
        lines.append(
            f"| {name} | {count} | {m['requests/s']:.2f} | {m['tokens/s']:.0f} "
            f"({', '.join(f'{x:.0f}' for x in m['per round'])}) | {m['ttft'][0] * 1e3:.0f} / {m['ttft'][1] * 1e3:.0f} "
            f"| {m['latency'][0]:.2f} / {m['latency'][1]:.2f} | {m['tokens/request']:.1f} | {ratio} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir")
    parser.add_argument("--clients", default="1,16", help="concurrent client counts, each served the workload")
    parser.add_argument("--requests", type=int, default=32, help="requests in the workload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--memory-requests", type=int, default=0, help="then this many requests, server RSS read")
    parser.add_argument(
        "--hf-threads",
        default=str(len(os.sched_getaffinity(0))) + ",1",
        help="torch thread counts, each its own transformers process ('': none; default: this machine's cores, 1)",
    )
    args = parser.parse_args()

    import openai

    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tiny_run(tmp)
        process, url = start_server(workdir, tmp, args.slots)
        hf: dict[str, HFGenerate] = {}
        try:
            if args.hf_threads:
                from flaxgpt import convert

                convert.export_hf(workdir, os.path.join(tmp, "hf"))
                for t in sorted({int(t) for t in args.hf_threads.split(",")}, reverse=True):
                    hf[f"{t} thread{'s' * (t > 1)}"] = HFGenerate(os.path.join(tmp, "hf"), t)
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=600, max_retries=0)
            model = client.models.list().data[0].id
            figures, loads = measure(args, client, model, hf, workdir)
            points = memory(client, model, process.pid, workdir, args.memory_requests, args.max_tokens)
            state = settled(url)
        finally:
            process.terminate()
            process.wait(timeout=60)
            for h in hf.values():
                h.close()
    served = workdir if args.workdir else "random 4x256 llama, context 256"
    lines = [
        f"## serve vs transformers ({datetime.date.today()}, {platform.node()}, {len(os.sched_getaffinity(0))} cores, "
        f"{served}, {args.slots} slots)",
        "",
        f"`python benchmarks/serve.py {shlex.join(sys.argv[1:])}`: {args.requests} streamed chat requests (world "
        f"questions of {figures['prompt tokens']:.0f} prompt tokens on average, temperature 1, up to "
        f"{args.max_tokens} tokens, ended by the model's end of turn) per round, "
        f"{args.rounds} rounds alternating the configurations; load average {min(loads):.1f}-{max(loads):.1f} "
        f"on the shared machine (ratios within a round matter, not the absolute figures)."
        + (f" torch {next(iter(hf.values())).info['torch']}." if hf else ""),
        "",
        *table(figures, clients, hf),
    ]
    if len(clients) > 1:
        lines.append(
            f"\n{clients[-1]} concurrent clients: {ratio(figures[clients[-1]], figures[clients[0]])} the generated "
            f"tokens/s of {clients[0]} at a time."
        )
    if hf:
        fastest = max(hf, key=lambda k: figures[k]["tokens/s"])
        lines.append(
            f"Against transformers one request at a time ({fastest}): flaxgpt.serve with {clients[-1]} clients "
            f"{ratio(figures[clients[-1]], figures[fastest])}, with {clients[0]} "
            f"{ratio(figures[clients[0]], figures[fastest])}."
        )
    if len(points) > 1:
        (_, before), *after = points
        growth = (points[-1][1] - points[1][1]) * 1024 / max(points[-1][0] - points[1][0], 1)
        lines.append(
            f"\nServer RSS over {points[-1][0]} more requests (16 clients): {before:.1f} MiB before, "
            + ", ".join(f"{mib:.1f} MiB after {n}" for n, mib in after)
            + f" ({growth:+.1f} KiB per request after the first {points[1][0]}); of each 16, one refused (too long) "
            f"and two abandoned by their client after the first token. Afterwards the engine holds "
            f"{state['active']} of {state['slots']} slots and {state['waiting']} waiting requests."
        )
    print("\n".join(lines), flush=True)
    record("\n".join(lines))


if __name__ == "__main__":
    main()
