"""Shared helpers: tiny models and configs so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

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


def _share_compiled_programs() -> None:
    """One persistent JAX compilation cache for the whole run: the xdist workers and the
    interpreters tests start (a CLI run again to resume, both processes of a two-process run)
    load a program that another process already compiled instead of compiling it again. A fresh
    directory per run, removed when the process that made it exits; workers and subprocesses
    inherit it through the environment (JAX reads it on import), so no run reads programs left
    by another. No size limit: with one, JAX reads every entry's access time at each write, a
    cost that grows with the cache (thousands of entries by the end of the suite). An entry read
    while another process writes it fails to decompress, and JAX then compiles the program."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the xdist controller's, or the user's own
        return
    settings = {
        "jax_compilation_cache_dir": tempfile.mkdtemp(prefix="flaxgpt-tests-jax-cache-"),
        "jax_persistent_cache_min_compile_time_secs": 0,  # tiny models compile in under a second
    }
    atexit.register(shutil.rmtree, settings["jax_compilation_cache_dir"], ignore_errors=True)
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)  # this process imported JAX before the environment had it


_share_compiled_programs()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))


class FileProgress:
    """One line per test file as its last test finishes (`tests/test_x.py: 12 passed (34 s)`: the
    seconds its tests took), so a run on xdist workers is not minutes of bare dots."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.expected: Counter = Counter()  # tests per file
        self.outcomes: dict[str, Counter] = {}
        self.seconds: Counter = Counter()
        self.worst: dict[str, str] = {}  # test -> its outcome so far

    def count(self, nodeids) -> None:
        if not self.expected:  # every xdist worker collects the same tests
            self.expected.update(n.split("::")[0] for n in nodeids)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.count(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self.count(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid.split("::")[0]] += report.duration
        now = "failed" if report.failed else "skipped" if report.skipped else "passed"
        if self.worst.get(report.nodeid, "passed") == "passed":
            self.worst[report.nodeid] = now

    @pytest.hookimpl(trylast=True)  # after the reporter's own dots and percentage
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        file = nodeid.split("::")[0]
        self.outcomes.setdefault(file, Counter())[self.worst.pop(nodeid, "passed")] += 1
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")  # registered after conftest
        if reporter is not None and sum(self.outcomes[file].values()) == self.expected[file]:
            counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes[file].items()))
            if reporter._tw.width_of_current_line:  # after the workers' dots
                reporter.write("\n")
            reporter.write_line(f"{file}: {counts} ({self.seconds[file]:.0f} s)")


def pytest_configure(config: pytest.Config) -> None:
    """Per-file lines where xdist runs the files (its dots name none); `-n 0` names each file itself."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):  # the controller
        config.pluginmanager.register(FileProgress(config), "flaxgpt-file-progress")


# The files that take half a minute or more, longest first. `--dist loadfile` hands whole files to the
# two workers in collection order, so these start first and the quick files fill in at the end:
# the workers then finish within seconds of each other (xdist's own order, most tests first, left a
# long file last). A name missing here only costs balance, never a test.
LONGEST_FIRST = (
    "test_end_to_end.py",
    "test_hf.py",
    "test_ppo.py",
    "test_pipeline.py",
    "test_stream_pref.py",
    "test_preemption.py",
    "test_generate.py",
    "test_serve.py",
    "test_preference_trainers.py",
    "test_model.py",
    "test_lora_checkpoint.py",
    "test_multihost.py",
    "test_online.py",
    "test_sharding.py",
    "test_checkpoint_resume.py",
    "test_stream_rows.py",
    "test_train_step.py",
    "test_sft_reward.py",
    "test_optim_losses.py",
    "test_stream.py",
    "test_jsonl_packing.py",
    "test_gpu_session.py",
    "test_hf_families.py",
    "test_console.py",
    "test_chat.py",
    "test_grpo_update.py",
    "test_compile.py",
    "test_grpo_speed.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first (a stable sort: tests keep their order inside each file)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


def free_port() -> int:
    """A localhost port free now (for jax.distributed coordinators and servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(service, timeout: float = 30):
    """The app over `service` on a free localhost port (uvicorn in a thread); yields its URL and
    stops the server and the service's engine on exit."""
    import uvicorn

    from flaxgpt.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    try:
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.engine.stop()
