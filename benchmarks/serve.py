"""Serving throughput: requests/s, generated tokens/s, time to first token and latency with 1, 4
and 16 concurrent streaming clients (the `openai` client, one thread each), and the server's
memory over many requests.

    python benchmarks/serve.py [--workdir RUN] [--clients 1,4,16] [--requests 4] [--max-tokens 64]
                               [--memory-requests 1000]

The server is the real one (`flaxgpt.serve`'s app under uvicorn, on a free 127.0.0.1 port) over
its slot engine; without --workdir a randomly initialised run (4 layers, 256 wide, context 256)
is made in a temporary directory (speed does not depend on the weights). Each client sends
--requests chat requests one after another, sampling (temperature 1, its own seed) up to
--max-tokens tokens. Compile time is excluded (one request runs before timing). Prints a table
and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def start_server(service):
    import uvicorn

    from flaxgpt.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def one_request(client, model: str, seed: int, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens) of one streamed chat request."""
    start, first = time.perf_counter(), None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Question: where is the key? Tell me everything you know."}],
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
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - start, tokens


def load(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        for r in range(requests):
            out = one_request(client, model, c * 1000 + r, max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft, latency, tokens = (np.array(x) for x in zip(*results))
    pct = lambda x, q: float(np.percentile(x, q))
    return {
        "requests/s": len(results) / wall,
        "tokens/s": tokens.sum() / wall,
        "ttft p50": pct(ttft, 50),
        "ttft p99": pct(ttft, 99),
        "latency p50": pct(latency, 50),
        "latency p99": pct(latency, 99),
        "tokens/request": tokens.mean(),
    }


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--memory-requests", type=int, default=0, help="then this many short requests, RSS reported")
    args = parser.parse_args()

    import openai

    from flaxgpt import host_allocator
    from flaxgpt.serve.__main__ import build_service

    host_allocator.tune_host_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tiny_run(tmp)
        service = build_service(workdir, db=os.path.join(tmp, "feedback.sqlite"), slots=args.slots, max_queue=256)
        url, server = start_server(service)
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=600, max_retries=0)
        one_request(client, service.name, 0, args.max_tokens)  # compile
        served = workdir if args.workdir else "random 4x256 llama, context 256"
        lines = [
            f"## serve ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, {served}, "
            f"{args.slots} slots, up to {args.max_tokens} tokens per request)",
            "",
            "| clients | requests/s | tokens/s | TTFT p50 / p99 (ms) | latency p50 / p99 (s) | tokens/request |",
            "|---|---|---|---|---|---|",
        ]
        print("\n".join(lines), flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            m = load(client, service.name, clients, args.requests, args.max_tokens)
            lines.append(
                f"| {clients} | {m['requests/s']:.2f} | {m['tokens/s']:.0f} | {m['ttft p50'] * 1e3:.0f} / "
                f"{m['ttft p99'] * 1e3:.0f} | {m['latency p50']:.2f} / {m['latency p99']:.2f} | "
                f"{m['tokens/request']:.0f} |"
            )
            print(lines[-1], flush=True)
        if args.memory_requests:
            before = rss_mib()
            for i in range(args.memory_requests):
                one_request(client, service.name, i, 4)
                if i + 1 == args.memory_requests // 2:
                    middle = rss_mib()
            lines.append(
                f"\nRSS over {args.memory_requests} requests: {before:.0f} MiB before, {middle:.0f} MiB halfway, "
                f"{rss_mib():.0f} MiB after"
            )
            print(lines[-1], flush=True)
        server.should_exit = True
        service.engine.stop()
    record("\n".join(lines))


if __name__ == "__main__":
    main()
