"""Two local processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train
exactly like one process with 8 devices, and save and restore checkpoints together."""

import os
import subprocess
import sys

import numpy as np
import pytest

from flaxgpt.logging import read_metrics
from tests.conftest import REPO, free_port, run_cli

TINY = [
    "model.recipe=llama",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_heads=2",
    "model.d_model=32",
    "model.block_size=32",
    "model.vocab_multiple=8",
    "data.world_documents=400",
    "train.batch_size=16",
    "train.log_interval=1",
    "optimizer.decay_steps=12",
    "eval.interval=6",
    "eval.iters=2",
    "eval.sample_tokens=5",
    "checkpoint.every_steps=3",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "logging.progress=plain",
]
# One process, 8 devices: data=2 inside the one "slice". Two processes: the same logical mesh as a
# hybrid ICI/DCN mesh, whose data axis spans the processes (each process is a granule on CPU).
SINGLE_MESH, HYBRID_MESH = ["mesh.data=2"], ["mesh.data=1", "mesh.dcn_data=2"]


def _two_processes(workdir: str, max_steps: int) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flaxgpt.train",
                "--experiment",
                "world",
                "--workdir",
                workdir,
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--set",
                *TINY,
                *HYBRID_MESH,
                f"train.max_steps={max_steps}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_together(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    one = run_cli(
        "--experiment",
        "world",
        "--workdir",
        single,
        "--set",
        *TINY,
        *SINGLE_MESH,
        "train.max_steps=12",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert one.returncode == 0, one.stderr[-3000:]

    first = _two_processes(multi, 6)
    assert all(r.returncode == 0 for r in first), [r.stderr[-3000:] for r in first]
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in first[0].stdout
    ours = lambda out: [ln for ln in out.splitlines() if ln.startswith(("flaxgpt", "step ", "--- sample"))]
    assert ours(first[0].stdout) and not ours(first[1].stdout)  # only process 0 logs (gloo prints its own)
    second = _two_processes(multi, 12)
    assert all(r.returncode == 0 for r in second), [r.stderr[-3000:] for r in second]
    assert "resumed from step 6" in second[0].stdout

    a, b = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in a] == list(range(1, 13)) == [r["step"] for r in b]
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(
        [r["val_loss"] for r in b if "val_loss" in r], [r["val_loss"] for r in a if "val_loss" in r], rtol=1e-5
    )
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["12", "6", "9"]  # max_to_keep=3
