"""Serving throughput against transformers' `generate`, and the server's memory over many requests.

    python benchmarks/serve.py [--workdir RUN] [--clients 1,16] [--requests 32] [--per-client 8]
                               [--rounds 3] [--workload world,fixed] [--max-tokens 48] [--output-tokens 64]
                               [--slots 16] [--memory-requests 1000]
                               [--hf-threads 2,1] [--client-kind threads|asyncio] [--baseline-tree DIR]

The server is the real one (`python -m flaxgpt.serve` in a process of its own, on a free
127.0.0.1 port); its clients are `openai` clients (one thread of `openai.OpenAI` each, or with
--client-kind asyncio one asyncio task each over one `openai.AsyncOpenAI`), streaming chat
completions, in a process of their own (so that the CPU time of server and clients can be told
apart). A round is max(--requests, --per-client x the most clients) chat requests asking the
run's world questions (temperature 1, request i with seed i), so that 16 clients are all busy most
of the round rather than starting up and draining; it is dealt to 1, then 16 concurrent clients.
Each of the --workload workloads is measured in turn: "world" answers as the chat demo's users
see them (up to --max-tokens tokens, ended by the model's end of turn: a few tokens, so requests/s
more than decoding is measured), "fixed" answers exactly --output-tokens long (vLLM's
`ignore_eos`, as serving benchmarks fix prompt and output lengths to compare decode throughput);
transformers' `generate` answers the same prompts (the same token ids) one at a time, in a
process of its own per torch thread count (benchmarks/hf_generate.py, on the run exported with
`flaxgpt.convert`; by default as many threads as this process has cores, and 1, since torch's
OpenMP threads collapse when other jobs share the cores); the ratio is to the faster of them.
--baseline-tree DIR also serves the run from another source tree (a before/after on one
machine). The configurations alternate within each of --rounds rounds, so that load from other
jobs on the machine falls on all of them; the load average is printed beside the figures.
Beside the tokens/s, the CPU milliseconds per request of the server's main thread (uvicorn's
event loop: HTTP, JSON, SSE), of its other threads (the engine's loop and XLA's compute threads)
and of the client process, and the engine's decode steps per request and rows per step (from
/health). Compilation and warm-up are excluded (the whole workload runs before timing, until
two runs in a row compile no new program shape, at most 8 times). Without --workdir a randomly initialised
run (4 layers, 256 wide, context 256) is made in a temporary directory.

--memory-requests N then sends N more requests through 16 clients and reads the server's RSS
before them and after 100, N/2, N and every 1,000 (with the engine's compiled programs: a new
one is a step in RSS). Prints the tables and appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import queue
import resource
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


def start_server(workdir: str, tmp: str, slots: int, root: str = ROOT) -> tuple[subprocess.Popen, str]:
    """`python -m flaxgpt.serve` (from the source tree `root`) on the run, in its own process;
    (process, base URL) once healthy."""
    port = free_port()
    tmp = tempfile.mkdtemp(dir=tmp)
    log = open(os.path.join(tmp, "server.log"), "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "flaxgpt.serve", "--workdir", workdir, "--port", str(port)]
    command += ["--db", os.path.join(tmp, "feedback.sqlite"), "--slots", str(slots), "--max-queue", "256"]
    process = subprocess.Popen(
        command + ["--reload-every", "0"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root
    )
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


class Seen:
    """What one streamed chat request saw: time to first token, latency, generated tokens."""

    def __init__(self, leave: bool):
        self.start, self.first, self.tokens, self.leave = time.perf_counter(), None, 0, leave

    def chunk(self, chunk) -> bool:
        """Take a chunk; True when the client hangs up now (`leave`: after the first token)."""
        if chunk.choices and chunk.choices[0].delta.content and self.first is None:
            self.first = time.perf_counter() - self.start
            if self.leave:
                return True
        if chunk.usage:
            self.tokens = chunk.usage.completion_tokens
        return False

    def result(self) -> tuple[float, float, int]:
        latency = time.perf_counter() - self.start
        return self.first or latency, latency, self.tokens


def chat_args(model: str, messages: list[dict], seed: int, max_tokens: int, ignore_eos: bool = False) -> dict:
    """A streamed chat request; `ignore_eos` (vLLM's parameter): exactly max_tokens tokens."""
    return dict(
        model=model,
        messages=messages,
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if ignore_eos else None,
    )


def one_request(client, model: str, *args, leave: bool = False) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens) of one streamed chat request (`chat_args`);
    `leave`: the client hangs up after the first token (then the tokens are unknown: 0)."""
    seen = Seen(leave)
    stream = client.chat.completions.create(**chat_args(model, *args))
    for chunk in stream:
        if seen.chunk(chunk):
            stream.close()
            break
    return seen.result()


async def one_request_async(client, model: str, *args, leave: bool = False) -> tuple[float, float, int]:
    """`one_request` through `openai.AsyncOpenAI`."""
    seen = Seen(leave)
    stream = await client.chat.completions.create(**chat_args(model, *args))
    async for chunk in stream:
        if seen.chunk(chunk):
            await stream.close()
            break
    return seen.result()


def refused_request(client, model: str, messages: list[dict], max_tokens: int, *_) -> tuple[float, float, int]:
    """A request asking for `max_tokens` (the whole context), which the server must refuse (400)."""
    import openai

    start = time.perf_counter()
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)
    except openai.BadRequestError:
        return 0.0, time.perf_counter() - start, 0
    raise SystemExit(f"a request for max_tokens={max_tokens} was not refused")


def drive(url: str, kind: str) -> None:
    """The client process (`--drive URL`): each stdin line a JSON job {"clients": C, "requests":
    [[kind ("ask" | "leave" | "refuse"), messages, seed, max_tokens, ignore_eos]...]}, answered on stdout by
    {"requests": [[time to first token, latency, tokens]...], "wall": s, "cpu": this process's CPU s}.
    `kind`: the clients are threads of `openai.OpenAI`, or asyncio tasks of one `openai.AsyncOpenAI`
    (refusals then go through the former, in a thread)."""
    import asyncio

    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=600, max_retries=0)
    model = client.models.list().data[0].id
    ask, loop = functools.partial(one_request, client, model), asyncio.new_event_loop()  # one loop: its connections
    if kind == "asyncio":
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", timeout=600, max_retries=0)
        ask = functools.partial(one_request_async, aclient, model)
    kinds = {
        "ask": ask,
        "leave": functools.partial(ask, leave=True),
        "refuse": functools.partial(refused_request, client, model),
    }
    print(json.dumps({"model": model}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        jobs = [functools.partial(kinds[kind], *args) for kind, *args in job["requests"]]
        cpu = process_cpu()
        load = serve_load if kind == "threads" else lambda jobs, n: loop.run_until_complete(serve_load_async(jobs, n))
        results, wall = load(jobs, job["clients"])
        print(json.dumps({"requests": results, "wall": wall, "cpu": process_cpu() - cpu}), flush=True)


async def serve_load_async(jobs: list, clients: int) -> tuple[list[tuple[float, float, int]], float]:
    """`serve_load` with `clients` asyncio tasks (a job that is no coroutine runs in a thread)."""
    import asyncio
    import inspect

    todo, results = jobs[::-1], []

    async def worker() -> None:
        while todo:
            job = todo.pop()
            results.append(await job() if inspect.iscoroutinefunction(job.func) else await asyncio.to_thread(job))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - start


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve_load(jobs: list, clients: int) -> tuple[list[tuple[float, float, int]], float]:
    """`jobs` (functions making one request) run by `clients` concurrent threads, each taking the
    next job when its previous answer has streamed in; (their results, wall seconds)."""
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
    return results, time.perf_counter() - start


def summary(results: list, wall: float) -> dict:
    ttft, latency, tokens = (np.array(x, dtype=float) for x in zip(*results))
    return {"requests": len(results), "wall": wall, "tokens": tokens.sum(), "ttft": ttft, "latency": latency}


CPU = ("server loop", "server engine", "client")  # CPU seconds of a round, summed by `pooled`
WORK = ("steps", "step_rows")  # the engine's decode steps in a round and the rows they advanced


def pooled(rounds: list[dict]) -> dict:
    """The rounds of one configuration as one measurement (tokens/s: all tokens over all walls)."""
    wall, tokens = sum(r["wall"] for r in rounds), sum(r["tokens"] for r in rounds)
    requests = sum(r["requests"] for r in rounds)
    ttft, latency = (np.concatenate([r[k] for r in rounds]) for k in ("ttft", "latency"))
    pct = lambda x, q: float(np.percentile(x, q))
    total = lambda k: sum(r[k] for r in rounds) if all(k in r for r in rounds) else None
    return {
        "requests/s": requests / wall,
        "tokens/s": tokens / wall,
        "ttft": (pct(ttft, 50), pct(ttft, 99)),
        "latency": (pct(latency, 50), pct(latency, 99)),
        "tokens/request": tokens / requests,
        "per round": [r["tokens"] / r["wall"] for r in rounds],
        "requests": requests,
        **{k: total(k) for k in CPU + WORK},
    }


class LineProcess:
    """A helper process kept running between rounds: a JSON job per line on its stdin, a JSON
    answer per line on its stdout (and one line when it is ready)."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{shlex.join(self.process.args)} exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


class HFGenerate(LineProcess):
    """benchmarks/hf_generate.py on the run exported to Hugging Face's format."""

    def __init__(self, hf_dir: str, threads: int):
        super().__init__(
            [sys.executable, os.path.join(ROOT, "benchmarks", "hf_generate.py"), hf_dir, "--threads", str(threads)]
        )

    def run(self, prompts: list[list[int]], seeds: list[int], max_tokens: int, stop: list[int], fixed: bool) -> dict:
        """`fixed`: every answer max_tokens long (transformers' min_new_tokens), as with ignore_eos."""
        job = {"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0}
        answer = self.ask({**job, "stop": stop, "min_tokens": max_tokens if fixed else 0})
        return summary([tuple(r) for r in answer["requests"]], answer["wall"])


class Clients(LineProcess):
    """The `openai` clients, in a process of their own (`drive`), against the server at `url`
    (process `pid`); `run` measures one round, with the CPU time of server and clients."""

    def __init__(self, url: str, pid: int, kind: str = "threads"):
        super().__init__([sys.executable, os.path.abspath(__file__), "--drive", url, "--client-kind", kind])
        self.url, self.server_pid, self.model = url, pid, self.info["model"]

    def run(self, requests: list[list], clients: int) -> dict:
        (loop, engine), work = server_cpu(self.server_pid), health(self.url)
        answer = self.ask({"clients": clients, "requests": requests})
        (loop_after, engine_after), work_after = server_cpu(self.server_pid), health(self.url)
        figures = summary([tuple(r) for r in answer["requests"]], answer["wall"])
        cpu = dict(zip(CPU, (loop_after - loop, engine_after - engine, answer["cpu"])))
        return {**figures, **cpu, **{k: work_after[k] - work[k] for k in WORK}}


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the server's main thread (uvicorn's event loop) and of its other
    threads together (the engine's loop, XLA's compute threads)."""
    main = others = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if tid == str(pid):
            main += seconds
        else:
            others += seconds
    return main, others


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


def round_size(args) -> int:
    """Requests per round: enough that the most concurrent clients are all busy most of it."""
    return max(args.requests, args.per_client * max(int(c) for c in args.clients.split(",")))


def measure(args, servers: dict, hf: dict[str, HFGenerate], workdir: str, workload: str) -> tuple[dict, list[float]]:
    """Each configuration's rounds (each server's Clients at each client count, then transformers
    at each thread count), alternating. `workload`: "world" (answers end at the model's end of turn,
    at most --max-tokens) or "fixed" (every answer --output-tokens long: vLLM's ignore_eos)."""
    counts = [int(c) for c in args.clients.split(",")]
    fixed = workload == "fixed"
    tokens = args.output_tokens if fixed else args.max_tokens
    chats, prompts, stop = world_chats(workdir, round_size(args), tokens)
    work = [["ask", m, i, tokens, fixed] for i, m in enumerate(chats)]
    hf_run = lambda key: hf[key].run(prompts, list(range(len(prompts))), tokens, stop, fixed)
    for clients, c in itertools.product(servers.values(), sorted(counts, reverse=True)):
        calm = 0
        for _ in range(8):  # compile the shapes the workload meets: until two rounds in a row add none
            shapes = health(clients.url).get("programs")
            clients.run(work, c)
            calm = calm + 1 if health(clients.url).get("programs", -1) == shapes else 0
            if calm == 2:
                break
    for key in hf:
        hf_run(key)
    runs = {(name, c): clients for name, clients in servers.items() for c in counts}
    rounds: dict = {k: [] for k in list(runs) + list(hf)}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for (name, c), clients in runs.items():
            rounds[name, c].append(clients.run(work, c))
        for key in hf:
            rounds[key].append(hf_run(key))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k}: {v[-1]['tokens'] / v[-1]['wall']:.0f} tokens/s" for k, v in rounds.items()),
            flush=True,
        )
    loads.append(os.getloadavg()[0])
    return {**{k: pooled(v) for k, v in rounds.items()}, "prompt tokens": np.mean([len(p) for p in prompts])}, loads


def memory(clients: Clients, workdir: str, n: int, max_tokens: int) -> list[tuple[int, float, int]]:
    """(requests served, server RSS in MiB, engine programs compiled) before n more requests
    through 16 clients and after 100, n/2, n and every 1,000 of them. Of every 16 requests, one is
    refused (too long) and two clients hang up after the first token, so that the paths that free
    a request early are counted too."""
    from flaxgpt import runs

    chats, _, _ = world_chats(workdir, 64, max_tokens)
    block_size = runs.read_run(workdir)[0].model.block_size

    def job(i: int) -> list:
        kind = "refuse" if i % 16 == 15 else "leave" if i % 8 == 3 else "ask"
        return [kind, chats[i % len(chats)], i, block_size if kind == "refuse" else max_tokens, False]

    marks = sorted({m for m in (100, n // 2, n, *range(1000, n, 1000)) if 0 < m <= n})
    point = lambda: (done, rss_mib(clients.server_pid), health(clients.url)["programs"])
    done = 0
    points = [point()]
    for mark in marks:
        clients.run([job(i) for i in range(done, mark)], 16)
        done = mark
        points.append(point())
        print(f"RSS after {done} requests: {points[-1][1]:.1f} MiB ({points[-1][2]} engine programs)", flush=True)
    return points


def ratio(a: dict, b: dict) -> str:
    """a's tokens/s over b's, pooled and (the range) round by round."""
    rounds = [x / y for x, y in zip(a["per round"], b["per round"])]
    return f"{a['tokens/s'] / b['tokens/s']:.1f}x (rounds {min(rounds):.1f}-{max(rounds):.1f}x)"


def runs_of(figures: dict) -> list[tuple[str, int]]:
    """The (server, concurrent clients) configurations among the figures."""
    return [k for k in figures if isinstance(k, tuple)]


def table(figures: dict, hf: dict[str, HFGenerate]) -> list[str]:
    """One row per configuration; the ratio is to the fastest transformers configuration."""
    best = max((figures[k]["tokens/s"] for k in hf), default=None)
    lines = [
        "| server | concurrent clients | requests/s | generated tokens/s (per round) | TTFT p50 / p99 (ms) "
        "| latency p50 / p99 (s) | tokens/request | CPU ms/request: server loop / engine+XLA / client "
        "| CPU µs/token: the same | decode steps/request (rows/step) | vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in runs_of(figures) + list(hf):
        m = figures[key]
        name, count = (f"transformers `generate`, {key}", "1 (no HTTP)") if key in hf else map(str, key)
        ratio = f"{m['tokens/s'] / best:.2f}x" if best else "-"
        cpu = " / ".join(f"{m[k] * 1e3 / m['requests']:.1f}" for k in CPU) if m["client"] is not None else "-"
        tokens = m["tokens/s"] / m["requests/s"] * m["requests"]
        per_token = " / ".join(f"{m[k] * 1e6 / tokens:.0f}" for k in CPU) if m["client"] is not None else "-"
        steps = f"{m['steps'] / m['requests']:.2f} ({m['step_rows'] / max(m['steps'], 1):.1f})" if m["steps"] else "-"
        lines.append(
            f"| {name} | {count} | {m['requests/s']:.2f} | {m['tokens/s']:.0f} "
            f"({', '.join(f'{x:.0f}' for x in m['per round'])}) | {m['ttft'][0] * 1e3:.0f} / {m['ttft'][1] * 1e3:.0f} "
            f"| {m['latency'][0]:.2f} / {m['latency'][1]:.2f} | {m['tokens/request']:.1f} | {cpu} | {per_token} "
            f"| {steps} | {ratio} |"
        )
    return lines


WORKLOADS = {
    "world": "answers ended by the model's end of turn (at most {max_tokens} tokens): the chat demo's users",
    "fixed": "every answer exactly {output_tokens} tokens (vLLM's `ignore_eos`; transformers' `min_new_tokens`): "
    "decode throughput, as serving benchmarks compare it",
}


def workload_report(args, workload: str, figures: dict, loads: list[float], hf: dict) -> list[str]:
    """The table of one workload, and its ratios: 16 clients to 1, and to transformers."""
    clients = [int(c) for c in args.clients.split(",")]
    lines = [
        f"\n**Workload {workload}**: {WORKLOADS[workload].format(**vars(args))}; "
        f"{figures['prompt tokens']:.0f} prompt tokens on average; load average {min(loads):.1f}-{max(loads):.1f} "
        "on the shared machine (ratios within a round matter, not the absolute figures).",
        "",
        *table(figures, hf),
    ]
    ours = {c: figures["flaxgpt.serve", c] for c in clients}
    if len(clients) > 1:
        for name in {name for name, _ in runs_of(figures)}:
            many, one = figures[name, clients[-1]], figures[name, clients[0]]
            lines.append(
                f"\n{workload} workload, {name}: {clients[-1]} concurrent clients {ratio(many, one)} the generated "
                f"tokens/s of {clients[0]} at a time."
            )
    if hf:
        fastest = max(hf, key=lambda k: figures[k]["tokens/s"])
        lines.append(
            f"{workload} workload against transformers one request at a time ({fastest}): flaxgpt.serve with "
            f"{clients[-1]} clients {ratio(ours[clients[-1]], figures[fastest])}, with {clients[0]} "
            f"{ratio(ours[clients[0]], figures[fastest])}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir")
    parser.add_argument("--clients", default="1,16", help="concurrent client counts, each served the workload")
    parser.add_argument("--requests", type=int, default=32, help="requests per round, at least")
    parser.add_argument(
        "--per-client", type=int, default=8, help="requests per round per client of the most concurrent, at least"
    )
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)  # the client process (see `drive`)
    parser.add_argument(
        "--client-kind",
        choices=("asyncio", "threads"),
        default="threads",
        help="the concurrent clients: asyncio tasks of openai.AsyncOpenAI, or threads of openai.OpenAI",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-tree",
        help="also serve the run from this source tree (e.g. a `git worktree` of an older commit), in the same rounds",
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="the world workload's answer limit")
    parser.add_argument(
        "--workload", default="world,fixed", help="workloads measured, in turn: world, fixed (see WORKLOADS)"
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="the fixed workload's answer length")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--memory-requests", type=int, default=0, help="then this many requests, server RSS read")
    parser.add_argument(
        "--hf-threads",
        default=str(len(os.sched_getaffinity(0))) + ",1",
        help="torch thread counts, each its own transformers process ('': none; default: this machine's cores, 1)",
    )
    args = parser.parse_args()
    if args.drive:
        return drive(args.drive, args.client_kind)
    unknown = set(args.workload.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workload: unknown {', '.join(sorted(unknown))} (known: {', '.join(WORKLOADS)})")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tiny_run(tmp)
        process, url = start_server(workdir, tmp, args.slots)
        baseline = start_server(workdir, tmp, args.slots, args.baseline_tree) if args.baseline_tree else None
        hf: dict[str, HFGenerate] = {}
        try:
            if args.hf_threads:
                from flaxgpt import convert

                convert.export_hf(workdir, os.path.join(tmp, "hf"))
                for t in sorted({int(t) for t in args.hf_threads.split(",")}, reverse=True):
                    hf[f"{t} thread{'s' * (t > 1)}"] = HFGenerate(os.path.join(tmp, "hf"), t)
            drivers = Clients(url, process.pid, args.client_kind)
            servers = {"flaxgpt.serve": drivers}
            if baseline:
                servers[f"flaxgpt.serve from {args.baseline_tree}"] = Clients(
                    baseline[1], baseline[0].pid, args.client_kind
                )
            measured = {w: measure(args, servers, hf, workdir, w) for w in args.workload.split(",")}
            points = memory(drivers, workdir, args.memory_requests, args.max_tokens)
            drivers.close()
            state = settled(url)
        finally:
            for p in [process] + ([baseline[0]] if baseline else []):
                p.terminate()
                p.wait(timeout=60)
            for h in hf.values():
                h.close()
    served = workdir if args.workdir else "random 4x256 llama, context 256"
    lines = [
        f"## serve vs transformers ({datetime.date.today()}, {platform.node()}, {len(os.sched_getaffinity(0))} cores, "
        f"{served}, {args.slots} slots)",
        "",
        f"`python benchmarks/serve.py {shlex.join(sys.argv[1:])}`: streamed chat requests asking the run's world "
        f"questions (temperature 1), {round_size(args)} per round to each configuration, {args.rounds} "
        f"rounds alternating the configurations, per workload (below)."
        + (f" torch {next(iter(hf.values())).info['torch']}." if hf else "")
        + " CPU ms/request: the server's main thread (uvicorn's event loop: HTTP, JSON, SSE), its other threads "
        "(the engine's loop and XLA's compute threads), and the process of the `openai` clients "
        + (
            "(threads of `openai.OpenAI`)."
            if args.client_kind == "threads"
            else "(asyncio tasks, `openai.AsyncOpenAI`)."
        ),
    ]
    for workload, (figures, loads) in measured.items():
        lines += workload_report(args, workload, figures, loads, hf)
    if len(points) > 1:
        (_, before, shapes), *after = points
        growth = (points[-1][1] - points[1][1]) * 1024 / max(points[-1][0] - points[1][0], 1)
        lines.append(
            f"\nServer RSS over {points[-1][0]} more requests (16 clients): {before:.1f} MiB before, "
            + ", ".join(f"{mib:.1f} MiB after {n}" for n, mib, _ in after)
            + f" ({growth:+.1f} KiB per request after the first {points[1][0]}); engine programs compiled: "
            f"{shapes} before, " + ", ".join(str(s) for _, _, s in after) + " after (a new prefill or step "
            "shape compiles a program: a step in RSS); of each 16, one refused (too long) "
            f"and two abandoned by their client after the first token. Afterwards the engine holds "
            f"{state['active']} of {state['slots']} slots and {state['waiting']} waiting requests."
        )
    print("\n".join(lines), flush=True)
    record("\n".join(lines))


if __name__ == "__main__":
    main()
