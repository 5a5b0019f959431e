"""Tiled forwarder against a real Tiled server the tests start (``tiled serve catalog`` on a free
port, its catalog in a temp dir): runs, streams and event data as in the journal, a run met in
the middle and a replay stored once, a server outage during a count, clear errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky import plans as bp
from bluesky.run_engine import RunEngine
from ophyd_async.core import soft_signal_rw

from labd.config import ConfigError, validate_config
from labd.hub.tiled import TILED_IMPORT_ERROR, TiledForwarder
from labd.journal import Journal
from tests.hub.conftest import in_re_loop, synthetic_run
from tests.support.procs import free_port, wait_for, wait_port

assert TILED_IMPORT_ERROR is None, TILED_IMPORT_ERROR  # the test extra installs tiled: no skip

from tiled.client import from_uri  # noqa: E402

API_KEY = "labdtestkey1"  # Tiled accepts alphanumeric keys only


class TiledServer:
    """``tiled serve catalog`` of the test's own: a SQLite catalog, files and tables in ``root``;
    stop() and start() keep the catalog."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "tiled.log"
        self.initialized = False

    def start(self) -> TiledServer:
        tiled = shutil.which("tiled", path=str(Path(sys.executable).parent))
        assert tiled is not None, "the tiled command is not in the venv"
        args = [tiled, "serve", "catalog", str(self.root / "catalog.db"),
                "-w", str(self.root / "data"), "-w", f"sqlite:///{self.root / 'tables.db'}",
                "--api-key", API_KEY, "--host", "127.0.0.1", "--port", str(self.port)]
        if not self.initialized:
            args.append("--init")
            self.initialized = True
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            if _listens(self.port):
                return self
        self.stop()
        raise RuntimeError(f"tiled serve did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def client(self) -> Any:
        return from_uri(self.uri, api_key=API_KEY)


def _listens(port: int) -> bool:
    try:
        wait_port("127.0.0.1", port, timeout=0.1)
    except TimeoutError:
        return False
    return True


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    server = TiledServer(tmp_path_factory.mktemp("tiled")).start()
    yield server
    server.stop()


def forwarder(journal: Journal, uri: str, api_key: str | None = API_KEY,
              **kw: Any) -> TiledForwarder:
    return TiledForwarder(journal, cell="c1", uri=uri, api_key=api_key, backoff_initial=0.05,
                          backoff_max=0.5, timeout=2, **kw)


def journal_runs(journal: Journal) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in journal.read_after(0, limit=10**9):
        if r.run_uid is not None:
            out.setdefault(r.run_uid, []).append(r)
    return out


def assert_run_equals_journal(client: Any, records: list[Any]) -> None:
    """The run's container in Tiled holds exactly the journal's start, stop, streams and data."""
    uid = records[0].run_uid
    node = client[uid]
    docs = {r.name: r.doc for r in records if r.name in ("start", "stop")}
    assert node.metadata["start"] == docs["start"]
    if "stop" in docs:
        assert node.metadata["stop"] == docs["stop"]
    else:
        assert "stop" not in node.metadata
    descriptors = {r.uid: r.doc for r in records if r.name == "descriptor"}
    assert sorted(node) == sorted({d["name"] for d in descriptors.values()})
    for stream in node:
        events = [r.doc for r in records if r.name == "event" and r.stream == stream]
        table = node[stream].base["internal"].read()
        assert list(table["seq_num"]) == [e["seq_num"] for e in events]  # once each, in order
        assert list(table["time"]) == [e["time"] for e in events]
        for key in events[0]["data"]:
            assert list(table[key]) == [e["data"][key] for e in events]
            assert list(table[f"ts_{key}"]) == [e["timestamps"][key] for e in events]


def test_runs_streams_and_data_equal_the_journal_and_a_replay_is_stored_once(
    RE: RunEngine, journal: Journal, tiled_server: TiledServer,
) -> None:
    RE.subscribe(journal.subscriber)
    x = soft_signal_rw(float, name="x", initial_value=1.5)
    y = soft_signal_rw(int, name="y", initial_value=7)
    in_re_loop(x.connect())
    in_re_loop(y.connect())
    RE(bp.count([x, y], num=40), sample_id="S-1", campaign="A")
    RE(bp.list_scan([y], x, [0.5, 1.0, 2.5, 4.0]))
    journal.flush(timeout=10)
    runs = journal_runs(journal)
    assert len(runs) == 2
    fwd = forwarder(journal, tiled_server.uri, batch_size=16)  # runs span many batches
    in_re_loop(fwd.start())
    try:
        in_re_loop(fwd.wait_delivered(journal.durable_seq, timeout=30))
    finally:
        in_re_loop(fwd.stop())
    client = tiled_server.client()
    for records in runs.values():
        assert_run_equals_journal(client, records)
    assert client[next(iter(runs))].metadata["start"]["campaign"] == "A"
    assert (fwd.runs_written, fwd.runs_skipped, fwd.runs_rewritten) == (2, 0, 0)
    st = fwd.status()
    assert (st.last_error, st.backlog, st.cursor) == (None, 0, journal.durable_seq)
    # Replay everything (a cursor lost, say): the complete runs are not written again.
    journal.set_cursor("tiled", 0)
    again = forwarder(journal, tiled_server.uri)
    in_re_loop(again.start())
    try:
        in_re_loop(again.wait_delivered(journal.durable_seq, timeout=30))
    finally:
        in_re_loop(again.stop())
    assert (again.runs_written, again.runs_skipped) == (0, 2)
    for records in runs.values():
        assert_run_equals_journal(client, records)


async def test_a_running_run_is_in_tiled_and_a_restart_mid_run_writes_it_once(
    journal: Journal, tiled_server: TiledServer,
) -> None:
    docs = synthetic_run(120)
    stop = docs.pop()[1]
    for n, d in docs[:80]:
        journal.append(n, d)
    fwd = forwarder(journal, tiled_server.uri)
    await fwd.start()
    try:
        await fwd.wait_delivered(80, timeout=20)
    finally:
        await fwd.stop()
    client = tiled_server.client()
    (records,) = journal_runs(journal).values()
    assert_run_equals_journal(client, records)  # the events are there before the stop
    # A new forwarder (after a crash, say) starts in the middle of the run: it writes the run
    # again from the journal, and every event is there once.
    for n, d in [*docs[80:], ("stop", stop)]:
        journal.append(n, d)
    restarted = forwarder(journal, tiled_server.uri)
    await restarted.start()
    try:
        await restarted.wait_delivered(len(docs) + 1, timeout=20)
    finally:
        await restarted.stop()
    assert (restarted.runs_written, restarted.runs_rewritten) == (1, 1)
    (records,) = journal_runs(journal).values()
    assert_run_equals_journal(client, records)


def test_server_outage_during_a_count_leaves_every_run_complete_once(
    RE: RunEngine, journal: Journal, tiled_server: TiledServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    RE.subscribe(journal.subscriber)
    sig = soft_signal_rw(float, name="x")
    in_re_loop(sig.connect())
    fwd = forwarder(journal, tiled_server.uri, batch_size=40)
    in_re_loop(fwd.start())
    done = threading.Event()

    def plans() -> None:
        RE(bp.count([sig], num=20))
        RE(bp.count([sig], num=300, delay=0.005))
        RE(bp.count([sig], num=30))
        done.set()

    worker = threading.Thread(target=plans)
    try:
        worker.start()
        in_re_loop(fwd.wait_delivered(60, timeout=30))  # part of the long run is in Tiled
        tiled_server.stop()
        try:
            worker.join(30)
            assert done.is_set()  # the RunEngine finished while the server was down
            journal.flush(timeout=10)
            assert journal.count() == 3 * 3 + 350
            in_re_loop(wait_for(lambda: fwd.last_error is not None and not fwd.connected,
                                timeout=20))
            st = fwd.status()
            assert st.backlog > 0 and st.cursor + st.backlog == journal.count()
            assert st.last_error == (f"cannot reach Tiled at {tiled_server.uri}: connection"
                                     " refused (is the server running?)")
        finally:
            tiled_server.start()
        in_re_loop(fwd.wait_delivered(journal.count(), timeout=60))
    finally:
        in_re_loop(fwd.stop())
    assert fwd.status().last_error is None
    client = tiled_server.client()
    runs = journal_runs(journal)
    for records in runs.values():
        assert_run_equals_journal(client, records)
    assert fwd.runs_rewritten >= 1  # the run cut off by the outage was written again, once
    assert any("forwarder tiled" in r.getMessage() for r in caplog.records)


async def test_wrong_api_key_is_said_plainly_and_the_journal_keeps_everything(
    journal: Journal, tiled_server: TiledServer, caplog: pytest.LogCaptureFixture,
) -> None:
    docs = synthetic_run(10)
    for n, d in docs:
        journal.append(n, d)
    journal.flush(timeout=10)
    fwd = forwarder(journal, tiled_server.uri, api_key="not-the-key")
    await fwd.start()
    try:
        await wait_for(lambda: fwd.last_error is not None, timeout=15)
    finally:
        await fwd.stop()
    st = fwd.status()
    assert st.last_error == (f"Tiled at {tiled_server.uri} refused the API key (401"
                             " Unauthorized: check api_key_file or api_key_env in the config)")
    assert (st.connected, st.backlog, st.delivered) == (False, len(docs), 0)
    assert st.last_error in caplog.text
    assert journal.count() == len(docs) and journal.get_cursor("tiled") == 0
    ok = forwarder(journal, tiled_server.uri)
    await ok.start()
    try:
        await ok.wait_delivered(len(docs), timeout=20)
    finally:
        await ok.stop()
    (records,) = journal_runs(journal).values()
    assert_run_equals_journal(tiled_server.client(), records)


async def test_unreachable_server_is_said_plainly(journal: Journal) -> None:
    journal.append(*synthetic_run(0)[0])
    journal.flush(timeout=10)
    uri = f"http://127.0.0.1:{free_port()}"
    fwd = forwarder(journal, uri)
    await fwd.start()
    try:
        await wait_for(lambda: fwd.last_error is not None, timeout=15)
    finally:
        await fwd.stop()
    assert fwd.status().last_error == (
        f"cannot reach Tiled at {uri}: connection refused (is the server running?)")
    assert fwd.backlog == 1 and journal.count() == 1


def test_config_section_and_a_missing_extra_said_by_the_hub_service(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from labd import hubservice
    from labd.hub import tiled

    key = tmp_path / "tiled.key"
    key.write_text(API_KEY + "\n")
    cfg = validate_config({"hub": {"tiled": {"enabled": True, "uri": "http://hub:8000",
                                             "api_key_file": str(key)}}})
    assert cfg.hub.tiled.password() == API_KEY
    for bad, message in [({"enabled": True}, "uri is required"),
                         ({"api_key_file": "a", "api_key_env": "B"}, "not both"),
                         ({"uri": "hub:8000"}, "hub.tiled.uri")]:
        with pytest.raises(ConfigError, match=message):
            validate_config({"hub": {"tiled": bad}})
    monkeypatch.setattr(tiled, "TILED_IMPORT_ERROR", "the Tiled forwarder needs the optional"
                        " extra: pip install 'labd[tiled]' (No module named 'tiled')")
    service = hubservice.HubService(journal, cfg.hub, "c1")
    asyncio.run(service.start())
    try:
        (st,) = service.status()["forwarders"]
    finally:
        asyncio.run(service.stop())
    assert st["name"] == "tiled" and st["target"] == "http://hub:8000"
    assert st["last_error"] == ("not started: the Tiled forwarder needs the optional extra:"
                                " pip install 'labd[tiled]' (No module named 'tiled')")
