"""Online learning from the served model's feedback: what the learner reads and what it decides.

The learner (`flaxgpt.trainers.online`) reads the feedback database's ratings newer than its
cursor (a ratings row id), trains a candidate, and saves it with the cursor and the rows it used
in the checkpoint's own record (one atomic save: a kill before it re-reads the same rows, a kill
after it never reads them again). A held-out check then decides whether the candidate is
promoted; every decision is one line of WORKDIR/promotions.jsonl, and WORKDIR/promoted.json
names the checkpoint the server may serve (`promoted_step`).

Training data from the rows up to the new cursor:
  KTO records  each newly rated answer (its latest rating) with its conversation: up = desirable
  DPO pairs    two answers to the same user turn, one rated up and the other down, or a
               regeneration rated up over the answer it replaced (`feedback.pair_records`),
               taken when the newer of their ratings is among the new rows (so each pair once)
  corrections  a follow-up to an answer that says "the answer is X" (or "the correct answer is
               X", any case, a final full stop dropped): X becomes a thumbs-up answer to the
               question the answer replied to (a demonstration, also for the SFT term) and the
               pair X over the corrected answer a DPO pair. Follow-ups are read by message id
               (their own cursor, saved beside the ratings cursor); other follow-ups are not
               training targets (their text is the user's, not an answer).
Each update also rehearses online.replay questions sampled from the events earlier updates
trained on, each with its best-supported answer so far (`replay`: as thumbs-up records, not
counted as used again).
An update reads at most `limit` ratings rows (online.max_events): the cursor stops at the last
one read, so a learner slower than its users lags behind but still trains on every event once.
A window with nothing to train on (every new rating held out) is no update: the learner waits
for more ratings and reads the window again with them (`window`).
Every fifth rating (row id divisible by HOLDOUT) is held out: never trained on, it is what the
guard's loss on recent thumbs-up answers and preference accuracy on held-out pairs are measured
on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sqlite3
from dataclasses import dataclass, field

from flaxgpt import feedback, fileio
from flaxgpt.errors import UserError
from flaxgpt.preference import Feedback, Pair
from flaxgpt.serve.page import history
from flaxgpt.serve.store import FeedbackStore, StoreError, read_only

PROMOTED = "promoted.json"
PROMOTIONS = "promotions.jsonl"
HOLDOUT = 5  # ratings whose row id is a multiple of it are held out for the guard
CORRECTION_VOTES = 2  # a typed correction outweighs a click (`replay`)
CORRECTION = re.compile(r"(?:the )?(?:correct |right )?answer is:?\s+(.+?)\.?\s*$", re.IGNORECASE)


@dataclass
class Events:
    """The training data of one update: ratings rows (cursor, hi] as KTO records and DPO pairs."""

    cursor: int  # the last ratings row id an earlier update used
    hi: int  # the last ratings row id this update uses
    rating_ids: list[int] = field(default_factory=list)  # every row (cursor, hi], held-out ones included
    records: list[Feedback] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    pair_ids: list[list[int]] = field(default_factory=list)  # [chosen message id, rejected message id]
    message_cursor: int = 0  # the last message id an earlier update looked at for corrections
    message_hi: int = 0  # the last message id this update looked at
    corrections: list[int] = field(default_factory=list)  # the follow-up message ids used as corrections

    def record(self) -> dict:
        """What the checkpoint keeps: the cursors and the rows used."""
        return {
            "cursor": self.hi,
            "from_cursor": self.cursor,
            "rating_ids": self.rating_ids,
            "pairs": self.pair_ids,
            "message_cursor": self.message_hi,
            "corrections": self.corrections,
        }


def count_new(db: str, cursor: int) -> int:
    """Ratings rows newer than `cursor` (0 while there is no database or its schema is still being
    made: read-only, so that the learner never races the server's migration)."""
    if not os.path.exists(db):
        return 0
    try:
        with contextlib.closing(read_only(db)) as con:
            return con.execute("SELECT COUNT(*) FROM ratings WHERE id > ?", (cursor,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    except sqlite3.DatabaseError as e:  # a file that is not SQLite
        raise StoreError(f"online.db={db}: not a feedback database ({e})") from None


def read_events(db: str, cursor: int, message_cursor: int = 0, limit: int = 0) -> Events:
    """The ratings rows after `cursor` (at most `limit` of them, 0: up to the newest at the time of
    reading) and the corrections among the messages after `message_cursor`, as training data."""
    store = FeedbackStore(db)
    try:
        query = "SELECT * FROM ratings WHERE id > ? ORDER BY id" + (" LIMIT ?" if limit else "")
        rows = store.query(query, (cursor, limit) if limit else (cursor,))
        hi = rows[-1]["id"] if rows else cursor
        latest = {r["message_id"]: r for r in store.query("SELECT * FROM ratings WHERE id <= ? ORDER BY id", (hi,))}
        events = Events(cursor, hi, [r["id"] for r in rows], message_cursor=message_cursor)
        _corrections(store, events)
        trained = {r["message_id"] for r in rows if r["id"] % HOLDOUT}
        for message_id in sorted(m for m in trained if latest[m]["id"] % HOLDOUT):
            answer = store.row(message_id, f"rating {latest[message_id]['id']}")
            up = latest[message_id]["rating"] > 0
            events.records.append(Feedback(history(store, answer["parent_id"]), answer["content"], up))
        for p, pair in _pairs(store, latest, cursor, hi):
            if max(p["rating_ids"]) % HOLDOUT:
                events.pairs.append(pair)
                events.pair_ids.append([p["chosen_id"], p["rejected_id"]])
        return events
    finally:
        store.close()


def window(db: str, cursor: int, message_cursor: int, limit: int, usable=lambda records: records) -> Events | None:
    """The next update's events: `read_events`, its window widened (the limit doubled) while a full
    window holds nothing to train on; None (wait for more ratings) when all the ratings after the
    cursor are held out or their answers' latest ratings are (or `usable`, the records the learner
    can train on, keeps none): the cursor stays, and the next update reads these rows again with
    the newer ones."""
    while True:
        events = read_events(db, cursor, message_cursor, limit)
        if usable(events.records):
            return events
        if not limit or len(events.rating_ids) < limit:
            return None
        limit *= 2


def _corrections(store: FeedbackStore, events: Events) -> None:
    """Add the corrections among the follow-ups after events.message_cursor (up to the newest
    message now) as thumbs-up demonstrations and pairs over the answers they correct."""
    events.message_hi = store.query("SELECT COALESCE(MAX(id), 0) AS n FROM messages")[0]["n"]
    for f, answer in _corrected(store, events.message_cursor, events.message_hi):
        prompt = history(store, f["question_id"])
        events.records.append(Feedback(prompt, answer, True))
        events.pairs.append(Pair(prompt, answer, f["answer"]))
        events.pair_ids.append([f["id"], f["answer_id"]])
        events.corrections.append(f["id"])


def _corrected(store: FeedbackStore, after: int, upto: int) -> list[tuple[dict, str]]:
    """(follow-up row, corrected answer) of each correction among messages (after, upto]; the row
    names the question (question_id, and question_key: `_key` of it)."""
    follow_ups = store.query(
        "SELECT u.id, u.content, a.id AS answer_id, a.parent_id AS question_id, a.content AS answer, "
        "q.content AS question, q.system, q.parent_id AS question_parent "
        "FROM messages u JOIN messages a ON u.parent_id = a.id JOIN messages q ON a.parent_id = q.id "
        "WHERE u.role = 'user' AND a.role = 'assistant' AND u.id > ? AND u.id <= ? ORDER BY u.id",
        (after, upto),
    )
    out = []
    for f in follow_ups:
        match = CORRECTION.search(f["content"])
        if match is not None and match.group(1).strip() != f["answer"].strip():
            f["question_key"] = _key(f["question"], f["system"], f["question_parent"], f["question_id"])
            out.append((f, match.group(1).strip()))
    return out


def _key(content: str, system: str, parent: int | None, message_id: int) -> tuple:
    """What makes two user turns the same question: a conversation's first turn by its text and
    system message (asked again in a new conversation, it is the same question); a later turn by
    its own id (its earlier turns are part of the question)."""
    return ("first", content, system) if parent is None else ("turn", message_id)


def replay(db: str, cursor: int, message_cursor: int, n: int, seed: int) -> list[Feedback]:
    """Rehearsal for one update: `n` questions sampled (by `seed`) from those earlier updates
    trained on (ratings up to `cursor` not held out, follow-ups up to `message_cursor`), each with
    its best-supported answer. An answer's support: +1 per thumbs-up, -1 per thumbs-down (each
    answer's latest rating; the same text given again adds up), +CORRECTION_VOTES per correction
    to it; a question whose best answer has no positive support is left out. Every confirmed or
    corrected question is rehearsed, over and over: one pass teaches a fact too weakly to stick,
    and tallying all its ratings outvotes the noisy clicks."""
    if n <= 0 or not cursor:
        return []
    store = FeedbackStore(db)
    try:
        best = _best_answers(store, cursor, message_cursor)
        keys = sorted(best, key=repr)
        picked = sorted(random.Random(seed).sample(range(len(keys)), min(n, len(keys))))
        return [Feedback(history(store, best[keys[i]][1]), best[keys[i]][0], True) for i in picked]
    finally:
        store.close()


def _best_answers(store: FeedbackStore, cursor: int, message_cursor: int) -> dict[tuple, tuple[str, int]]:
    """{question key: (its best-supported answer, a question message id)} for `replay`."""
    rated = store.query(
        "SELECT r.id, r.rating, a.content AS answer, q.id AS question_id, q.content, q.system, q.parent_id "
        "FROM ratings r JOIN messages a ON a.id = r.message_id JOIN messages q ON q.id = a.parent_id "
        "WHERE r.id IN (SELECT MAX(id) FROM ratings WHERE id <= ? GROUP BY message_id)",
        (cursor,),
    )
    votes: dict[tuple, dict[str, float]] = {}
    where: dict[tuple, int] = {}
    for r in rated:
        if r["id"] % HOLDOUT:
            key = _key(r["content"], r["system"], r["parent_id"], r["question_id"])
            tally = votes.setdefault(key, {})
            tally[r["answer"]] = tally.get(r["answer"], 0) + r["rating"]
            where[key] = r["question_id"]
    for f, answer in _corrected(store, 0, message_cursor):
        tally = votes.setdefault(f["question_key"], {})
        tally[answer] = tally.get(answer, 0) + CORRECTION_VOTES
        where[f["question_key"]] = f["question_id"]
    out = {}
    for key, tally in votes.items():
        answer, support = max(tally.items(), key=lambda kv: (kv[1], kv[0]))
        if support > 0:
            out[key] = (answer, where[key])
    return out


def _pairs(store: FeedbackStore, latest: dict[int, dict], after: int, upto: int) -> list[tuple[dict, Pair]]:
    """The pairs whose newest rating is a row in (after, upto], with their export records."""
    out = []
    for p in feedback.pair_records(store, latest):
        if p["rating_ids"] and after < max(p["rating_ids"]) <= upto:
            out.append(
                (p, Pair(history(store, store.message(p["chosen_id"])["parent_id"]), p["chosen"], p["rejected"]))
            )
    return out


def held_out(db: str, upto: int | None, n: int) -> tuple[list[Feedback], list[Pair]]:
    """The guard's data among ratings rows up to `upto` (None: all): the `n` newest held-out
    thumbs-up answers and the `n` newest held-out pairs."""
    if not os.path.exists(db):
        return [], []
    upto = 2**62 if upto is None else upto
    store = FeedbackStore(db)
    try:
        latest = {r["message_id"]: r for r in store.query("SELECT * FROM ratings WHERE id <= ? ORDER BY id", (upto,))}
        up = [m for m, r in latest.items() if r["rating"] > 0 and r["id"] % HOLDOUT == 0]
        answers = [store.row(m, f"rating {latest[m]['id']}") for m in sorted(up, key=lambda m: latest[m]["id"])[-n:]]
        records = [Feedback(history(store, a["parent_id"]), a["content"], True) for a in answers]
        pairs = [pair for p, pair in _pairs(store, latest, 0, upto) if max(p["rating_ids"]) % HOLDOUT == 0]
        return records, pairs[-n:]
    finally:
        store.close()


# ----------------------------------------------------------------------------- promotions


def decisions(workdir: str) -> list[dict]:
    """The promotions log, oldest first (a line cut short by a kill is skipped)."""
    path = os.path.join(workdir, PROMOTIONS)
    if not fileio.exists(path):
        return []
    out = []
    with fileio.open_file(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def log_decision(workdir: str, decision: dict) -> None:
    """Append one decision (synced), then point promoted.json at the newest promoted step; the
    marker is rewritten from the log, so a kill between the two is repaired by the next call."""
    path = os.path.join(workdir, PROMOTIONS)
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(f.tell() - 1)
            torn = f.read(1) != "\n"
        else:
            torn = False
        f.write(("\n" if torn else "") + json.dumps(decision, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    sync_marker(workdir)


def sync_marker(workdir: str) -> None:
    """promoted.json = the newest promoted step of the log (written atomically)."""
    promoted = [d for d in decisions(workdir) if d.get("promoted")]
    try:
        marked = promoted_step(workdir)
    except UserError:  # a marker edited by hand: rewritten from the log
        marked = None
    if promoted and marked != promoted[-1]["step"]:
        marker = {"step": promoted[-1]["step"], "score": promoted[-1].get("score")}
        fileio.write_atomic(os.path.join(workdir, PROMOTED), json.dumps(marker) + "\n")


def promoted_step(workdir: str) -> int | None:
    """The checkpoint step a server of this run may serve; None when the run has no promotions
    (an ordinary run: every checkpoint may be served)."""
    path = os.path.join(workdir, PROMOTED)
    if not fileio.exists(path):
        return None
    with fileio.open_file(path, "rb") as f:
        raw = f.read()
    try:
        step = json.loads(raw)["step"]
    except (ValueError, TypeError, KeyError):  # not UTF-8 or not JSON (ValueErrors), not an object, no step
        step = None
    if type(step) is not int or step < 0:
        raise UserError(f'{path}: expected {{"step": N}}, the promoted checkpoint step (an integer >= 0)')
    return step


def prune(manager, workdir: str, keep: int) -> None:
    """Delete the checkpoints (of orbax `manager`) that are neither among the newest `keep` nor
    ever promoted: a server serves, or may be loading, only promoted ones, and the learner trains
    from the newest promoted one and resumes from the newest."""
    promoted = {d["step"] for d in decisions(workdir) if d.get("promoted")}
    for step in sorted(manager.all_steps())[:-keep]:
        if step not in promoted:
            manager.delete(step)
