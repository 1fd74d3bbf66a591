"""`python -m flaxgpt.feedback export --db RUN/feedback.sqlite --out DIR`

Turns the chat page's feedback database into the project's JSONL schemas (flaxgpt.data.jsonl):

  DIR/feedback.jsonl       each rated answer (its latest rating): {"prompt", "response", "label"}
  DIR/pairs.jsonl          two answers to the same user turn, one preferred: {"prompt", "chosen", "rejected"}
                           (one rated up and the other down, or a regeneration rated up or continued
                           from, over the answer it replaced when that one was not rated up)
  DIR/conversations.jsonl  the conversation up to each thumbs-up answer: {"messages"} (SFT); left out
                           when an earlier answer on its path was rated down (SFT learns every
                           assistant turn of a conversation: a thumbs-down answer is never taught)

The prompt is the answer's user turn; "system" is the system message it was asked under and
"history" the turns before it. Every record carries "id", made from the database rows it comes
from (stable across exports), and those rows' ids, so a consumer never uses an event twice.
The database is opened read-only: export never writes to it, and refuses a file that is not a
feedback database (one line, exit 2).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence

from flaxgpt import cli, fileio
from flaxgpt.serve.store import FeedbackStore


def _latest_ratings(store: FeedbackStore) -> dict[int, dict]:
    """Each rated message's latest rating (a later click replaces an earlier one)."""
    return {r["message_id"]: store.checked(r, "ratings") for r in store.query("SELECT * FROM ratings ORDER BY id")}


def _context(store: FeedbackStore, user_id: int, referrer: str) -> dict:
    """The prompt fields of a user turn (which `referrer` names): the turn, its system message and
    the turns before it."""
    path = store.path(user_id, referrer)
    out = {"prompt": path[-1]["content"]}
    if path[-1]["system"]:
        out["system"] = path[-1]["system"]
    out["history"] = [{"role": m["role"], "content": m["content"]} for m in path[:-1]]
    return out


def feedback_records(store: FeedbackStore, ratings: dict[int, dict]) -> list[dict]:
    out = []
    for message_id, r in sorted(ratings.items()):
        m = store.row(message_id, f"rating {r['id']}")
        record = {
            **_context(store, m["parent_id"], f"message {message_id}"),
            "response": m["content"],
            "label": r["rating"] > 0,
        }
        out.append(
            {
                **record,
                "id": f"rating-{r['id']}",
                "message_id": message_id,
                "rating_id": r["id"],
                "comment": r["comment"],
                "step": m["step"],
            }
        )
    return out


def _preferred(a: dict, b: dict, ratings: dict[int, dict], continued: set[int]) -> bool:
    """Whether answer `a` is preferred over its sibling `b`."""
    rating = lambda m: ratings[m["id"]]["rating"] if m["id"] in ratings else 0
    if rating(a) > 0 and rating(b) < 0:
        return True
    regenerated = a["revises_id"] == b["id"]
    return regenerated and (rating(a) > 0 or a["id"] in continued) and rating(b) <= 0 and rating(a) >= 0


def pair_records(store: FeedbackStore, ratings: dict[int, dict]) -> list[dict]:
    answers = [
        store.checked(a, "messages") for a in store.query("SELECT * FROM messages WHERE role = 'assistant' ORDER BY id")
    ]
    continued = {r["parent_id"] for r in store.query("SELECT DISTINCT parent_id FROM messages WHERE role = 'user'")}
    siblings = defaultdict(list)
    for a in answers:
        siblings[a["parent_id"]].append(a)
    out = []
    for user_id, group in siblings.items():
        for a, b in itertools.permutations(group, 2):
            if _preferred(a, b, ratings, continued):
                used = sorted(ratings[m["id"]]["id"] for m in (a, b) if m["id"] in ratings)
                out.append(
                    {
                        **_context(store, user_id, f"message {group[0]['id']}"),
                        "chosen": a["content"],
                        "rejected": b["content"],
                        "id": f"pair-{a['id']}-{b['id']}",
                        "chosen_id": a["id"],
                        "rejected_id": b["id"],
                        "rating_ids": used,
                    }
                )
    return out


def conversation_records(store: FeedbackStore, ratings: dict[int, dict]) -> list[dict]:
    out = []
    for message_id, r in sorted(ratings.items()):
        if r["rating"] <= 0:
            continue
        path = store.path(message_id)
        if any(ratings.get(m["id"], r)["rating"] < 0 for m in path if m["role"] == "assistant"):
            continue  # an answer the user rated down on the way: SFT would learn it
        system = path[-2]["system"] if len(path) > 1 else ""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m["role"], "content": m["content"]} for m in path
        ]
        out.append(
            {
                "messages": messages,
                "id": f"conversation-{message_id}",
                "message_ids": [m["id"] for m in path],
                "rating_id": r["id"],
            }
        )
    return out


def export(db: str, out_dir: str) -> dict[str, int]:
    """Write the three files; returns how many records each got."""
    store = FeedbackStore(db, readonly=True)
    try:
        ratings = _latest_ratings(store)
        files = {
            "feedback": feedback_records(store, ratings),
            "pairs": pair_records(store, ratings),
            "conversations": conversation_records(store, ratings),
        }
    finally:
        store.close()
    os.makedirs(out_dir, exist_ok=True)
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        fileio.write_atomic(os.path.join(out_dir, f"{name}.jsonl"), text)
    return {name: len(records) for name, records in files.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.feedback", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("export", help="write feedback, pairs and conversations JSONL files")
    cmd.add_argument("--db", required=True, help="the feedback database (RUN/feedback.sqlite)")
    cmd.add_argument("--out", required=True, help="directory for the JSONL files")
    args = parser.parse_args(argv)
    counts = export(args.db, args.out)
    print(", ".join(f"{n} {name} records" for name, n in counts.items()) + f" written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
