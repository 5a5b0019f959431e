"""PostgreSQL forwarder: the journal into a schema made for querying (psycopg 3).

Tables (``labd/hub/sql/*.sql``, applied in order by :func:`migrate`, recorded in
``schema_version``): ``runs`` (start and stop merged: plan, protocol, campaign, times, exit
status, the start document as JSONB), ``descriptors``, ``events`` (data and timestamps as JSONB),
``samples`` (typed columns, see :mod:`labd.samples`) and ``other_documents`` (resource, datum,
stream_resource, stream_datum). Each batch of documents is one transaction of upserts keyed by
document uid (``ON CONFLICT DO NOTHING``, or ``DO UPDATE`` where a later document completes a row:
a run's stop, a re-measured sample), so a batch delivered twice is stored once.

Several cells may share one hub database: rows carry the ``cell`` name; migrations take an
advisory lock, so two daemons starting at once do not both migrate.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from labd.hub.base import Forwarder, HubError, RunDocuments
from labd.journal import Journal, JournalRecord
from labd.samples import SAMPLE_STREAM

_MIGRATION_LOCK = 0x6C616264  # "labd"


def migrations() -> list[tuple[int, str, str]]:
    """``(version, file name, SQL)`` of every migration shipped, in order."""
    out = []
    for f in resources.files("labd.hub").joinpath("sql").iterdir():
        m = re.match(r"(\d+)_.*\.sql$", f.name)
        if m:
            out.append((int(m.group(1)), f.name, f.read_text(encoding="utf-8")))
    return sorted(out)


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Create or upgrade the hub schema; returns the schema version now in force."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        for version, name, sql in migrations():
            if version > current:
                await conn.execute(sql.encode())
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
                current = version
    return current


_START = """
INSERT INTO runs (uid, cell, plan_name, protocol, campaign, sample_id, start_time, metadata)
VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), %s)
ON CONFLICT (uid) DO NOTHING"""
_STOP = """
UPDATE runs SET stop_uid = %s, stop_time = to_timestamp(%s), exit_status = %s, reason = %s,
    num_events = %s, stop_doc = %s
WHERE uid = %s"""
_DESCRIPTOR = """
INSERT INTO descriptors (uid, run_uid, name, time, data_keys, configuration, doc)
VALUES (%s, %s, %s, to_timestamp(%s), %s, %s, %s)
ON CONFLICT (uid) DO NOTHING"""
_EVENT = """
INSERT INTO events (uid, descriptor_uid, run_uid, stream, seq_num, time, data, timestamps, filled)
VALUES (%s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)
ON CONFLICT (uid) DO NOTHING"""
_SAMPLE = """
INSERT INTO samples (sample_id, run_uid, event_uid, cell, campaign, protocol, time,
    target_composition, measured_composition, dosed_mg, anneal_c, anneal_s,
    property_name, property_value, property_unit, extra)
VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (sample_id) DO UPDATE SET
    run_uid = excluded.run_uid, event_uid = excluded.event_uid, cell = excluded.cell,
    campaign = excluded.campaign, protocol = excluded.protocol, time = excluded.time,
    target_composition = excluded.target_composition,
    measured_composition = excluded.measured_composition, dosed_mg = excluded.dosed_mg,
    anneal_c = excluded.anneal_c, anneal_s = excluded.anneal_s,
    property_name = excluded.property_name, property_value = excluded.property_value,
    property_unit = excluded.property_unit, extra = excluded.extra"""
_OTHER = """
INSERT INTO other_documents (uid, name, run_uid, time, doc)
VALUES (%s, %s, %s, to_timestamp(%s), %s)
ON CONFLICT (uid) DO NOTHING"""


class PostgresForwarder(Forwarder):
    """``conninfo`` is a libpq connection string or URL without the password (it is shown in
    the status); the password is passed apart."""

    def __init__(
        self,
        journal: Journal,
        *,
        cell: str,
        conninfo: str,
        password: str | None = None,
        name: str = "postgres",
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, journal, **kwargs)
        self.cell = cell
        self.conninfo = conninfo
        self.password = password
        self.connect_timeout = connect_timeout
        params = conninfo_to_dict(conninfo)
        self.host = str(params.get("host", "localhost"))
        self.port = str(params.get("port", "5432"))
        self.user = str(params.get("user", ""))
        self.dbname = str(params.get("dbname", ""))
        self.target = f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"
        self.schema_version: int | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._docs = RunDocuments(journal)

    async def connect(self) -> None:
        extra: dict[str, Any] = {"connect_timeout": max(1, round(self.connect_timeout)),
                                 "application_name": f"labd-{self.cell}"}
        if self.password is not None:
            extra["password"] = self.password
        conn = await psycopg.AsyncConnection.connect(self.conninfo, **extra)
        try:
            self.schema_version = await migrate(conn)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def describe_error(self, exc: BaseException) -> str:
        where = f"PostgreSQL at {self.host}:{self.port}"
        text = " ".join(str(exc).split())
        if "password authentication failed" in text or "no password supplied" in text:
            return (f"{where} rejected the login of user {self.user!r}: password authentication"
                    " failed (check the user and password in the config)")
        if "Connection refused" in text:
            return f"cannot reach {where}: connection refused (is the server running?)"
        if "could not translate host name" in text or "failed to resolve host" in text:
            return f"cannot reach {where}: unknown host {self.host!r}"
        if "timeout expired" in text:
            return f"cannot reach {where}: no answer within {self.connect_timeout:g} s"
        if isinstance(exc, psycopg.OperationalError):
            return f"lost the connection to {where}: {text}"
        if isinstance(exc, psycopg.Error):
            return f"{where} refused a write: {text}"
        return super().describe_error(exc)

    async def deliver(self, records: list[JournalRecord]) -> None:
        conn = self._conn
        if conn is None:
            raise HubError(f"not connected to PostgreSQL at {self.host}:{self.port}")
        starts: list[tuple[Any, ...]] = []
        stops: list[tuple[Any, ...]] = []
        descriptors: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        samples: list[tuple[Any, ...]] = []
        others: list[tuple[Any, ...]] = []
        for rec in records:
            doc = rec.doc
            self._docs.note(rec)
            if rec.name == "start":
                starts.append((rec.uid, self.cell, doc.get("plan_name"), doc.get("protocol"),
                               doc.get("campaign"), _text(doc.get("sample_id")), doc["time"],
                               Jsonb(doc)))
            elif rec.name == "stop":
                stops.append((rec.uid, doc["time"], doc.get("exit_status"), doc.get("reason"),
                              Jsonb(doc.get("num_events")), Jsonb(doc), rec.run_uid))
            elif rec.name == "descriptor":
                descriptors.append((rec.uid, rec.run_uid, rec.stream or "primary", doc["time"],
                                    Jsonb(doc["data_keys"]), Jsonb(doc.get("configuration")),
                                    Jsonb(doc)))
            elif rec.name == "event":
                events.append((rec.uid, doc["descriptor"], rec.run_uid, rec.stream or "",
                               doc["seq_num"], doc["time"], Jsonb(doc["data"]),
                               Jsonb(doc["timestamps"]), Jsonb(doc.get("filled"))))
                if rec.stream == SAMPLE_STREAM:
                    row = await self._docs.sample(rec)
                    if row is not None:
                        samples.append((
                            row.sample_id, row.run_uid, row.event_uid, self.cell, row.campaign,
                            row.protocol, row.time, Jsonb(row.target_composition),
                            Jsonb(row.measured_composition), Jsonb(row.dosed_mg), row.anneal_c,
                            row.anneal_s, row.property_name, row.property_value,
                            row.property_unit, Jsonb(row.extra)))
            else:
                others.append((rec.uid, rec.name, rec.run_uid, rec.time, Jsonb(doc)))
        # One transaction; the order of the statements keeps every foreign key satisfied
        # (a run's start precedes its descriptors, which precede their events).
        async with conn.transaction(), conn.cursor() as cur:
            for sql, rows in ((_START, starts), (_DESCRIPTOR, descriptors), (_EVENT, events),
                              (_STOP, stops), (_SAMPLE, samples), (_OTHER, others)):
                if rows:
                    await cur.executemany(sql, rows)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
