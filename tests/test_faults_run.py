"""Files a run writes survive faults: a damaged checkpoint, a full disk, a second process on
the workdir, a damaged metrics file, a write that fails half-way."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from flaxgpt import fileio
from flaxgpt.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    CheckpointUnreadable,
    CheckpointWriteError,
)
from flaxgpt.config import CheckpointConfig, LoggingConfig, ModelConfig
from flaxgpt.errors import UserError
from flaxgpt.logging import MetricsLogger, read_metrics
from flaxgpt.workdir import WorkdirBusy, WorkdirLock
from tests.conftest import REPO, free_port

STEPS = (100, 200, 300, 400)


def state_at(step: int, side: int = 4) -> dict:
    return {"params": {"w": jnp.full((side, side), float(step))}, "step": jnp.array(step)}


ABSTRACT = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state_at(0))


def checkpointer(workdir, **cfg) -> Checkpointer:
    return Checkpointer(str(workdir), CheckpointConfig(**{"every_steps": 1, "max_to_keep": 5, **cfg}))


def save_steps(workdir, steps=STEPS, model: dict | None = None) -> str:
    """Checkpoints at `steps` (async saves, as a run makes them); returns the checkpoints dir."""
    c = checkpointer(workdir)
    for step in steps:
        c.save(step, state_at(step), {"step": step, "model": model or {}})
    c.close()
    return c.directory


def _truncate_data(step_dir: str) -> None:
    for path in glob.glob(os.path.join(step_dir, "state", "d", "*")):
        os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "empty directory": lambda d: (shutil.rmtree(d), os.mkdir(d)),
    "manifest removed": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "metadata removed": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "record removed": lambda d: os.remove(os.path.join(d, "record", "metadata")),
    "data file truncated": _truncate_data,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    directory = save_steps(tmp_path)
    DAMAGE[damage](os.path.join(directory, "400"))
    logged: list[str] = []
    c = checkpointer(tmp_path)
    state, record, step = c.restore_latest(ABSTRACT, ModelConfig(), logged.append)
    assert (step, record["step"], float(state["params"]["w"][0, 0])) == (300, 300, 300.0)
    assert len(logged) == 1 and logged[0].startswith("checkpoint 400 unreadable ("), logged
    assert "; using 300 (400 moved to " in logged[0] and "\n" not in logged[0]
    if damage == "empty directory":
        assert "(empty directory)" in logged[0]
    # set aside, so the resumed run writes step 400 again and it is the latest
    assert sorted(os.listdir(directory)) == ["100", "200", "300"]
    assert os.listdir(tmp_path / "checkpoints-unreadable") == ["400"]
    assert c.save(400, state_at(401), {"step": 400, "model": {}})
    c.close()
    logged.clear()
    state, _, step = checkpointer(tmp_path).restore_latest(ABSTRACT, ModelConfig(), logged.append)
    assert (step, float(state["params"]["w"][0, 0]), logged) == (400, 401.0, [])


def test_reading_params_of_an_unreadable_checkpoint_is_one_line_naming_the_others(tmp_path):
    directory = save_steps(tmp_path, STEPS[:2])
    DAMAGE["record removed"](os.path.join(directory, "200"))
    c = checkpointer(tmp_path)
    with pytest.raises(CheckpointUnreadable) as error:
        c.restore_params(200, ABSTRACT["params"], ModelConfig())
    assert str(error.value) == (
        f"checkpoint 200 in {directory} cannot be read (File record/metadata not found.); "
        "its other checkpoints are at steps [100]"
    )
    assert float(c.restore_params(100, ABSTRACT["params"], ModelConfig())["w"][0, 0]) == 100.0


def test_half_written_save_is_ignored_and_removed(tmp_path):
    directory = save_steps(tmp_path)
    os.rename(os.path.join(directory, "400"), os.path.join(directory, "400.orbax-checkpoint-tmp"))
    logged: list[str] = []
    c = checkpointer(tmp_path)
    _, _, step = c.restore_latest(ABSTRACT, ModelConfig(), logged.append)
    assert (step, logged) == (300, [])
    assert c.save(400, state_at(400), {"step": 400, "model": {}})  # orbax removes the tmp dir first
    c.close()
    assert sorted(os.listdir(directory)) == ["100", "200", "300", "400"]


def test_no_checkpoint_restores_none_and_all_unreadable_is_one_line(tmp_path):
    assert checkpointer(tmp_path).restore_latest(ABSTRACT, ModelConfig(), print) is None
    directory = save_steps(tmp_path, STEPS[:2])
    for step in STEPS[:2]:
        DAMAGE["metadata removed"](os.path.join(directory, str(step)))
    with pytest.raises(CheckpointUnreadable) as error:
        checkpointer(tmp_path).restore_latest(ABSTRACT, ModelConfig(), print)
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message
    assert message.startswith(f"no checkpoint in {directory} can be restored: 200: ") and "; 100: " in message
    assert sorted(os.listdir(directory)) == ["100", "200"]  # nothing moved: nothing restored


def test_model_mismatch_is_raised_not_skipped(tmp_path):
    save_steps(tmp_path, (100,), model={"n_layer": 2})
    save_steps(tmp_path, (200,), model={"n_layer": 3})
    with pytest.raises(CheckpointMismatch, match="model.n_layer: checkpoint has 3, config has 2"):
        checkpointer(tmp_path).restore_latest(ABSTRACT, ModelConfig(n_layer=2), print)


def test_max_to_keep_zero_keeps_the_checkpoint_just_written(tmp_path):
    directory = save_steps(tmp_path, (10, 20))
    c = checkpointer(tmp_path, max_to_keep=0)
    c.save(30, state_at(30), {"step": 30, "model": {}})
    c.close()
    assert os.listdir(directory) == ["30"]


# -- a failed write -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of a given size (needs root and a kernel that allows it)."""
    mounted = []

    def make(size: str) -> str:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.decode().strip()[:100]})")
        mounted.append(path)
        return str(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # even while a file is open


def _no_leftovers(directory: str) -> None:
    assert not [n for n in os.listdir(directory) if "tmp" in n], os.listdir(directory)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_line_at_the_failed_save_and_leaves_no_tmp_dir(small_disk, async_save, caplog):
    disk = small_disk("40k")
    c = checkpointer(disk, async_save=async_save)
    big = state_at(1, side=64)  # 16 KiB of parameters: more than the disk holds with orbax's files
    with pytest.raises(CheckpointWriteError) as error:
        c.save(1, big, {"step": 1})
        c.save(2, big, {"step": 2})  # an async save's failure surfaces here at the latest
    assert str(error.value) == f"could not write checkpoint 1 to {c.directory}: No space left on device"
    c.close()  # reported once: closing after the failure raises nothing more
    _no_leftovers(c.directory)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # orbax's tracebacks


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(small_disk):
    disk = small_disk("150k")
    c = checkpointer(disk, async_save=False)
    for step in (1, 2):
        c.save(step, state_at(step, side=64), {"step": step})
    with pytest.raises(CheckpointWriteError, match=r"^could not write checkpoint 3 to .*: No space left on device \("):
        c.save(3, state_at(3, side=64), {"step": 3})
    c.close()
    assert sorted(os.listdir(c.directory)) == ["1", "2"]


def test_write_error_inside_orbax_names_the_step_and_removes_its_tmp_dir(tmp_path, monkeypatch):
    """What tensorstore raises for a full disk, without needing one."""

    def failing_save(self, step, *args, **kwargs):
        os.makedirs(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp", "state"))
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: Failed to write 2467 bytes [os_error_code='28']")

    c = checkpointer(tmp_path, async_save=False)
    c.save(1, state_at(1), {"step": 1})
    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as error:
        c.save(2, state_at(2), {"step": 2})
    assert str(error.value) == f"could not write checkpoint 2 to {c.directory}: No space left on device"
    c.close()
    assert os.listdir(c.directory) == ["1"]


def test_a_workdir_that_cannot_hold_checkpoints_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(
        CheckpointWriteError, match="^cannot use .*/file/run/checkpoints for checkpoints: Not a directory$"
    ):
        checkpointer(tmp_path / "file" / "run")


# Two processes (jax.distributed on 127.0.0.1) save together, process 0 empties the newest
# checkpoint, and both must restore the same older one without hanging.
_TWO_PROCESS_RESUME = r"""
import sys
import jax, numpy as np
workdir, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import os, shutil
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import CheckpointConfig, ModelConfig
replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), P())
cfg = CheckpointConfig(every_steps=1, async_save=False)
c = Checkpointer(workdir, cfg)
for step in (100, 200):
    c.save(step, {"w": jax.device_put(np.full((4, 4), float(step), np.float32), replicated)}, {"model": {}})
c.close()
if pid == 0:
    shutil.rmtree(os.path.join(c.directory, "200")); os.mkdir(os.path.join(c.directory, "200"))
multihost_utils.sync_global_devices("damaged")
abstract = {"w": jax.ShapeDtypeStruct((4, 4), np.float32, sharding=replicated)}
state, _, step = Checkpointer(workdir, cfg).restore_latest(abstract, ModelConfig(), lambda m: print(m, flush=True))
print("restored", step, float(np.asarray(state["w"].addressable_data(0))[0, 0]), flush=True)
"""


@pytest.mark.slow
def test_two_processes_skip_the_same_unreadable_checkpoint(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_RESUME, str(tmp_path), str(port), str(i)],
            cwd=REPO,
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:  # a process that fails leaves the other waiting at a barrier: kill both
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.splitlines()[-1] == "restored 100 100.0", out
        assert f"checkpoint 200 unreadable (empty directory); using 100 (200 moved to {tmp_path}" in out
    assert os.listdir(tmp_path / "checkpoints") == ["100"]
    assert os.listdir(tmp_path / "checkpoints-unreadable") == ["200"]


# -- the workdir lock -------------------------------------------------------------------------

_HOLDER = "import sys, time; from flaxgpt.workdir import WorkdirLock; WorkdirLock(sys.argv[1], 0).__enter__(); "
_HOLDER += "print('locked', flush=True); time.sleep(600)"


def test_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(WorkdirBusy) as error:
            WorkdirLock(workdir, 0).__enter__()
        assert str(error.value).startswith(
            f"workdir {workdir} is in use by pid {holder.pid} on host {socket.gethostname()} since "
        )
        assert str(error.value).endswith("; stop it or choose another --workdir")
        with WorkdirLock(workdir, 1):  # another process of the same job locks its own file
            with pytest.raises(WorkdirBusy):
                WorkdirLock(workdir, 1).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(workdir, 0):  # the kernel released the killed holder's lock
        pass
    with WorkdirLock(workdir, 0):  # and a lock left normally is free again too
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^cannot use .*/file/run as a workdir: Not a directory$"):
        WorkdirLock(str(tmp_path / "file" / "run"), 0).__enter__()


# -- metrics.jsonl and atomic writes ----------------------------------------------------------


def _metrics_logger(workdir, start_step: int) -> MetricsLogger:
    return MetricsLogger(str(workdir), LoggingConfig(tensorboard=False, progress="none"), 100, start_step, {})


def test_resume_keeps_metrics_history_around_a_damaged_line(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 61)]
    lines[9] = '{"step": 10, "loss": oops'  # damaged in the middle
    lines[20] = "\xff\xfe not utf-8"
    (tmp_path / "metrics.jsonl").write_bytes(("\n".join(lines) + '\n{"step": 61, "lo').encode("latin-1"))
    logger = _metrics_logger(tmp_path, start_step=50)
    logger.log(51, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [s for s in range(1, 52) if s not in (10, 21)]
    out = capsys.readouterr().out
    assert out.count("dropped") == 1
    assert "dropped 10 rows past the restored step and 2 damaged lines; kept 48 rows up to step 50" in out


def test_torn_last_line_is_dropped_silently(tmp_path, capsys):
    rows = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 6, "lo')
    _metrics_logger(tmp_path, start_step=5).close()
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert capsys.readouterr().out == ""
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    fileio.write_atomic(path, '{"old": true}')
    with pytest.raises(UnicodeEncodeError):
        fileio.write_atomic(path, '{"new": "\ud800"}')  # a lone surrogate cannot be encoded
    assert open(path).read() == '{"old": true}'
    assert os.listdir(tmp_path) == ["tokenizer.json"]
    fileio.write_atomic(path, b"\x00\x01")
    assert open(path, "rb").read() == b"\x00\x01"


def test_write_atomic_on_a_full_disk_keeps_the_old_file(small_disk):
    path = os.path.join(small_disk("16k"), "config.json")
    fileio.write_atomic(path, "old")
    with pytest.raises(OSError, match="No space left on device"):
        fileio.write_atomic(path, "x" * 64 * 1024)
    assert open(path).read() == "old" and os.listdir(os.path.dirname(path)) == ["config.json"]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    path, errors = str(tmp_path / "summary.json"), []

    def writer(text: str) -> None:
        try:
            for _ in range(200):
                fileio.write_atomic(path, text)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c * 5000,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and open(path).read() in ("a" * 5000, "b" * 5000)
    assert os.listdir(tmp_path) == ["summary.json"]
