"""Shared helpers: tiny models and configs so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys

# JAX computes on the CPU in every test process (and its subprocesses), also where libtpu is
# installed for the ahead-of-time TPU compile tests: that only compiles for topologies
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax
import jax.numpy as jnp
import pytest

from flaxgpt import config as C
from flaxgpt import host_allocator
from flaxgpt.model import Transformer

# The in-process trainers run like the CLIs do: with XLA:CPU's per-step buffers reused rather
# than faulted in anew each step (about a third of a small CPU step otherwise).
host_allocator.tune_host_allocator()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))


def tiny_model_config(recipe: str = "gpt2", **overrides) -> C.ModelConfig:
    base = dict(recipe=recipe, vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32)
    base.update(overrides)
    return C.ModelConfig(**base).resolved()


def init_params(cfg: C.ModelConfig, seed: int = 0, batch: int = 2):
    model = Transformer(cfg)
    tokens = jnp.zeros((batch, cfg.block_size), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])
    return model, params


def tiny_run_config(**sections) -> C.Config:
    """A world-corpus pretraining config that trains in seconds."""
    cfg = C.Config(
        name="tiny",
        model=C.ModelConfig(recipe="gpt2", n_layer=2, n_head=2, d_model=32, block_size=32),
        data=C.DataConfig(source="world", world_documents=400),
        optimizer=C.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=5),
        train=C.TrainConfig(batch_size=8, max_steps=30, log_interval=1),
        eval=C.EvalConfig(interval=10, iters=2, sample_tokens=10, sample_prompt="Question:"),
        checkpoint=C.CheckpointConfig(every_steps=10, max_to_keep=5),
        logging=C.LoggingConfig(progress="none", report=False),
    )
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m flaxgpt.train ARGS` in a fresh interpreter (fresh XLA flags)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flaxgpt.train", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def shakespeare_path() -> str:
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"tiny shakespeare not found at {SHAKESPEARE} (it lives in ../shared/data beside the repo)")
    return SHAKESPEARE
