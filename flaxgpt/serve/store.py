"""The feedback database: every chat turn, answer, rating, regeneration and edit, in SQLite.

One transaction per event, committed before the browser is answered, in WAL mode with full
synchronisation: an acknowledged row survives the server being killed. Messages form a tree
(`parent_id`): a regenerated answer is a sibling of the answer it replaces, an edited user turn
a sibling of the turn it revises (`revises_id` names the replaced row in both cases), and a
follow-up is a child. The schema carries a version; `MIGRATIONS[v]` takes a database from
version v to v + 1, each in its own transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import urllib.request
from typing import Any

from flaxgpt.errors import UserError

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (id INTEGER PRIMARY KEY, created REAL NOT NULL);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        parent_id INTEGER REFERENCES messages(id),
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        system TEXT NOT NULL DEFAULT '',        -- user turns: the system message they were asked under
        kind TEXT NOT NULL CHECK (kind IN ('message', 'regeneration', 'edit')),
        revises_id INTEGER REFERENCES messages(id),
        step INTEGER,                           -- answers: the checkpoint step that produced them
        settings TEXT,                          -- answers: decoding settings (JSON)
        finish_reason TEXT,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    CREATE TABLE ratings (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages(id),
        rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
        comment TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


_NEW_CONVERSATION = "INSERT INTO conversations (created) VALUES (?)"
_TEXT = {"messages": ("role", "content", "system", "kind"), "ratings": ("comment",)}  # checked on reading


def _message(
    conversation_id: int,
    parent_id: int | None,
    role: str,
    content: str,
    *,
    system: str = "",
    kind: str = "message",
    revises_id: int | None = None,
    step: int | None = None,
    settings: dict | None = None,
    finish_reason: str | None = None,
) -> tuple[str, tuple]:
    """The INSERT of one message row."""
    return (
        "INSERT INTO messages (conversation_id, parent_id, role, content, system, kind, revises_id, step,"
        " settings, finish_reason, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            conversation_id,
            parent_id,
            role,
            content,
            system,
            kind,
            revises_id,
            step,
            None if settings is None else json.dumps(settings, sort_keys=True),
            finish_reason,
            time.time(),
        ),
    )


class StoreError(UserError):
    """The database cannot be used (a newer schema, or not a feedback database)."""


class FeedbackStore:
    """The database, shared by the server's threads (one connection, one lock)."""

    def __init__(self, path: str, readonly: bool = False):
        """readonly: open an existing feedback database without writing to it (no migration: a
        file that is not one at the current schema is a StoreError)."""
        self.file = path
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = read_only(path)
                check_schema(self._db, path)
            else:
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                wal(self._db)
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                migrate(self._db, path)
            self._db.row_factory = sqlite3.Row
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a usable feedback database ({e})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self):
        """The connection inside one write transaction: everything in it is stored, or nothing."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    def _write(self, sql: str, args: tuple) -> int:
        with self._transaction() as db:
            return db.execute(sql, args).lastrowid

    def new_conversation(self) -> int:
        return self._write(_NEW_CONVERSATION, (time.time(),))

    def add_message(self, conversation_id: int, parent_id: int | None, role: str, content: str, **fields) -> int:
        """fields: system, kind, revises_id, step, settings (a dict), finish_reason."""
        return self._write(*_message(conversation_id, parent_id, role, content, **fields))

    def add_turn(self, conversation_id: int | None, parent_id: int | None, content: str, **fields) -> tuple[int, int]:
        """(conversation, message): a user turn, in a new conversation when `conversation_id` is
        None, both stored in one transaction (a refused insert leaves no empty conversation)."""
        with self._transaction() as db:
            if conversation_id is None:
                conversation_id = db.execute(_NEW_CONVERSATION, (time.time(),)).lastrowid
            return conversation_id, db.execute(
                *_message(conversation_id, parent_id, "user", content, **fields)
            ).lastrowid

    def rate(self, message_id: int, rating: int, comment: str = "") -> int:
        return self._write(
            "INSERT INTO ratings (message_id, rating, comment, created) VALUES (?, ?, ?, ?)",
            (message_id, rating, comment, time.time()),
        )

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return [dict(row) for row in self._db.execute(sql, args)]
            except sqlite3.DatabaseError as e:  # a damaged database (a table dropped, a file overwritten)
                raise StoreError(f"{self.file}: not a usable feedback database ({e})") from None

    def checked(self, row: dict[str, Any], table: str) -> dict[str, Any]:
        """`row` of `table` ("messages" or "ratings"), or a StoreError naming it when a value is
        not of its column's kind (a database edited by hand: SQLite stores any type anywhere)."""
        bad = [k for k in _TEXT[table] if not isinstance(row[k], str)]
        if table == "ratings" and (type(row["rating"]) is not int or row["rating"] not in (-1, 1)):
            bad.append("rating")
        if bad:
            value, want = row[bad[0]], "1 or -1" if bad[0] == "rating" else "text"
            raise StoreError(
                f"{self.file}: {table} row {row['id']}: {bad[0]} is {type(value).__name__} {str(value)[:40]!r},"
                f" expected {want} (a damaged database)"
            )
        return row

    def message(self, message_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM messages WHERE id = ?", (message_id,))
        return self.checked(rows[0], "messages") if rows else None

    def row(self, message_id: int, referrer: str) -> dict[str, Any]:
        """Message `message_id`, which `referrer` (a row of this database) names; a StoreError
        naming both when it is missing (a database edited by hand)."""
        row = self.message(message_id)
        if row is None:
            raise StoreError(
                f"{self.file}: {referrer} names message {message_id}, which is missing (a damaged database)"
            )
        return row

    def path(self, message_id: int | None, referrer: str = "a row") -> list[dict[str, Any]]:
        """The messages from the conversation's start down to `message_id` (which `referrer`
        names), oldest first."""
        out: list[dict[str, Any]] = []
        while message_id is not None:
            if any(m["id"] == message_id for m in out):  # parent_id loops (a database edited by hand)
                raise StoreError(
                    f"{self.file}: message {out[-1]['id']} has parent {message_id}, which descends from it"
                    " (a parent_id cycle: a damaged database)"
                )
            out.append(self.row(message_id, f"message {out[-1]['id']}" if out else referrer))
            message_id = out[-1]["parent_id"]
        return out[::-1]


def read_only(path: str) -> sqlite3.Connection:
    """A connection that cannot write to (or create) `path`."""
    if not os.path.isfile(path):
        raise StoreError(f"{path}: no such feedback database")
    uri = "file:" + urllib.request.pathname2url(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, check_same_thread=False)


def check_schema(db: sqlite3.Connection, path: str) -> None:
    """A StoreError unless `db` is a feedback database at SCHEMA_VERSION with its tables."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    _not_newer(version, path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = sorted({"conversations", "messages", "ratings"} - tables)
    if version < SCHEMA_VERSION or missing:
        raise StoreError(f"{path}: not a feedback database" + (f" (no {', '.join(missing)} table)" if missing else ""))


def _not_newer(version: int, path: str) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has feedback schema version {version}; this flaxgpt reads up to {SCHEMA_VERSION}")


def wal(db: sqlite3.Connection, wait: float = 30.0) -> None:
    """WAL mode. Connections switching a new database to it at once may fail at once with
    "database is locked" (SQLite does not wait its busy timeout there): retried for `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the database to SCHEMA_VERSION, one migration per transaction. The version is read
    again inside each transaction, so processes opening a new database at once (the server and the
    online learner) apply each migration once."""
    while (version := db.execute("PRAGMA user_version").fetchone()[0]) != SCHEMA_VERSION:
        _not_newer(version, path)
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == version:  # no one migrated it meanwhile
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
