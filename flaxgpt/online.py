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
Every fifth rating (row id divisible by HOLDOUT) is held out: never trained on, it is what the
guard's loss on recent thumbs-up answers and preference accuracy on held-out pairs are measured
on. A follow-up (the user's next turn, e.g. a correction) is stored and exported as a conversation
but is not a training target here: its text is the user's, not an answer of the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from flaxgpt import feedback, fileio
from flaxgpt.preference import Feedback, Pair
from flaxgpt.serve.page import history
from flaxgpt.serve.store import FeedbackStore

PROMOTED = "promoted.json"
PROMOTIONS = "promotions.jsonl"
HOLDOUT = 5  # ratings whose row id is a multiple of it are held out for the guard


@dataclass
class Events:
    """The training data of one update: ratings rows (cursor, hi] as KTO records and DPO pairs."""

    cursor: int  # the last ratings row id an earlier update used
    hi: int  # the last ratings row id this update uses
    rating_ids: list[int] = field(default_factory=list)  # every row (cursor, hi], held-out ones included
    records: list[Feedback] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    pair_ids: list[list[int]] = field(default_factory=list)  # [chosen message id, rejected message id]

    def record(self) -> dict:
        """What the checkpoint keeps: the cursor and the rows used."""
        return {"cursor": self.hi, "from_cursor": self.cursor, "rating_ids": self.rating_ids, "pairs": self.pair_ids}


def count_new(db: str, cursor: int) -> int:
    """Ratings rows newer than `cursor` (0 when there is no database yet)."""
    if not os.path.exists(db):
        return 0
    store = FeedbackStore(db)
    try:
        return store.query("SELECT COUNT(*) AS n FROM ratings WHERE id > ?", (cursor,))[0]["n"]
    finally:
        store.close()


def read_events(db: str, cursor: int) -> Events:
    """The ratings rows after `cursor` (up to the newest at the time of reading) as training data."""
    store = FeedbackStore(db)
    try:
        rows = store.query("SELECT * FROM ratings WHERE id > ? ORDER BY id", (cursor,))
        hi = rows[-1]["id"] if rows else cursor
        latest = {r["message_id"]: r for r in store.query("SELECT * FROM ratings WHERE id <= ? ORDER BY id", (hi,))}
        events = Events(cursor, hi, [r["id"] for r in rows])
        trained = {r["message_id"] for r in rows if r["id"] % HOLDOUT}
        for message_id in sorted(m for m in trained if latest[m]["id"] % HOLDOUT):
            answer = store.message(message_id)
            up = latest[message_id]["rating"] > 0
            events.records.append(Feedback(history(store, answer["parent_id"]), answer["content"], up))
        for p, pair in _pairs(store, latest, cursor, hi):
            if max(p["rating_ids"]) % HOLDOUT:
                events.pairs.append(pair)
                events.pair_ids.append([p["chosen_id"], p["rejected_id"]])
        return events
    finally:
        store.close()


def _pairs(store: FeedbackStore, latest: dict[int, dict], after: int, upto: int) -> list[tuple[dict, Pair]]:
    """The pairs whose newest rating is a row in (after, upto], with their export records."""
    out = []
    for p in feedback.pair_records(store, latest):
        if p["rating_ids"] and after < max(p["rating_ids"]) <= upto:
            out.append(
                (p, Pair(history(store, store.message(p["chosen_id"])["parent_id"]), p["chosen"], p["rejected"]))
            )
    return out


def held_out(db: str, upto: int, n: int) -> tuple[list[Feedback], list[Pair]]:
    """The guard's data among ratings rows up to `upto`: the `n` newest held-out thumbs-up answers
    and the `n` newest held-out pairs."""
    if not os.path.exists(db):
        return [], []
    store = FeedbackStore(db)
    try:
        latest = {r["message_id"]: r for r in store.query("SELECT * FROM ratings WHERE id <= ? ORDER BY id", (upto,))}
        up = [m for m, r in latest.items() if r["rating"] > 0 and r["id"] % HOLDOUT == 0]
        answers = [store.message(m) for m in sorted(up, key=lambda m: latest[m]["id"])[-n:]]
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
    if promoted and promoted_step(workdir) != promoted[-1]["step"]:
        marker = {"step": promoted[-1]["step"], "score": promoted[-1].get("score")}
        fileio.write_atomic(os.path.join(workdir, PROMOTED), json.dumps(marker) + "\n")


def promoted_step(workdir: str) -> int | None:
    """The checkpoint step a server of this run may serve; None when the run has no promotions
    (an ordinary run: every checkpoint may be served)."""
    path = os.path.join(workdir, PROMOTED)
    if not fileio.exists(path):
        return None
    with fileio.open_file(path) as f:
        return int(json.load(f)["step"])
