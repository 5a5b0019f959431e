"""The daemon's durable state: the protocol queue and the run history, in SQLite (WAL).

Invariants that make a SIGKILL harmless:

* An item is always in exactly one place: queued, or in the history. Taking the next item moves it
  from the queue to the history as ``running`` in one transaction, *before* the RunEngine is
  called, so a crash never loses it and never runs it twice.
* At start-up, a history entry still ``running`` belongs to a daemon that died: it is marked
  ``interrupted`` (what was in progress is reported, never silently repeated).
* Every change is committed before the call returns (``synchronous=FULL`` for the queue: it is
  small, and losing an acknowledged request is not acceptable).

The store is thread-safe (one connection, one lock): the worker thread that drives the RunEngine
and the API on the event loop (through an executor) both use it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    item_uid   TEXT PRIMARY KEY,
    position   REAL NOT NULL,
    protocol   TEXT NOT NULL,
    params     TEXT NOT NULL,
    user       TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_position ON queue(position);
CREATE TABLE IF NOT EXISTS history (
    item_uid    TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    protocol    TEXT NOT NULL,
    params      TEXT NOT NULL,
    user        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    status      TEXT NOT NULL,
    error       TEXT,
    run_uids    TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS history_seq ON history(seq);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class ExitStatus(StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    ABORTED = "aborted"
    STOPPED = "stopped"
    HALTED = "halted"
    INTERRUPTED = "interrupted"


class StoreError(ValueError):
    """A queue operation that cannot be done (unknown item, bad position)."""


@dataclass
class QueueItem:
    protocol: str
    params: dict[str, Any]
    user: str
    source: str
    item_uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HistoryEntry:
    item_uid: str
    protocol: str
    params: dict[str, Any]
    user: str
    source: str
    created_at: float
    started_at: float
    finished_at: float | None
    status: ExitStatus
    error: str | None
    run_uids: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = str(self.status)
        return d


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- recovery ----------------------------------------------------------------------------------
    def recover(self) -> list[HistoryEntry]:
        """Mark what a dead daemon left ``running`` as ``interrupted``; return those entries."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM history WHERE status = ?", (ExitStatus.RUNNING,))
            stale = [self._history(r) for r in rows.fetchall()]
            db.execute(
                "UPDATE history SET status = ?, finished_at = ?, "
                "error = 'the daemon stopped while this was running' WHERE status = ?",
                (ExitStatus.INTERRUPTED, time.time(), ExitStatus.RUNNING),
            )
        for e in stale:
            e.status = ExitStatus.INTERRUPTED
        return stale

    # -- queue -------------------------------------------------------------------------------------
    def _positions(self, db: sqlite3.Connection) -> list[tuple[str, float]]:
        return [(r[0], r[1]) for r in db.execute(
            "SELECT item_uid, position FROM queue ORDER BY position")]

    @staticmethod
    def _position_for(positions: list[tuple[str, float]], index: int | None) -> float:
        n = len(positions)
        if index is None or index >= n:
            return positions[-1][1] + 1.0 if positions else 1.0
        if index < 0:
            raise StoreError(f"position {index} is negative")
        if index == 0:
            return positions[0][1] - 1.0
        return (positions[index - 1][1] + positions[index][1]) / 2.0

    def add(self, item: QueueItem, index: int | None = None) -> QueueItem:
        return self.add_batch([item], index)[0]

    def add_batch(self, items: Iterable[QueueItem], index: int | None = None) -> list[QueueItem]:
        """Add items (in order) at ``index`` (None: the end). All or nothing."""
        items = list(items)
        with self._tx() as db:
            for offset, item in enumerate(items):
                if db.execute("SELECT 1 FROM history WHERE item_uid = ?",
                              (item.item_uid,)).fetchone():
                    raise StoreError(f"item {item.item_uid!r} has already run (it is in the "
                                     "history); an item runs once")
                positions = self._positions(db)
                pos = self._position_for(positions, None if index is None else index + offset)
                db.execute(
                    "INSERT INTO queue VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item.item_uid, pos, item.protocol, json.dumps(item.params), item.user,
                     item.source, item.created_at),
                )
        return items

    def queue(self) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM queue ORDER BY position").fetchall()
        return [self._item(r) for r in rows]

    def where(self, item_uid: str) -> Literal["queue", "history"] | None:
        """Where the item is, in one look: queued, in the history (running or finished), or
        unknown. Two separate looks (history, then queue) race the worker, which moves an item
        from the queue to the history in between: the item would seem to be nowhere."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM queue WHERE item_uid = ?",
                                (item_uid,)).fetchone():
                return "queue"
            if self._db.execute("SELECT 1 FROM history WHERE item_uid = ?",
                                (item_uid,)).fetchone():
                return "history"
        return None

    def get(self, item_uid: str) -> QueueItem:
        with self._lock:
            row = self._db.execute("SELECT * FROM queue WHERE item_uid = ?", (item_uid,)).fetchone()
        if row is None:
            raise StoreError(f"no queued item {item_uid!r}")
        return self._item(row)

    def move(self, item_uid: str, index: int) -> None:
        with self._tx() as db:
            positions = [p for p in self._positions(db) if p[0] != item_uid]
            if len(positions) == len(self._positions(db)):
                raise StoreError(f"no queued item {item_uid!r}")
            pos = self._position_for(positions, index)
            db.execute("UPDATE queue SET position = ? WHERE item_uid = ?", (pos, item_uid))

    def remove(self, item_uid: str) -> QueueItem:
        with self._tx() as db:
            row = db.execute("SELECT * FROM queue WHERE item_uid = ?", (item_uid,)).fetchone()
            if row is None:
                raise StoreError(f"no queued item {item_uid!r}")
            db.execute("DELETE FROM queue WHERE item_uid = ?", (item_uid,))
        return self._item(row)

    def clear(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM queue").rowcount

    def take_next(self) -> HistoryEntry | None:
        """Move the first queued item into the history as ``running`` (one transaction)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM queue ORDER BY position LIMIT 1").fetchone()
            if row is None:
                return None
            return self._start(db, self._item(row), from_queue=True)

    def start_now(self, item: QueueItem) -> HistoryEntry:
        """Record an item run immediately (not through the queue) as ``running``."""
        with self._tx() as db:
            return self._start(db, item, from_queue=False)

    def _start(self, db: sqlite3.Connection, item: QueueItem, from_queue: bool) -> HistoryEntry:
        if from_queue:
            db.execute("DELETE FROM queue WHERE item_uid = ?", (item.item_uid,))
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM history").fetchone()[0]
        now = time.time()
        db.execute(
            "INSERT INTO history (item_uid, seq, protocol, params, user, source, created_at, "
            "started_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item.item_uid, seq, item.protocol, json.dumps(item.params), item.user, item.source,
             item.created_at, now, ExitStatus.RUNNING),
        )
        return HistoryEntry(item.item_uid, item.protocol, item.params, item.user, item.source,
                            item.created_at, now, None, ExitStatus.RUNNING, None, [])

    def add_run_uid(self, item_uid: str, run_uid: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT run_uids FROM history WHERE item_uid = ?",
                             (item_uid,)).fetchone()
            if row is None:
                raise StoreError(f"no history entry {item_uid!r}")
            uids = json.loads(row[0])
            if run_uid not in uids:
                uids.append(run_uid)
            db.execute("UPDATE history SET run_uids = ? WHERE item_uid = ?",
                       (json.dumps(uids), item_uid))

    def finish(self, item_uid: str, status: ExitStatus, error: str | None = None) -> HistoryEntry:
        with self._tx() as db:
            db.execute(
                "UPDATE history SET status = ?, error = ?, finished_at = ? WHERE item_uid = ?",
                (status, error, time.time(), item_uid),
            )
            row = db.execute("SELECT * FROM history WHERE item_uid = ?", (item_uid,)).fetchone()
        if row is None:
            raise StoreError(f"no history entry {item_uid!r}")
        return self._history(row)

    def history(self, limit: int = 100, offset: int = 0) -> list[HistoryEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM history ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [self._history(r) for r in rows]

    def history_entry(self, item_uid: str) -> HistoryEntry:
        with self._lock:
            row = self._db.execute("SELECT * FROM history WHERE item_uid = ?",
                                   (item_uid,)).fetchone()
        if row is None:
            raise StoreError(f"no history entry {item_uid!r}")
        return self._history(row)

    def clear_history(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM history WHERE status != ?",
                              (ExitStatus.RUNNING,)).rowcount

    # -- small settings ----------------------------------------------------------------------------
    def get_value(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_value(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO kv VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value", (key, json.dumps(value)))

    # -- rows --------------------------------------------------------------------------------------
    @staticmethod
    def _item(r: sqlite3.Row) -> QueueItem:
        return QueueItem(r["protocol"], json.loads(r["params"]), r["user"], r["source"],
                         r["item_uid"], r["created_at"])

    @staticmethod
    def _history(r: sqlite3.Row) -> HistoryEntry:
        return HistoryEntry(
            r["item_uid"], r["protocol"], json.loads(r["params"]), r["user"], r["source"],
            r["created_at"], r["started_at"], r["finished_at"], ExitStatus(r["status"]),
            r["error"], json.loads(r["run_uids"]),
        )
