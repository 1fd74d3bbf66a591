"""Is the input pipeline ever what the train step waits on? Tokens/s of building and placing
host batches versus tokens/s of the jitted train step, at each experiment's real shapes.

    python benchmarks/input_pipeline.py [--shakespeare PATH]

Rows: shakespeare_char (random windows over one text) and a packed JSONL set (the world's
Q/A documents, one per JSONL line, packed with segment ids). Prints a table and appends it
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt.data import world  # noqa: E402
from flaxgpt.data.text import build_text_data  # noqa: E402
from flaxgpt.model import Transformer  # noqa: E402
from flaxgpt.optim import build_optimizer, learning_rate_schedule  # noqa: E402
from flaxgpt.sharding import batch_sharding, local_batch_rows, logical_rules, make_mesh, place_batch  # noqa: E402
from flaxgpt.state import create_train_state  # noqa: E402
from flaxgpt.train import load_experiment  # noqa: E402
from flaxgpt.trainers.step import make_train_step  # noqa: E402


def measure(cfg: C.Config, workdir: str, steps: int = 50) -> dict:
    start = time.perf_counter()
    tokenizer, data = build_text_data(cfg, workdir)
    build_s = time.perf_counter() - start
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or tokenizer.vocab_size).resolved()
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    model, optimizer = Transformer(model_cfg), build_optimizer(cfg.optimizer, cfg.train.max_steps)
    state, shardings = create_train_state(
        model, optimizer, jnp.zeros((1, model_cfg.block_size), jnp.int32), mesh, rules, 0
    )
    sharding, batch, block = batch_sharding(mesh, rules), cfg.train.batch_size, model_cfg.block_size
    rows = local_batch_rows(sharding, batch, block)
    make = lambda step: place_batch(data.batch("train", step, batch, block, rows), rows, sharding, batch)

    start = time.perf_counter()
    placed = [make(step) for step in range(steps)]
    jax.block_until_ready(placed)
    pipeline_s = time.perf_counter() - start

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step_fn = jax.jit(
            make_train_step(model, optimizer, learning_rate_schedule(cfg.optimizer, 1000), cfg.train),
            in_shardings=(shardings, sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        state, _ = step_fn(state, placed[0])  # compile
        jax.block_until_ready(state)
        start = time.perf_counter()
        for b in placed[1:]:
            state, metrics = step_fn(state, b)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / (steps - 1) * steps
    tokens = steps * batch * block
    return {"build_s": build_s, "pipeline_tps": tokens / pipeline_s, "step_tps": tokens / step_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shakespeare", default=os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
    args = parser.parse_args()
    cases = []
    if os.path.exists(args.shakespeare):
        cases.append(
            ("shakespeare_char (windows)", load_experiment("shakespeare_char", [f"data.path={args.shakespeare}"]))
        )
    with tempfile.TemporaryDirectory() as tmp:
        docs = world.corpus(world.make_world(0), 6000).split("\n\n")
        path = os.path.join(tmp, "world.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        cases.append(
            (
                f"packed JSONL ({len(docs)} world docs)",
                load_experiment("world", ["data.source=jsonl", f"data.path={path}", "data.packing=pack"]),
            )
        )
        lines = [
            f"## input_pipeline — {datetime.date.today()} — {platform.machine()}, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}",
            "command: `python benchmarks/input_pipeline.py`",
            "",
            "| data | batch x block | one-time build s | pipeline tokens/s | train step tokens/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for name, cfg in cases:
            r = measure(cfg, tempfile.mkdtemp(dir=tmp))
            lines.append(
                f"| {name} | {cfg.train.batch_size} x {cfg.model.block_size} | {r['build_s']:.2f} | "
                f"{r['pipeline_tps']:,.0f} | {r['step_tps']:,.0f} | {r['pipeline_tps'] / r['step_tps']:.0f}x |"
            )
            print(lines[-1], flush=True)
    record("\n".join(lines))


if __name__ == "__main__":
    main()
