"""transformers' `generate`, one request at a time: the way a quick Hugging Face server serves a
model, the reference that `benchmarks/serve.py` measures flaxgpt's server against.

    python benchmarks/hf_generate.py HF_DIR [--threads N]

A process of its own (torch and XLA would otherwise share one process's threads and allocator),
kept alive between rounds so that the benchmark can interleave its repetitions with flaxgpt's:
each line on stdin is a JSON job {"prompts": [[ids]...], "seeds": [...], "max_tokens": N,
"temperature": T, "top_p": P, "stop": [ids], "min_tokens": N}; each job's answer is one JSON line on stdout,
{"requests": [[time to first token, latency, generated tokens], ...], "wall": seconds}. Prompts
are token ids rendered by flaxgpt's tokenizer, so both sides decode exactly the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class FirstToken(BaseStreamer):
    """Notes when `generate` hands over its first generated token (its first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def one_request(model, prompt: list[int], seed: int, job: dict) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens not counting a stop token) of one request."""
    start = time.perf_counter()
    ids = torch.tensor([prompt])
    streamer = FirstToken()
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=job["temperature"],
            top_p=job["top_p"],
            top_k=0,
            max_new_tokens=job["max_tokens"],
            min_new_tokens=job.get("min_tokens", 0),
            eos_token_id=job["stop"],
            pad_token_id=job["stop"][0],
            streamer=streamer,
        )
    latency = time.perf_counter() - start
    new = out[0, len(prompt) :].tolist()
    tokens = len(new) - (1 if new and new[-1] in job["stop"] else 0)
    return (streamer.first or start) - start, latency, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    info = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        requests = [one_request(model, p, s, job) for p, s in zip(job["prompts"], job["seeds"])]
        print(json.dumps({"requests": requests, "wall": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
