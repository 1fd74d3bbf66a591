"""The online learner end to end on a tiny world model: the real server on a free localhost port,
the simulated user on the page's endpoints, the learner in its own process (SIGKILLed once), the
feedback database in between. One server and one starting model for the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from flaxgpt import online
from flaxgpt.errors import UserError
from flaxgpt.trainers import pretrain
from tests.conftest import REPO, serving, tiny_run_config

pytestmark = pytest.mark.slow

ANY = ("online.max_regression=1", "online.max_loss_rise=1e6")  # every candidate promoted
LEARNER = (
    "train.batch_size=4",
    "online.min_events=6",
    "online.steps_per_update=2",
    "online.replay=4",
    "online.guard_questions=4",
    "online.poll_seconds=0.2",
    "sft.max_new_tokens=6",
    "eval.batch_size=4",
    "logging.progress=plain",
    "logging.report=false",
    "logging.tensorboard=false",
)


def learner(workdir: str, start: str, *sets: str) -> subprocess.Popen:
    """`python -m flaxgpt.train -e online_feedback` on `workdir`, in its own process."""
    cmd = [sys.executable, "-m", "flaxgpt.train", "-e", "online_feedback", "--workdir", workdir]
    cmd += ["--set", f"train.init_from={start}", *LEARNER, *sets]
    # restarts reuse the first process's compiled programs
    cache = os.path.join(os.path.dirname(workdir), "jax-cache")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """(learner workdir, starting run, server URL, Service): a learner's step 0 served."""
    from flaxgpt.serve.__main__ import build_service, watch

    root = tmp_path_factory.mktemp("online")
    start, workdir = str(root / "start"), str(root / "learn")
    overrides = dict(
        model={"block_size": 128, "vocab_multiple": 8}, eval={"interval": 20, "iters": 1, "sample_tokens": 0}
    )
    pretrain.run(tiny_run_config(train={"max_steps": 20}, checkpoint={"every_steps": 20}, **overrides), start)
    first = learner(workdir, start, "online.max_updates=1", *ANY)
    wait_for(lambda: online.promoted_step(workdir) == 0 or first.poll() is not None, 300, "step 0 promoted")
    assert first.poll() is None, first.communicate()[0]
    service = build_service(workdir, slots=2, max_queue=16)
    stop = threading.Event()
    with serving(service) as url:
        threading.Thread(target=watch, args=(service, workdir, 0.2, stop), daemon=True).start()
        yield workdir, start, url, service, first
        stop.set()


def _user(url: str, seed: int):
    import httpx

    from flaxgpt.data.world import WorldTask
    from flaxgpt.simuser import Behaviour, SimUser

    http = httpx.Client(base_url=url, timeout=120)
    behaviour = Behaviour(noise=0.1, regenerate=0.5, follow_up=0.5, max_tokens=6)
    return SimUser(http, WorldTask(0, "Answer briefly."), behaviour, seed)


def _ask_until(user, done, timeout: float = 300) -> None:
    """Ask questions (every request must succeed), a few a second, until done()."""
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, "the condition never came"
        user.ask()
        time.sleep(0.1)


def _records(workdir: str) -> dict[int, dict]:
    """Each learner checkpoint's online record, by step."""
    from flaxgpt.checkpoint import Checkpointer
    from flaxgpt.config import CheckpointConfig

    ck = Checkpointer(workdir, CheckpointConfig(), read_only=True)
    try:
        return {s: ck.read_record(s)["online"] for s in ck.manager.all_steps()}
    finally:
        ck.close()


def _all_ratings(service, upto: int) -> list[int]:
    return [r["id"] for r in service.store.query("SELECT id FROM ratings WHERE id <= ? ORDER BY id", (upto,))]


def _used_once(workdir: str, service) -> int:
    """Every ratings row up to the newest cursor used by exactly one checkpoint; the cursor."""
    records = _records(workdir)
    used = [i for r in records.values() for i in r["rating_ids"]]
    cursor = records[max(records)]["cursor"]
    assert sorted(used) == _all_ratings(service, cursor) and len(used) == len(set(used))
    return cursor


def test_feedback_through_the_page_trains_a_promoted_step_the_server_switches_to(loop):
    workdir, _, url, service, first = loop
    user = _user(url, 1)
    _ask_until(user, lambda: first.poll() is not None)  # the learner updates once, then exits
    out = finish(first)
    new = online.decisions(workdir)[-1]["step"]
    assert new > 0 and f"step {new}: promoted" in out, out
    assert online.promoted_step(workdir) == new
    # the server switches between requests; every request meanwhile succeeded
    _ask_until(user, lambda: service.engine.step == new)
    user.ask()
    steps = service.store.query("SELECT DISTINCT step FROM messages WHERE role = 'assistant' ORDER BY step")
    assert [r["step"] for r in steps] == [0, new] and user.tally.steps.get(new)
    assert _used_once(workdir, service) >= 6
    record = _records(workdir)[new]
    assert record["base_step"] == 0 and record["from_cursor"] == 0 and record["start_step"] == 0


def test_a_learner_killed_mid_update_resumes_with_no_row_lost_or_counted_twice(loop):
    workdir, start, url, service, _ = loop
    user = _user(url, 2)
    proc = learner(workdir, start, "online.max_updates=2", *ANY)
    checkpoints = os.path.join(workdir, "checkpoints")
    before = set(os.listdir(checkpoints))
    served = service.engine.step
    _ask_until(user, lambda: online.count_new(service.store.file, _records(workdir)[served]["cursor"]) >= 6)
    # kill it as soon as its save appears (half-written or just finished, undecided)
    wait_for(lambda: set(os.listdir(checkpoints)) - before or proc.poll() is not None, 120, "a save")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert service.engine.step == served  # nothing undecided is served
    out = finish(learner(workdir, start, "online.max_updates=2", *ANY))
    decided = [d["step"] for d in online.decisions(workdir)]
    assert decided[:2] == [0, served] and len(decided) == 3 and decided[2] > served
    assert online.promoted_step(workdir) == decided[2] and f"step {decided[2]}: promoted" in out, out
    assert _records(workdir)[decided[2]]["start_step"] == served
    assert not [n for n in os.listdir(checkpoints) if not n.isdigit()]
    _used_once(workdir, service)


def test_the_guard_keeps_a_worse_checkpoint_unpromoted(loop):
    workdir, start, url, service, _ = loop
    user = _user(url, 3)
    served = service.engine.step
    _ask_until(user, lambda: online.count_new(service.store.file, _records(workdir)[served]["cursor"]) >= 6)
    # a learning rate that wrecks the model: the held-out thumbs-up answers' loss soars
    out = finish(learner(workdir, start, "online.max_updates=3", "optimizer.lr=1.0"))
    last = online.decisions(workdir)[-1]
    assert last["step"] > served and not last["promoted"] and "kept, not promoted" in out, out
    assert last["score"]["up_loss"] > 1.2 * last["base_score"]["up_loss"]
    served_decision = next(d for d in online.decisions(workdir) if d["step"] == served)
    assert last["base_score"]["accuracy"] == served_decision["score"]["accuracy"]  # logged, not decoded again
    assert online.promoted_step(workdir) == served and last["step"] in _records(workdir)  # kept, not served
    time.sleep(0.5)  # a reload check passes
    user.ask()
    assert service.engine.step == served
    _used_once(workdir, service)


def test_the_learner_continues_a_rejected_candidate_and_restarts_after_too_many(loop):
    workdir, start, url, service, _ = loop
    user = _user(url, 4)
    served, wrecked = service.engine.step, online.decisions(workdir)[-1]["step"]  # the guard test's
    assert not online.decisions(workdir)[-1]["promoted"]
    _ask_until(user, lambda: online.count_new(service.store.file, _records(workdir)[wrecked]["cursor"]) >= 12)
    # two more updates, still wrecking: the first continues the rejected candidate, and after its
    # rejection (two in a row) the second starts again from the served model
    finish(learner(workdir, start, "online.max_updates=5", "optimizer.lr=1.0", "online.restart_after=2"))
    decided = online.decisions(workdir)[-2:]
    assert [d["promoted"] for d in decided] == [False, False] and online.promoted_step(workdir) == served
    records = _records(workdir)
    assert [records[d["step"]]["start_step"] for d in decided] == [wrecked, served]
    assert all(records[d["step"]]["base_step"] == served for d in decided)  # the KL anchor: the served model
    _used_once(workdir, service)


# ----------------------------------------------------------------------------- the learner's parts


def _asked(store, question: str, answer: str) -> tuple[int, int, int]:
    """(conversation, question id, answer id) of one question and its answer."""
    conversation = store.new_conversation()
    question_id = store.add_message(conversation, None, "user", question, system="Answer briefly.")
    return conversation, question_id, store.add_message(conversation, question_id, "assistant", answer, step=0)


def test_corrections_become_demonstrations_and_an_update_reads_at_most_its_limit(tmp_path):
    from flaxgpt.serve.store import FeedbackStore

    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    rated, answers = [], []
    for i in range(3):
        conversation, _, answer = _asked(store, f"What is {i} plus 1?", "7")
        answers.append(answer)
        rated.append(store.rate(answer, 1 if i == 0 else -1))
    fix = store.add_message(
        conversation, answers[2], "user", "That is wrong: the answer is 3.", system="Answer briefly."
    )
    store.add_message(conversation, fix, "assistant", "3", step=0)
    store.add_message(conversation, answers[1], "user", "Why?", system="Answer briefly.")  # not a correction
    first = online.read_events(store.file, 0, 0, limit=2)
    assert first.rating_ids == rated[:2] and first.hi == rated[1]  # the third rating waits for the next update
    assert [(r.response, r.desirable) for r in first.records] == [("3", True), ("7", True), ("7", False)]
    assert first.records[0].prompt[-1] == {"role": "user", "content": "What is 2 plus 1?"}
    assert [(p.chosen, p.rejected) for p in first.pairs] == [("3", "7")] and first.corrections == [fix]
    assert first.record()["message_cursor"] == first.message_hi > fix
    second = online.read_events(store.file, first.hi, first.message_hi, limit=2)
    assert second.rating_ids == rated[2:] and not second.corrections and not second.pairs
    # rehearsal: each question earlier updates trained on, with its best-supported answer (a
    # correction outweighs a thumbs-down); never a question whose answers all got thumbs-down
    again = store.rate(_asked(store, "What is 0 plus 1?", "1")[2], -1)
    rehearsed = online.replay(store.file, again, first.message_hi, 5, seed=0)
    assert sorted((r.prompt[-1]["content"], r.response, r.desirable) for r in rehearsed) == [
        ("What is 0 plus 1?", "7", True),
        ("What is 2 plus 1?", "3", True),
    ]
    assert [r.response for r in online.replay(store.file, first.hi, 0, 5, seed=0)] == ["7"]
    assert len(online.replay(store.file, again, first.message_hi, 1, seed=0)) == 1
    assert online.replay(store.file, 0, 0, 5, seed=0) == []
    store.close()


def test_a_window_of_held_out_ratings_waits_for_more_and_a_full_one_widens(tmp_path):
    from flaxgpt.serve.store import FeedbackStore

    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    answers = [_asked(store, f"What is {i} plus 1?", "7")[2] for i in range(6)]
    for answer in answers[:4]:
        store.rate(answer, 1)
    store.rate(answers[4], -1)  # rating 5: held out
    assert online.read_events(store.file, 4, 0, limit=1).records == []
    assert online.window(store.file, 4, 0, limit=1) is None  # nothing to train on: wait, the cursor stays
    store.rate(answers[5], 1)  # rating 6: trainable
    events = online.window(store.file, 4, 0, limit=1)  # (4, 5] is full and empty: widened to (4, 6]
    assert events.rating_ids == [5, 6] and [(r.response, r.desirable) for r in events.records] == [("7", True)]
    store.close()
    # a record too long for the context, with data.on_error=skip, is nothing to train on either
    from types import SimpleNamespace

    from flaxgpt.config import Config, DataConfig, ModelConfig
    from flaxgpt.data.tokenizers import CharTokenizer
    from flaxgpt.trainers.online import fitting

    cfg = Config(model=ModelConfig(block_size=16), data=DataConfig(on_error="skip"))
    learner = SimpleNamespace(cfg=cfg, tokenizer=CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz W?0123456789"))
    assert online.window(store.file, 4, 0, limit=1, usable=lambda r: fitting(learner, r)) is None
    learner.cfg = Config(model=ModelConfig(block_size=64), data=DataConfig(on_error="skip"))
    assert online.window(store.file, 4, 0, limit=1, usable=lambda r: fitting(learner, r)).rating_ids == [5, 6]


def test_a_damaged_or_foreign_database_is_one_line_naming_it(tmp_path):
    import sqlite3

    from flaxgpt.serve.store import FeedbackStore, StoreError

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_text("not a database " * 100)
    with pytest.raises(StoreError, match=r"online.db=.*garbage.sqlite: not a feedback database"):
        online.count_new(str(garbage), 0)
    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    _, question, answer = _asked(store, "What is 1 plus 1?", "2")
    store.rate(answer, 1)
    store.close()
    with sqlite3.connect(tmp_path / "feedback.sqlite") as con:
        con.execute("DELETE FROM messages WHERE id = ?", (question,))
    with pytest.raises(StoreError, match=f"names message {question}, which is missing"):
        online.read_events(str(tmp_path / "feedback.sqlite"), 0)


def test_rehearsal_tallies_every_rating_of_a_question_so_noisy_clicks_are_outvoted(tmp_path):
    from flaxgpt.serve.store import FeedbackStore

    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    votes = [("10", 1), ("11", 1), ("10", 1), ("11", -1)]  # "10": +2 outvotes a wrong click on "11": 0
    ids = [store.rate(_asked(store, "What is 5 plus 5?", answer)[2], rating) for answer, rating in votes]
    assert all(i % online.HOLDOUT for i in ids)
    held = store.rate(_asked(store, "What is 9 plus 9?", "18")[2], 1)
    assert held % online.HOLDOUT == 0  # held out: never rehearsed
    store.rate(_asked(store, "What is 1 plus 1?", "3")[2], -1)  # no positive support
    later = store.rate(_asked(store, "What is 2 plus 2?", "4")[2], 1)  # after the cursor
    rehearsed = online.replay(store.file, held, 0, 10, seed=1)
    assert [(r.prompt[-1]["content"], r.response) for r in rehearsed] == [("What is 5 plus 5?", "10")]
    assert rehearsed[0].prompt[0] == {"role": "system", "content": "Answer briefly."}
    assert len(online.replay(store.file, later, 0, 10, seed=1)) == 2
    store.close()


def test_the_learner_continues_its_newest_candidate_unless_too_many_were_rejected_in_a_row():
    from flaxgpt.trainers.online import continue_from

    log = [{"step": 0, "promoted": True}, {"step": 5, "promoted": True}]
    assert continue_from(log, 5, 5, 2) == 5
    log.append({"step": 9, "promoted": False})
    assert continue_from(log, 9, 5, 2) == 9  # a rejected candidate's learning is kept
    log.append({"step": 14, "promoted": False})
    assert continue_from(log, 14, 5, 2) == 5  # two in a row: back to the served model
    assert continue_from(log, 14, 5, 0) == 14  # 0: never
    log.append({"step": 19, "promoted": False})
    assert continue_from(log, 19, 5, 2) == 19  # the new line gets its own two tries
    log.append({"step": 24, "promoted": False})
    assert continue_from(log, 24, 5, 2) == 5


def test_pruning_keeps_the_newest_and_every_promoted_checkpoint(tmp_path):
    import numpy as np

    from flaxgpt.checkpoint import Checkpointer
    from flaxgpt.config import CheckpointConfig

    workdir = str(tmp_path)
    ck = Checkpointer(workdir, CheckpointConfig(max_to_keep=1000, async_save=False))
    for step, promoted in enumerate((True, False, True, False, False, False)):
        ck.save(step, {"w": np.full(2, step, np.float32)}, {"step": step}, force=True)
        online.log_decision(workdir, {"step": step, "promoted": promoted})
    online.prune(ck.manager, workdir, keep=2)
    assert sorted(ck.manager.all_steps()) == [0, 2, 4, 5]
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))) == [0, 2, 4, 5]
    assert online.promoted_step(workdir) == 2 and ck.read_record(2)["step"] == 2
    ck.close()
    marker = os.path.join(workdir, online.PROMOTED)
    for damaged in ("{", '{"step": "x"}', "[2]", '{"step": -1}', "\udcff"):  # a marker edited by hand
        with open(marker, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(damaged)
        with pytest.raises(UserError, match=r"promoted.json: expected \{\"step\": N\}"):
            online.promoted_step(workdir)
    online.sync_marker(workdir)  # the learner rewrites it from its log
    assert online.promoted_step(workdir) == 2


def test_the_sft_term_adds_the_thumbs_up_answers_negative_log_likelihood():
    import dataclasses

    import numpy as np

    from flaxgpt import preference
    from flaxgpt.config import Config
    from flaxgpt.data.tokenizers import CharTokenizer
    from flaxgpt.trainers.online import online_objective
    from tests.conftest import init_params, tiny_model_config

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.0123456789<|>")
    model, params = init_params(tiny_model_config(vocab_size=tok.vocab_size, block_size=32, n_layer=1, d_model=16))
    prompt = [{"role": "user", "content": "what is 2 plus 3?"}]
    records = [preference.Feedback(prompt, "5", True), preference.Feedback(prompt, "7", False)]
    rows = preference.feedback_rows(records, tok, 32)
    rows.update(ref_logp=np.zeros((2, 1), np.float32), ref_kl_logp=np.zeros((2, 1), np.float32))
    cfg = Config()
    sums = {}
    for weight in (0.0, 2.0):
        cfg = dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, sft_weight=weight))
        sums[weight] = online_objective(model, cfg)(params, rows, None, False)
    up = float(preference.logprobs(model, params, rows, ("",))[0][0][0])
    assert float(sums[2.0]["loss_sum"] - sums[0.0]["loss_sum"]) == pytest.approx(-2.0 * up, rel=1e-4)
    assert float(sums[2.0]["ratios"]["sft_nll"][0]) == pytest.approx(-up, rel=1e-4)
