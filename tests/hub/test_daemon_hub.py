"""The journal and the hub forwarders inside the daemon, against real services: the suite's
mosquitto and a private PostgreSQL cluster (tests/support/postgres.py).

* The real ``labd`` process on the simulated cell (time-scaled) with both forwarders configured:
  ``make_sample`` runs through the API; documents reach PostgreSQL and MQTT while a run goes; the
  database is stopped in the middle of a run and started again; the daemon is SIGKILLed while
  forwarding and restarted: the hub ends with exactly the journal's documents. ``labctl samples``
  and ``labctl export`` give the table, checked against the simulator's world.
* A real in-process Daemon with a wrong PostgreSQL password: the status, ``labctl status``,
  ``/metrics`` and the log say so plainly, the journal keeps everything, MQTT still gets it all.
"""

from __future__ import annotations

import csv
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psycopg
import pytest
import yaml

from hardware_sims.control import ControlClient
from labd.api.server import ApiService
from labd.app import Daemon
from labd.config import DaemonConfig
from tests.api.conftest import make_registry, wait_until
from tests.support.labd import LabdProcess
from tests.support.postgres import PASSWORD, PASSWORD_USER, PostgresServer
from tests.support.procs import Mosquitto

BIN = Path(sys.executable).parent
CELL = "hubcell"
ELEMENTS = ["Fe", "Co", "Ni", "Cr", "Mn"]  # the simulator's default ground truth

PG_UIDS = """
SELECT uid FROM runs UNION ALL SELECT stop_uid FROM runs WHERE stop_uid IS NOT NULL
UNION ALL SELECT uid FROM descriptors UNION ALL SELECT uid FROM events
UNION ALL SELECT uid FROM other_documents"""


class MqttCollector:
    """Every document the hub publishes on ``labd/<cell>/runs/<run>/<name>`` (a real client)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.uids: list[str] = []
        self.retained: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="hub-test")
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"labd/{CELL}/#", qos=1)
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        doc = json.loads(msg.payload)
        with self.lock:
            if len(parts) == 5 and parts[2] == "runs":
                self.uids.append(doc["datum_id"] if parts[4] == "datum" else doc["uid"])
            else:
                self.retained[msg.topic] = doc

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def journal_uids(data_dir: Path) -> list[str]:
    con = sqlite3.connect(f"file:{data_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT uid FROM documents ORDER BY seq")]
    finally:
        con.close()


def pg_query(conninfo: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, connect_timeout=2) as conn:
        return list(conn.execute(sql))  # type: ignore[arg-type]


def make_labd(tmp: Path, config: dict[str, Any]) -> LabdProcess:
    """The real ``labd`` process with a config file (``labctl`` against it: ``.labctl``)."""
    path = tmp / "labd.yaml"
    path.write_text(yaml.safe_dump({**config, "data_dir": str(tmp / "data")}))
    return LabdProcess(tmp / "data", tmp / "labd.log", ["--config", str(path)])


@pytest.fixture
def hub_labd(tmp_path: Path, mosquitto: Mosquitto, postgres: PostgresServer,
             pg_conninfo: str) -> Iterator[tuple[LabdProcess, str]]:
    pwfile = tmp_path / "pg.password"
    pwfile.write_text(PASSWORD + "\n")
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"world": {"crucibles": 4},
                                   "devices": {"station": {"measure_s": 60}}}))
    daemon = make_labd(tmp_path, {
        "cell": CELL,
        "simulator": {"config": str(sim), "mqtt": mosquitto.url, "time_scale": 600},
        "hub": {"mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port},
                "postgres": {"enabled": True, "password_file": str(pwfile),
                             "conninfo": pg_conninfo.replace("user=postgres",
                                                             f"user={PASSWORD_USER}")}},
    })
    yield daemon, pg_conninfo
    daemon.cleanup()


def make_sample(c: httpx.Client, sid: str, comp: dict[str, float], slot: int) -> str:
    r = c.post("/run", json={"protocol": "make_sample", "params": {
        "sample_id": sid, "composition": comp, "total_mg": 100, "anneal_c": 500,
        "anneal_s": 1200, "ramp_c_min": 100, "unload_below_c": 250, "campaign": "hub-test",
        "rack_slot": f"rack/{slot}", "furnace_slot": "furnace/1"}})
    assert r.status_code == 202, r.text
    return str(r.json()["item_uid"])


def finished(c: httpx.Client, item_uid: str) -> dict[str, Any] | None:
    h = c.get(f"/history/{item_uid}").json()
    return h if h["status"] not in ("running",) else None


def hub_forwarders(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in c.get("/hub").json()["forwarders"]}


def test_hub_in_the_daemon_process(hub_labd: tuple[LabdProcess, str], mosquitto: Mosquitto,
                                   postgres: PostgresServer, tmp_path: Path) -> None:
    labd, conninfo = hub_labd
    mqtt = MqttCollector(mosquitto)
    try:
        c = labd.start()
        wait_until(lambda: all(f["connected"] for f in hub_forwarders(c).values()), 20,
                   "both forwarders to connect")

        # 1. Documents reach PostgreSQL and MQTT while the run goes.
        first = make_sample(c, "H-1", {"Fe": 0.5, "Ni": 0.5}, 1)
        wait_until(lambda: c.get("/status").json()["current"], 20, "the run to start")
        wait_until(lambda: pg_query(conninfo, "SELECT count(*) FROM events")[0][0] > 0, 20,
                   "events in PostgreSQL")
        with mqtt.lock:
            assert mqtt.uids, "nothing on MQTT yet"
        assert c.get("/status").json()["current"] is not None, "the run ended too early"
        h1 = wait_until(lambda: finished(c, first), 60, "the first sample")
        assert h1["status"] == "success", h1

        # 2. The database stops in the middle of a run and comes back: nothing lost, once.
        second = make_sample(c, "H-2", {"Co": 0.3, "Cr": 0.7}, 2)
        wait_until(lambda: c.get("/status").json()["current"], 20, "the second run")
        postgres.stop()
        try:
            err = wait_until(lambda: hub_forwarders(c)["postgres"]["last_error"], 20,
                             "the outage to show")
            assert "PostgreSQL at" in err
            assert wait_until(lambda: hub_forwarders(c)["postgres"]["backlog"] > 0, 20)
        finally:
            postgres.start()
        h2 = wait_until(lambda: finished(c, second), 60, "the second sample")
        assert h2["status"] == "success", h2.get("error")

        # 3. SIGKILL while forwarding, restart: the hub ends with exactly the journal.
        make_sample(c, "H-3", {"Fe": 0.2, "Mn": 0.8}, 3)
        wait_until(lambda: hub_forwarders(c)["postgres"]["cursor"] > 0
                   and (c.get("/status").json()["current"] or {}).get("progress", {})
                   .get("events", 0) > 5, 30, "the third run to be forwarding")
        assert labd.signal(signal.SIGKILL, 10) == -signal.SIGKILL
        c = labd.start()
        uids = journal_uids(labd.data_dir)

        def caught_up() -> bool:
            fw = hub_forwarders(c)
            return all(f["backlog"] == 0 and f["cursor"] == len(uids) for f in fw.values())

        wait_until(caught_up, 30, "the hub to catch up after the restart")
        in_pg = [r[0] for r in pg_query(conninfo, PG_UIDS)]
        assert len(in_pg) == len(set(in_pg)) == len(uids) == len(set(uids))
        assert set(in_pg) == set(uids)
        with mqtt.lock:
            on_mqtt = set(mqtt.uids)
        assert on_mqtt == set(uids)  # QoS 1: each at least once (a resend may repeat one)
        st = labd.labctl("status")
        assert st.returncode == 0, st.stderr
        assert "hub       postgres -> postgresql://" in st.stdout and "backlog 0" in st.stdout
        assert PASSWORD not in labd.log.read_text() + st.stdout

        # 4. The table: labctl samples and labctl export, against the simulator's world.
        out = labd.labctl("--json", "samples", "--campaign", "hub-test")
        assert out.returncode == 0, out.stderr
        rows = {r["sample_id"]: r for r in json.loads(out.stdout)}
        assert set(rows) == {"H-1", "H-2"}  # H-3 was killed before it was measured
        assert rows["H-1"]["target_composition"] == {"Fe": 0.5, "Ni": 0.5, "Co": 0.0,
                                                     "Cr": 0.0, "Mn": 0.0}
        text = labd.labctl("samples", "--protocol", "make_sample")
        assert "H-1" in text.stdout and "Fe0.5" in text.stdout and "500 C 1200 s" in text.stdout
        assert labd.labctl("samples", "--since", "1h").stdout.count("H-") == 2
        assert labd.labctl("samples", "--until", "1h").stdout.strip() == "no samples"
        runs = labd.labctl("runs", "--campaign", "hub-test")
        assert runs.stdout.count("make_sample") == 3, runs.stdout

        csv_path = tmp_path / "samples.csv"
        done = labd.labctl("export", "--out", str(csv_path), "--campaign", "hub-test")
        assert done.returncode == 0 and "wrote" in done.stdout, done.stderr
        with csv_path.open() as f:
            reader = csv.DictReader(f)
            table = {r["sample_id"]: r for r in reader}
        assert reader.fieldnames == (
            ["sample_id", "run_uid", "time", "protocol", "campaign"]
            + [f"{p}_{el}" for p in ("target", "measured", "dosed_mg") for el in sorted(ELEMENTS)]
            + ["anneal_c", "anneal_s", "property_name", "property_value", "property_unit"])
        row = table["H-1"]
        endpoints = json.loads((labd.data_dir / "sim" / "endpoints.json").read_text())
        world = ControlClient(endpoints["control"]).call(op="world")["world"]
        (crucible,) = [cr for cr in world["crucibles"].values() if cr["sample_id"] == "H-1"]
        for el in ELEMENTS:
            assert float(row[f"dosed_mg_{el}"]) == pytest.approx(
                crucible["powders_mg"].get(el, 0.0), abs=1e-3)
            assert float(row[f"measured_{el}"]) == pytest.approx(
                crucible["composition"].get(el, 0.0), abs=0.02)
        assert float(row["anneal_c"]) == 500 and row["campaign"] == "hub-test"
        assert float(row["property_value"]) == rows["H-1"]["property_value"]
        jl = tmp_path / "samples.jsonl"
        assert labd.labctl("export", "--out", str(jl)).returncode == 0
        assert [json.loads(line)["sample_id"] for line in jl.read_text().splitlines()] == [
            "H-1", "H-2"]
        pq = tmp_path / "samples.parquet"
        assert labd.labctl("export", "--out", str(pq)).returncode == 0
        assert pq.read_bytes()[:4] == b"PAR1"
        # and the samples table of the hub says the same
        (pg_value,) = pg_query(conninfo, "SELECT property_value FROM samples"
                                         " WHERE sample_id = 'H-1'")[0]
        assert pg_value == rows["H-1"]["property_value"]
        assert mqtt.retained[f"labd/{CELL}/samples/H-1"]["property_value"] == pg_value
        c.close()
    finally:
        mqtt.close()


def test_wrong_password_is_plain_and_the_journal_keeps_everything(
    tmp_path: Path, mosquitto: Mosquitto, pg_conninfo: str, caplog: pytest.LogCaptureFixture,
) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text("not-the-password\n")
    cfg = DaemonConfig.model_validate({
        "simulator": {"enabled": False}, "data_dir": str(tmp_path / "data"), "api": {"port": 0},
        "hub": {"mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port},
                "postgres": {"enabled": True, "password_file": str(pwfile),
                             "conninfo": pg_conninfo.replace("user=postgres",
                                                             f"user={PASSWORD_USER}")}}})
    caplog.set_level(logging.INFO)
    daemon = Daemon(cfg, registry=make_registry())
    daemon.start()
    try:
        from ophyd_async.core import soft_signal_rw

        sig = soft_signal_rw(float, 1.5, name="sig")
        daemon.call(sig.connect())
        daemon.engine.devices["sig"] = sig
        api = next(s for s in daemon.services if isinstance(s, ApiService))
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        c = httpx.Client(base_url=api.url + "/api/v1", timeout=15,
                         headers={"Authorization": f"Bearer {token}"})
        r = c.post("/run", json={"protocol": "count", "params": {"num": 40}})
        assert r.status_code == 202, r.text
        wait_until(lambda: c.get("/history").json()[0]["status"] == "success", 20, "the count")
        daemon.journal.flush()
        n = daemon.journal.durable_seq
        assert n == 43  # start, descriptor, 40 events, stop
        assert daemon.hub is not None and daemon.hub.wait_delivered(0, 10)

        def pg_refused() -> dict[str, Any] | None:
            fw = hub_forwarders(c)
            return fw if fw["mqtt"]["cursor"] == n and fw["postgres"]["last_error"] else None

        fw = wait_until(pg_refused, 20, "MQTT delivered and PostgreSQL refused")
        expected = (f"PostgreSQL at 127.0.0.1:{pg_conninfo.split('port=')[1].split()[0]}"
                    f" rejected the login of user '{PASSWORD_USER}': password authentication"
                    " failed (check the user and password in the config)")
        assert fw["postgres"]["last_error"] == expected
        assert fw["postgres"]["connected"] is False and fw["postgres"]["backlog"] == n
        assert fw["mqtt"]["backlog"] == 0 and fw["mqtt"]["last_error"] is None
        wait_until(lambda: any(expected in m for m in caplog.messages), 10, "the log line")
        # the journal keeps everything: the run is there, whole
        runs = c.get("/runs", params={"protocol": "count"}).json()
        assert [(r["num_events"], r["exit_status"]) for r in runs] == [(40, "success")]
        one = c.get(f"/runs/{runs[0]['uid']}").json()
        assert one["counts"] == {"start": 1, "descriptor": 1, "event": 40, "stop": 1}
        assert c.get("/runs/nope").status_code == 404
        bad = c.get("/runs", params={"since": "2030-01-01", "until": "2020-01-01"})
        assert bad.status_code == 422 and "until must be after since" in bad.text
        assert c.get("/samples/export", params={"format": "xlsx"}).status_code == 422
        metrics = httpx.get(api.url + "/metrics").text
        assert 'labd_hub_backlog_documents{forwarder="postgres"} 43' in metrics
        assert 'labd_hub_error{forwarder="postgres"} 1' in metrics
        assert f"labd_journal_documents {n}" in metrics
        st = subprocess.run([str(BIN / "labctl"), "--url", api.url, "--token", token, "status"],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        assert "postgres -> postgresql://labd_pw@127.0.0.1" in st.stdout
        assert "DOWN, backlog 43" in st.stdout and expected in st.stdout
        # the password is nowhere to be seen
        shown = st.stdout + json.dumps(c.get("/config").json()) + "\n".join(caplog.messages)
        assert "not-the-password" not in shown
        c.close()
    finally:
        daemon.shutdown()
    assert daemon.hub is not None and not daemon.hub.status()["process"]["running"]


def test_hub_config_refuses_a_password_in_conninfo_and_says_which_secret_failed(
    tmp_path: Path, journal: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from labd.config import ConfigError, validate_config
    from labd.hubservice import HubService

    with pytest.raises(ConfigError) as info:
        validate_config({"hub": {"postgres": {"enabled": True,
                                              "conninfo": "host=h dbname=d password=x"}}})
    assert "hub.postgres: Value error, conninfo must not hold the password: use " \
           "password_file or password_env" in str(info.value)
    with pytest.raises(ConfigError, match="give password_file or password_env, not both"):
        validate_config({"hub": {"mqtt": {"password_file": "/x", "password_env": "X"}}})
    with pytest.raises(ConfigError, match=r"hub\.mqtt\.port"):
        validate_config({"hub": {"mqtt": {"enabled": True, "port": 0}}})

    cfg = validate_config({"hub": {
        "mqtt": {"enabled": True, "password_env": "LABD_TEST_UNSET_SECRET"},
        "postgres": {"enabled": True, "conninfo": "host=h dbname=d user=u",
                     "password_file": str(tmp_path / "missing")}}}).hub
    hub = HubService(journal, cfg, "c")
    asyncio.run(hub.start())  # nothing can start: no process, and the status says why
    st = {f["name"]: f for f in hub.status()["forwarders"]}
    assert st["mqtt"]["last_error"] == (
        "not started: password_env: $LABD_TEST_UNSET_SECRET is not set")
    assert st["postgres"]["last_error"] == (
        f"not started: cannot read password_file {tmp_path / 'missing'}: No such file or directory")
    assert st["postgres"]["target"] == "postgresql://u@h:5432/d"
    assert hub.status()["process"]["pid"] is None
    assert any("password_env: $LABD_TEST_UNSET_SECRET is not set" in m for m in caplog.messages)
    asyncio.run(hub.stop())
