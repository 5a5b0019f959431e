"""The document journal: every Bluesky document, durable and in order, in SQLite (WAL).

The journal is the first subscriber of the RunEngine and the cell's own store. Everything that
leaves the cell (the hub forwarders in :mod:`labd.hub`) reads documents *from the journal*, only
once they are committed, so nothing reaches the hub that a crash could take back from the cell.

::

    journal = Journal(data_dir / "journal.sqlite")
    token = RE.subscribe(journal.subscriber)        # subscribe it first
    RE(plan)
    journal.flush()                                  # everything emitted so far is on disk
    journal.runs(campaign="fe-co-ni", since=t0)      # -> list[RunInfo]
    journal.run_documents(run_uid)                   # -> list[JournalRecord], in order
    journal.read_after(seq, limit=500)               # what a forwarder reads
    journal.close()                                  # drains the queue, then closes

Design:

* **Never blocks the RunEngine on disk I/O.** :meth:`Journal.append` (the subscriber) assigns the
  next sequence number and puts the document on an in-memory queue; a writer thread takes
  everything queued, encodes it as JSON and commits it in one transaction (group commit): it
  commits at most every ``commit_interval`` (20 ms) unless a caller waits for durability, and
  the more documents arrive, the larger the batches, so one fsync serves thousands of documents.
  Documents must not be mutated after they were emitted (event-model's own contract): they are
  encoded by the writer thread, a moment later.
* **Durability on request.** :meth:`Journal.wait_durable` blocks until a given sequence number is
  committed; :meth:`Journal.flush` until everything appended so far is. ``synchronous=FULL`` by
  default: a committed batch survives a power cut, not just a killed process.
* **Crash safety.** A batch is one SQLite transaction: a SIGKILL loses at most the documents not
  yet committed, never part of a batch, and sequence numbers stay contiguous from 1.
* **One row per document, with uid.** Columns: ``seq`` (1, 2, 3, ... without gaps), ``name``,
  ``uid`` (a start/stop/descriptor/event/resource uid, a datum's ``datum_id``, a stream_datum's
  ``uid``), ``run_uid``, ``stream`` (descriptor and event: the stream name), ``time`` and the
  JSON document (strict JSON: a NaN or infinite reading is stored as ``null``).
  ``event_page`` and ``datum_page`` documents are **unpacked** into ``event`` and ``datum`` rows
  on arrival (event-model's ``unpack_*_page``), so every row has its own uid and the hub's
  upsert-by-uid applies to every document alike.
* ``runs`` is a summary table kept in the same transactions (plan, protocol, campaign, sample,
  start and stop times, exit status, number of events), for ``labctl runs`` and run filters.
* ``cursors`` holds each forwarder's last forwarded sequence number (:meth:`Journal.get_cursor`,
  :meth:`Journal.set_cursor`).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from event_model import unpack_datum_page, unpack_event_page

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    seq     INTEGER PRIMARY KEY,
    name    TEXT NOT NULL,
    uid     TEXT NOT NULL,
    run_uid TEXT,
    stream  TEXT,
    time    REAL NOT NULL,
    doc     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_run ON documents (run_uid, seq);
CREATE TABLE IF NOT EXISTS runs (
    uid         TEXT PRIMARY KEY,
    start_seq   INTEGER NOT NULL,
    start_time  REAL NOT NULL,
    plan_name   TEXT,
    protocol    TEXT,
    campaign    TEXT,
    sample_id   TEXT,
    stop_time   REAL,
    exit_status TEXT,
    reason      TEXT,
    num_events  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_time ON runs (start_time);
CREATE TABLE IF NOT EXISTS cursors (
    name    TEXT PRIMARY KEY,
    seq     INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""


class JournalClosed(RuntimeError):
    """The journal was closed (or its writer failed): it takes no more documents."""


@dataclass(frozen=True)
class JournalRecord:
    """One journaled document. ``doc_json`` is the stored JSON text (what forwarders send)."""

    seq: int
    name: str
    uid: str
    run_uid: str | None
    stream: str | None
    time: float
    doc_json: str

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.doc_json)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table."""

    uid: str
    start_seq: int
    start_time: float
    plan_name: str | None
    protocol: str | None
    campaign: str | None
    sample_id: str | None
    stop_time: float | None
    exit_status: str | None
    reason: str | None
    num_events: int


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays (as ophyd-async readings carry them) to plain JSON."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return obj


def encode(doc: dict[str, Any]) -> str:
    """Strict JSON (what PostgreSQL's JSONB and any MQTT consumer accept): NaN and infinities,
    which JSON cannot express, are stored as ``null``."""
    try:
        return json.dumps(doc, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(doc), separators=(",", ":"), default=_json_default,
                          allow_nan=False)


def _expand(name: str, doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if name == "event_page":
        for ev in unpack_event_page(doc):
            yield "event", ev
    elif name == "datum_page":
        for dt in unpack_datum_page(doc):
            yield "datum", dt
    else:
        yield name, doc


def document_uid(name: str, doc: dict[str, Any]) -> str:
    if name == "datum":
        return str(doc["datum_id"])
    return str(doc["uid"])


class Journal:
    """Durable, ordered store of Bluesky documents (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        max_batch: int = 20_000,
        commit_interval: float = 0.02,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self._waiters = 0  # threads in wait_durable: commit at once, do not gather
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[int, str, dict[str, Any]]] = collections.deque()
        self._closing = False
        self._error: BaseException | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self.batches = 0  # committed transactions (group commit statistics)

        db = self._connect()
        db.executescript(SCHEMA)
        row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM documents").fetchone()
        self._next_seq = int(row[0]) + 1  # next to assign (under _lock)
        self._durable_seq = int(row[0])  # last committed (under _lock)
        # descriptor/resource uid -> (run uid, stream) for the rows whose documents only name
        # their parent; filled lazily from the database after a restart.
        self._parents: dict[str, tuple[str | None, str | None]] = {}
        self._writer_db = db
        self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._writer.start()

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _reader(self) -> sqlite3.Connection:
        """A connection of the calling thread's own (sqlite3 connections are not shared)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    # -- appending ------------------------------------------------------------------------------
    def append(self, name: str, doc: dict[str, Any]) -> int:
        """Queue a document for the journal; returns its (last) sequence number at once."""
        with self._lock:
            if self._closing or self._error is not None:
                raise JournalClosed(f"journal {self.path} is closed" + (
                    f" (writer failed: {self._error})" if self._error else ""))
            was_empty = not self._queue
            for n, d in _expand(name, doc):
                seq = self._next_seq
                self._next_seq += 1
                self._queue.append((seq, n, d))
            # Wake the writer only when it has something new to decide: the first document
            # after a commit (it then gathers until its commit interval ends) or a full batch.
            # A notify per document woke it a thousand times a second for nothing, each time
            # taking the GIL from the RunEngine's thread (bp.count: 1.39x -> see the bench).
            if was_empty or len(self._queue) >= self.max_batch:
                self._cond.notify()
            return self._next_seq - 1

    def subscriber(self, name: str, doc: dict[str, Any]) -> None:
        """The RunEngine callback: ``RE.subscribe(journal.subscriber)``."""
        self.append(name, doc)

    __call__ = subscriber

    @property
    def last_seq(self) -> int:
        """The last sequence number assigned (appended, maybe not yet durable)."""
        with self._lock:
            return self._next_seq - 1

    @property
    def durable_seq(self) -> int:
        """The last sequence number committed to disk."""
        with self._lock:
            return self._durable_seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block until document ``seq`` is committed; False on timeout. Raises if the writer
        failed (the document will never be durable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self._durable_seq < seq:
                    if self._error is not None:
                        raise JournalClosed(
                            f"journal writer failed: {self._error}") from self._error
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._waiters -= 1

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything appended so far is committed."""
        return self.wait_durable(self.last_seq, timeout)

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """``callback(durable_seq)`` after every commit, called on the writer thread (keep it
        cheap: e.g. ``loop.call_soon_threadsafe(event.set)``)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[int], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain the queue to disk, stop the writer, close every connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout)
        with self._lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()
        self._writer_db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread --------------------------------------------------------------------------
    def _write_loop(self) -> None:
        last_commit = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                # Group commit: gather what arrives within ``commit_interval`` of the last
                # commit (unless someone waits for durability, or the batch is full). A live
                # run emits a document every millisecond or so; one commit per document would
                # take the GIL from the RunEngine's thread a thousand times a second.
                deadline = last_commit + self.commit_interval
                while (not self._closing and self._waiters == 0
                       and len(self._queue) < self.max_batch
                       and (remaining := deadline - time.monotonic()) > 0):
                    self._cond.wait(remaining)
                n = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(n)]
            try:
                self._commit(batch)
            except BaseException as exc:  # disk full, database corrupted: say so, loudly
                log.exception("journal %s: commit of %d documents failed", self.path, len(batch))
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            last = batch[-1][0]
            last_commit = time.monotonic()
            with self._cond:
                self._durable_seq = last
                self.batches += 1
                self._cond.notify_all()
            for cb in list(self._listeners):
                try:
                    cb(last)
                except Exception:
                    log.exception("journal listener %r failed", cb)

    def _parent(self, db: sqlite3.Connection, uid: str) -> tuple[str | None, str | None]:
        hit = self._parents.get(uid)
        if hit is None:
            row = db.execute(
                "SELECT run_uid, stream FROM documents WHERE uid = ? AND name IN "
                "('descriptor', 'resource', 'stream_resource') ORDER BY seq DESC LIMIT 1",
                (uid,),
            ).fetchone()
            hit = (row[0], row[1]) if row else (None, None)
            self._parents[uid] = hit
        return hit

    def _commit(self, batch: list[tuple[int, str, dict[str, Any]]]) -> None:
        db = self._writer_db
        rows: list[tuple[int, str, str, str | None, str | None, float, str]] = []
        starts: list[tuple[Any, ...]] = []
        stops: list[tuple[Any, ...]] = []
        events_per_run: collections.Counter[str] = collections.Counter()
        for seq, name, doc in batch:
            run_uid: str | None = None
            stream: str | None = None
            uid = document_uid(name, doc)
            if name == "start":
                run_uid = uid
                starts.append((
                    uid, seq, float(doc["time"]), doc.get("plan_name"), doc.get("protocol"),
                    doc.get("campaign"), _as_text(doc.get("sample_id")),
                ))
            elif name == "stop":
                run_uid = doc["run_start"]
                stops.append((float(doc["time"]), doc.get("exit_status"), doc.get("reason"),
                              run_uid))
            elif name == "descriptor":
                run_uid, stream = doc["run_start"], doc.get("name", "primary")
                self._parents[uid] = (run_uid, stream)
            elif name == "event":
                run_uid, stream = self._parent(db, doc["descriptor"])
                if run_uid is not None:
                    events_per_run[run_uid] += 1
            elif name in ("resource", "stream_resource"):
                run_uid = doc.get("run_start")
                self._parents[uid] = (run_uid, None)
            elif name == "datum":
                run_uid = self._parent(db, doc["resource"])[0]
            elif name == "stream_datum":
                run_uid = self._parent(db, doc["stream_resource"])[0]
            t = doc.get("time")
            rows.append((seq, name, uid, run_uid, stream,
                         float(t) if t is not None else time.time(), encode(doc)))
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if starts:
                db.executemany(
                    "INSERT OR IGNORE INTO runs (uid, start_seq, start_time, plan_name, protocol,"
                    " campaign, sample_id) VALUES (?, ?, ?, ?, ?, ?, ?)", starts)
            if events_per_run:
                db.executemany("UPDATE runs SET num_events = num_events + ? WHERE uid = ?",
                               [(n, uid) for uid, n in events_per_run.items()])
            if stops:
                db.executemany(
                    "UPDATE runs SET stop_time = ?, exit_status = ?, reason = ? WHERE uid = ?",
                    stops)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- queries --------------------------------------------------------------------------------
    def read_after(self, seq: int, limit: int = 1000) -> list[JournalRecord]:
        """Committed documents with sequence number > ``seq``, in order (what forwarders read)."""
        cur = self._reader().execute(
            "SELECT seq, name, uid, run_uid, stream, time, doc FROM documents"
            " WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [JournalRecord(*r) for r in cur]

    def run_documents(self, run_uid: str) -> list[JournalRecord]:
        """Every document of one run, in the order it was emitted."""
        cur = self._reader().execute(
            "SELECT seq, name, uid, run_uid, stream, time, doc FROM documents"
            " WHERE run_uid = ? ORDER BY seq", (run_uid,))
        return [JournalRecord(*r) for r in cur]

    def documents(self, run_uid: str, names: Iterable[str], stream: str | None = None,
                  ) -> list[JournalRecord]:
        """The documents of a run with the given names (and stream, if given), in order."""
        names = list(names)
        sql = ("SELECT seq, name, uid, run_uid, stream, time, doc FROM documents WHERE run_uid = ?"
               f" AND name IN ({','.join('?' * len(names))})")
        args: list[Any] = [run_uid, *names]
        if stream is not None:
            sql += " AND stream = ?"
            args.append(stream)
        return [JournalRecord(*r) for r in self._reader().execute(sql + " ORDER BY seq", args)]

    def runs(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        plan_name: str | None = None,
        protocol: str | None = None,
        campaign: str | None = None,
        limit: int | None = None,
    ) -> list[RunInfo]:
        """Runs started in [since, until), newest last, filtered by plan, protocol, campaign."""
        where, args = [], []
        for clause, value in (("start_time >= ?", since), ("start_time < ?", until),
                              ("plan_name = ?", plan_name), ("protocol = ?", protocol),
                              ("campaign = ?", campaign)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = ("SELECT uid, start_seq, start_time, plan_name, protocol, campaign, sample_id,"
               " stop_time, exit_status, reason, num_events FROM runs")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_seq"
        if limit is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY start_seq"
        return [RunInfo(*r) for r in self._reader().execute(sql, args)]

    def run(self, run_uid: str) -> RunInfo | None:
        row = self._reader().execute(
            "SELECT uid, start_seq, start_time, plan_name, protocol, campaign, sample_id,"
            " stop_time, exit_status, reason, num_events FROM runs WHERE uid = ?",
            (run_uid,)).fetchone()
        return RunInfo(*row) if row else None

    def count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    # -- forwarder cursors ----------------------------------------------------------------------
    def get_cursor(self, name: str) -> int:
        """The last sequence number forwarder ``name`` delivered (0: nothing yet)."""
        row = self._reader().execute("SELECT seq FROM cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        """Record (durably) that forwarder ``name`` delivered everything up to ``seq``."""
        self._reader().execute(
            "INSERT INTO cursors (name, seq, updated) VALUES (?, ?, ?) ON CONFLICT (name)"
            " DO UPDATE SET seq = excluded.seq, updated = excluded.updated",
            (name, seq, time.time()))


def _as_text(value: Any) -> str | None:
    return None if value is None else str(value)
