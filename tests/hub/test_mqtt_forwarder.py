"""MQTT forwarder against real mosquitto brokers: topics and payloads, retained summaries and
samples, a broker restart in the middle of a count, wrong credentials, an unreachable broker."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from bluesky import plans as bp
from bluesky.run_engine import RunEngine
from ophyd_async.core import soft_signal_rw

from labd.hub import MqttForwarder
from labd.journal import Journal
from tests.hub.conftest import in_re_loop, synthetic_run
from tests.support.procs import Mosquitto, free_port, wait_for


class RawSubscriber:
    """A plain paho client (not labd's code) collecting every message on ``pattern``.

    ``persistent``: a fixed client id and a kept session, so that on a broker that persists
    sessions nothing published while this subscriber was disconnected is missed."""

    def __init__(self, port: int, pattern: str, persistent: bool = False) -> None:
        self.pattern = pattern
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
            clean_session=not persistent)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.2)
        self.port = port

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe(self.pattern, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def __enter__(self) -> RawSubscriber:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def uids(self) -> set[str]:
        with self.lock:
            return {p.get("uid") or p.get("datum_id") for _, p, _ in self.messages}

    def wait_for_uids(self, expected: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not expected <= self.uids():
            if time.monotonic() > deadline:
                missing = expected - self.uids()
                raise AssertionError(f"{len(missing)} documents never reached the broker")
            time.sleep(0.02)


def doc_messages(sub: RawSubscriber) -> list[tuple[str, dict[str, Any]]]:
    with sub.lock:
        return [(t, p) for t, p, _ in sub.messages if t.count("/") == 4]


def fwd_for(journal: Journal, port: int, **kw: Any) -> MqttForwarder:
    return MqttForwarder(journal, cell="c1", host="127.0.0.1", port=port, backoff_initial=0.05,
                         backoff_max=0.3, ack_timeout=2.0, connect_timeout=2.0, **kw)


def sample_run() -> list[tuple[str, dict[str, Any]]]:
    from event_model import compose_run

    bundle = compose_run(metadata={"plan_name": "make", "protocol": "synth", "campaign": "K",
                                   "property_name": "hardness"})
    keys = {k: {"dtype": "number", "shape": [], "source": "calc"}
            for k in ("target_Fe", "target_Ni", "anneal_c", "property_value")}
    keys["sample_id"] = {"dtype": "string", "shape": [], "source": "calc"}
    keys["property_value"]["units"] = "HV"
    desc = bundle.compose_descriptor(name="sample", data_keys=keys)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, fe in enumerate((0.25, 0.5)):
        data = {"sample_id": f"S{i}", "target_Fe": fe, "target_Ni": 1 - fe, "anneal_c": 900.0,
                "property_value": 300.0 + i}
        docs.append(("event", desc.compose_event(
            data=data, timestamps=dict.fromkeys(data, 0.0), seq_num=i + 1)))
    docs.append(("stop", bundle.compose_stop()))
    return docs


async def test_documents_summary_and_samples_are_published(
    journal: Journal, mosquitto: Mosquitto
) -> None:
    docs = synthetic_run(150) + sample_run()
    with RawSubscriber(mosquitto.port, "labd/c1/#") as sub:
        for n, d in docs:
            journal.append(n, d)
        fwd = fwd_for(journal, mosquitto.port, batch_size=32)
        await fwd.start()
        try:
            await fwd.wait_delivered(len(docs), timeout=20)
        finally:
            await fwd.stop()
        await wait_for(lambda: len(doc_messages(sub)) >= len(docs), what="all documents")
    run1, run2 = docs[0][1]["uid"], docs[153][1]["uid"]
    assert doc_messages(sub) == [  # in journal order, payloads with event-model's fields
        (f"labd/c1/runs/{run1 if i < 153 else run2}/{n}", d) for i, (n, d) in enumerate(docs)]
    doc_msgs = doc_messages(sub)
    assert doc_msgs[2][0] == f"labd/c1/runs/{run1}/event"
    # Retained: what a client subscribing later gets.
    with RawSubscriber(mosquitto.port, "labd/c1/runs/+") as late:
        await wait_for(lambda: len(late.messages) >= 2, what="two retained run summaries")
        summaries = {p["uid"]: p for _, p, retained in late.messages if retained}
    assert summaries[run1]["status"] == "success" and summaries[run1]["num_events"] == 150
    assert summaries[run2]["protocol"] == "synth" and summaries[run2]["campaign"] == "K"
    with RawSubscriber(mosquitto.port, "labd/c1/samples/+") as late:
        await wait_for(lambda: len(late.messages) >= 2, what="two retained samples")
        samples = {t.rsplit("/", 1)[1]: p for t, p, _ in late.messages}
    assert samples["S1"]["target_composition"] == {"Fe": 0.5, "Ni": 0.5}
    assert (samples["S0"]["property_name"], samples["S0"]["property_unit"]) == ("hardness", "HV")
    assert samples["S0"]["run_uid"] == run2


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Any:
    """A broker that keeps sessions and queued messages across a restart (on disk), so the raw
    subscriber misses nothing published before it reconnected. ``user root``: as root,
    mosquitto would otherwise run as ``mosquitto``, who cannot write in pytest's tmp_path (a
    non-root mosquitto ignores the option)."""
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(
        f"listener {broker.port} {broker.host}\nallow_anonymous true\npersistence true\n"
        f"persistence_location {tmp_path}/\nset_tcp_nodelay true\nuser root\n")
    broker.start()
    yield broker
    broker.stop()


def test_broker_restart_during_a_count_loses_nothing(
    RE: RunEngine, journal: Journal, persistent_broker: Mosquitto
) -> None:
    RE.subscribe(journal.subscriber)
    sig = soft_signal_rw(float, name="x")
    in_re_loop(sig.connect())
    fwd = fwd_for(journal, persistent_broker.port, batch_size=50)
    with RawSubscriber(persistent_broker.port, "labd/c1/runs/+/+", persistent=True) as sub:
        in_re_loop(fwd.start())
        worker = threading.Thread(target=lambda: RE(bp.count([sig], num=300, delay=0.003)))
        try:
            worker.start()
            in_re_loop(fwd.wait_delivered(60, timeout=20))
            persistent_broker.stop()
            worker.join(30)
            assert not worker.is_alive()  # the RunEngine was not held up by the outage
            journal.flush(timeout=10)
            in_re_loop(_until(lambda: not fwd.connected and fwd.last_error is not None))
            assert fwd.backlog > 0
            assert fwd.last_error is not None and "MQTT broker 127.0.0.1" in fwd.last_error
            persistent_broker.start()
            in_re_loop(fwd.wait_delivered(journal.durable_seq, timeout=30))
        finally:
            in_re_loop(fwd.stop())
        expected = {r.uid for r in journal.read_after(0, limit=10**6)}
        assert len(expected) == 303
        sub.wait_for_uids(expected)
        # At least once on the wire; a store keyed by uid holds each exactly once.
        store = {p["uid"]: p for _, p, _ in sub.messages}
        assert set(store) == expected


async def _until(predicate: Any) -> None:
    await wait_for(predicate, timeout=15)


@pytest.fixture
def auth_broker(tmp_path: Path) -> Any:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "labd", "right"], check=True,
                   capture_output=True)
    pwfile.chmod(0o644)
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(
        f"listener {broker.port} {broker.host}\nallow_anonymous false\n"
        f"password_file {pwfile}\nuser root\n")
    broker.start()
    yield broker
    broker.stop()


async def test_wrong_password_is_said_plainly_and_the_journal_keeps_everything(
    journal: Journal, auth_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    docs = synthetic_run(5)
    for n, d in docs:
        journal.append(n, d)
    journal.flush(timeout=10)
    fwd = fwd_for(journal, auth_broker.port, username="labd", password="wrong")
    await fwd.start()
    try:
        await wait_for(lambda: fwd.last_error is not None, timeout=10)
    finally:
        await fwd.stop()
    assert fwd.last_error == (
        f"MQTT broker 127.0.0.1:{auth_broker.port} refused the login of user 'labd':"
        " [code:135] Not authorized (check the username and password in the config)")
    assert fwd.last_error in caplog.text
    assert (fwd.backlog, fwd.delivered, journal.count()) == (len(docs), 0, len(docs))
    good = fwd_for(journal, auth_broker.port, username="labd", password="right")
    await good.start()
    try:
        await good.wait_delivered(len(docs), timeout=10)
    finally:
        await good.stop()


async def test_unreachable_broker_is_said_plainly(journal: Journal) -> None:
    journal.append(*synthetic_run(0)[0])
    journal.flush(timeout=10)
    port = free_port()
    fwd = fwd_for(journal, port)
    await fwd.start()
    try:
        await wait_for(lambda: fwd.last_error is not None, timeout=10)
    finally:
        await fwd.stop()
    assert fwd.last_error == (
        f"cannot reach MQTT broker 127.0.0.1:{port}: connection refused (is the broker running?)")
    assert fwd.status().backlog == 1
