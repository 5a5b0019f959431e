"""PostgreSQL forwarder against a real server the suite starts: schema, exactly-once storage
through a server outage and a SIGKILL of the forwarding process, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bluesky import plans as bp
from bluesky.run_engine import RunEngine
from ophyd_async.core import soft_signal_rw

from labd.hub import PostgresForwarder, migrate
from labd.journal import Journal
from tests.hub.conftest import in_re_loop, synthetic_run
from tests.support.postgres import PASSWORD_USER, PostgresServer
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


def hub_counts(conninfo: str) -> dict[str, Any]:
    with psycopg.connect(conninfo) as c:
        q = {
            "runs": "SELECT count(*) FROM runs",
            "stops": "SELECT count(*) FROM runs WHERE stop_uid IS NOT NULL",
            "descriptors": "SELECT count(*) FROM descriptors",
            "events": "SELECT count(*) FROM events",
        }
        return {k: c.execute(sql).fetchone()[0] for k, sql in q.items()}  # type: ignore[index]


def hub_uids(conninfo: str) -> list[str]:
    """Every document uid the hub holds, once per row (duplicates would show twice)."""
    with psycopg.connect(conninfo) as c:
        rows = c.execute(
            "SELECT uid FROM runs UNION ALL SELECT stop_uid FROM runs WHERE stop_uid IS NOT NULL"
            " UNION ALL SELECT uid FROM descriptors UNION ALL SELECT uid FROM events"
            " UNION ALL SELECT uid FROM other_documents").fetchall()
    return [r[0] for r in rows]


def journal_uids(journal: Journal) -> list[str]:
    return [r.uid for r in journal.read_after(0, limit=10**9)]


def forwarder(journal: Journal, conninfo: str, **kw: Any) -> PostgresForwarder:
    return PostgresForwarder(journal, cell="c1", conninfo=conninfo, backoff_initial=0.05,
                             backoff_max=0.5, connect_timeout=2, **kw)


async def test_schema_is_created_and_migrations_are_recorded_once(pg_conninfo: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_conninfo) as conn:
        assert await migrate(conn) == 1
        assert await migrate(conn) == 1  # idempotent
        cur = await conn.execute("SELECT version, name FROM schema_version")
        assert await cur.fetchall() == [(1, "001_initial.sql")]


async def test_everything_is_delivered_in_order_and_a_replay_is_stored_once(
    journal: Journal, pg_conninfo: str
) -> None:
    docs = synthetic_run(300, metadata={"campaign": "A", "protocol": "p"}) + synthetic_run(20)
    for n, d in docs:
        journal.append(n, d)
    fwd = forwarder(journal, pg_conninfo, batch_size=64)
    await fwd.start()
    try:
        await fwd.wait_delivered(len(docs), timeout=20)
    finally:
        await fwd.stop()
    assert hub_counts(pg_conninfo) == {"runs": 2, "stops": 2, "descriptors": 2, "events": 320}
    assert sorted(hub_uids(pg_conninfo)) == sorted(journal_uids(journal))
    st = fwd.status()
    assert (st.connected, st.backlog, st.delivered, st.cursor) == (False, 0, len(docs), len(docs))
    with psycopg.connect(pg_conninfo) as c:
        run = c.execute("SELECT plan_name, protocol, campaign, exit_status, num_events"
                        " FROM runs WHERE uid = %s", (docs[0][1]["uid"],)).fetchone()
        seq_nums = [r[0] for r in c.execute(
            "SELECT seq_num FROM events WHERE run_uid = %s ORDER BY time, seq_num",
            (docs[0][1]["uid"],))]
    assert run == ("synthetic", "p", "A", "success", {"primary": 1})
    assert seq_nums == list(range(1, 301))
    # Replay everything (a cursor lost, say): the hub still holds each document once.
    journal.set_cursor("postgres", 0)
    again = forwarder(journal, pg_conninfo)
    await again.start()
    try:
        await again.wait_delivered(len(docs), timeout=20)
    finally:
        await again.stop()
    assert again.delivered == len(docs)
    assert sorted(hub_uids(pg_conninfo)) == sorted(journal_uids(journal))


def test_database_outage_during_a_count_loses_nothing_and_stores_everything_once(
    RE: RunEngine, journal: Journal, pg_conninfo: str, postgres: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    RE.subscribe(journal.subscriber)
    sig = soft_signal_rw(float, name="x")
    in_re_loop(sig.connect())
    fwd = forwarder(journal, pg_conninfo, batch_size=50)
    in_re_loop(fwd.start())
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (RE(bp.count([sig], num=400, delay=0.003)), done.set()))
    try:
        worker.start()
        in_re_loop(fwd.wait_delivered(60, timeout=20))  # part of the run is in the hub
        postgres.stop()
        try:
            worker.join(30)
            assert done.is_set()  # the RunEngine finished while the hub was down
            journal.flush(timeout=10)
            assert journal.count() == 403
            in_re_loop(_wait(lambda: fwd.last_error is not None and not fwd.connected))
            st = fwd.status()
            assert st.backlog > 0 and st.cursor + st.backlog == 403
            assert "PostgreSQL at 127.0.0.1" in st.last_error  # type: ignore[operator]
        finally:
            postgres.start()
        in_re_loop(fwd.wait_delivered(403, timeout=30))
    finally:
        in_re_loop(fwd.stop())
    assert fwd.status().last_error is None
    assert hub_counts(pg_conninfo) == {"runs": 1, "stops": 1, "descriptors": 1, "events": 400}
    uids = hub_uids(pg_conninfo)
    assert len(uids) == len(set(uids)) and sorted(uids) == sorted(journal_uids(journal))
    assert any("forwarder postgres" in r.getMessage() for r in caplog.records)


async def _wait(predicate: Any, timeout: float = 15.0) -> None:
    from tests.support.procs import wait_for

    await wait_for(predicate, timeout=timeout)


async def test_wrong_password_is_said_plainly_and_the_journal_keeps_everything(
    journal: Journal, postgres: PostgresServer, pg_conninfo: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dbname = pg_conninfo.split("dbname=")[1].split()[0]
    docs = synthetic_run(10)
    for n, d in docs:
        journal.append(n, d)
    journal.flush(timeout=10)
    fwd = forwarder(journal, postgres.conninfo(dbname, user=PASSWORD_USER), password="wrong")
    await fwd.start()
    try:
        await _wait(lambda: fwd.last_error is not None)
    finally:
        await fwd.stop()
    st = fwd.status()
    assert st.last_error == (
        f"PostgreSQL at 127.0.0.1:{postgres.port} rejected the login of user 'labd_pw':"
        " password authentication failed (check the user and password in the config)")
    assert (st.connected, st.backlog, st.delivered) == (False, len(docs), 0)
    assert st.last_error in caplog.text
    assert journal.count() == len(docs) and journal.get_cursor("postgres") == 0
    # With the right password the same forwarder configuration delivers the backlog.
    from tests.support.postgres import PASSWORD

    ok = forwarder(journal, postgres.conninfo(dbname, user=PASSWORD_USER), password=PASSWORD)
    await ok.start()
    try:
        await ok.wait_delivered(len(docs), timeout=20)
    finally:
        await ok.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
async def test_unreachable_server_is_said_plainly(journal: Journal, host: str) -> None:
    journal.append(*synthetic_run(0)[0])
    journal.flush(timeout=10)
    port = free_port()
    fwd = forwarder(journal, f"host={host} port={port} dbname=hub user=labd")
    await fwd.start()
    try:
        await _wait(lambda: fwd.last_error is not None)
    finally:
        await fwd.stop()
    reason = ("connection refused (is the server running?)" if host == "127.0.0.1"
              else f"unknown host {host!r}")
    assert fwd.status().last_error == f"cannot reach PostgreSQL at {host}:{port}: {reason}"
    assert fwd.backlog == 1 and journal.count() == 1


CHILD = textwrap.dedent("""
    import asyncio, sys
    from labd.hub import MqttForwarder, PostgresForwarder
    from labd.journal import Journal
    from tests.hub.conftest import synthetic_run

    async def main(path, conninfo, mqtt_port, mode):
        j = Journal(path)
        fwds = [PostgresForwarder(j, cell="c1", conninfo=conninfo, batch_size=40)]
        if mqtt_port:
            fwds.append(MqttForwarder(j, cell="c1", host="127.0.0.1", port=int(mqtt_port),
                                      batch_size=40))
        for f in fwds:
            await f.start()
        if mode == "produce":  # documents keep coming while the forwarders deliver
            while True:
                for name, doc in synthetic_run(100):
                    j.append(name, doc)
                    await asyncio.sleep(0)
                print(min(f.cursor for f in fwds), flush=True)
                await asyncio.sleep(0.01)
        for f in fwds:  # drain: deliver the backlog, then exit
            await f.wait_delivered(j.durable_seq, timeout=60)
            await f.stop()
        j.close()

    asyncio.run(main(*sys.argv[1:]))
""")


def run_child(path: Path, conninfo: str, mqtt_port: int | None, mode: str
              ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), conninfo, str(mqtt_port or ""), mode],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkill_while_forwarding_then_restart_leaves_exactly_the_journal_in_the_hub(
    tmp_path: Path, pg_conninfo: str, mosquitto: Any,
) -> None:
    from tests.hub.test_mqtt_forwarder import RawSubscriber

    path = tmp_path / "journal.sqlite"
    with RawSubscriber(mosquitto.port, "labd/c1/runs/+/+") as sub:
        child = run_child(path, pg_conninfo, mosquitto.port, "produce")
        assert child.stdout is not None
        try:
            for line in child.stdout:  # the child reports its forwarders' cursors
                if int(line) >= 1500:
                    break
            os.kill(child.pid, signal.SIGKILL)  # mid-stream, with batches in flight
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        drain = run_child(path, pg_conninfo, mosquitto.port, "drain")
        assert drain.wait(60) == 0
        j = Journal(path)
        try:
            expected = journal_uids(j)
            assert j.get_cursor("postgres") == j.get_cursor("mqtt") == len(expected)
        finally:
            j.close()
        uids = hub_uids(pg_conninfo)
        assert len(uids) == len(set(uids))  # no duplicates
        assert sorted(uids) == sorted(expected)  # no gaps
        sub.wait_for_uids(set(expected))  # the broker saw every document (maybe twice)
