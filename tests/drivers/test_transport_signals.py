"""Signals straight on a transport (drivers/ophyd/signals.py) in the real RunEngine: a Modbus
register (scaled and float), a serial query/reply, an MQTT topic (pushed) and an MQTT write that
completes on the instrument's acknowledgement. Peers: the simulated cell, in-process on the
RunEngine's loop, on its real transports; documents validated against event-model's schemas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine
from bluesky.utils import FailedStatus

from drivers.errors import InstrumentError, InvalidParameter
from drivers.links import Links, ModbusLink, MqttLink, SerialLink
from drivers.ophyd.signals import (
    modbus_register_r,
    modbus_register_rw,
    mqtt_topic_r,
    mqtt_topic_rw,
    serial_query_r,
    serial_query_rw,
)
from hardware_sims.cell import SimCell
from hardware_sims.config import validate_config
from tests.support.procs import Mosquitto, wait_for
from tests.support.runengine import ValidatedDocuments, in_re_loop


@pytest.fixture
def cell(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[SimCell, Links]]:
    cfg = validate_config({
        "cell": "sigtest", "time_scale": 100, "run_dir": str(tmp_path / "run"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port}, "control": {"port": 0},
        "devices": {"furnace": {"tcp_port": 0}},
    })

    async def start() -> tuple[SimCell, Links]:
        sim = SimCell(cfg)
        await sim.start()
        return sim, Links("sigtest")

    sim, links = in_re_loop(start())
    yield sim, links

    async def stop() -> None:
        await links.close()
        await sim.stop()

    in_re_loop(stop())


def test_modbus_register_signals(RE: RunEngine, docs: ValidatedDocuments,
                                 cell: tuple[SimCell, Links]) -> None:
    sim, links = cell
    ep = sim.device("furnace").endpoint()
    dev = in_re_loop(_modbus(links, ep["tcp_port"]))
    pv = modbus_register_r(dev, 1, decimals=1, units="degC", name="pv")
    pv_f = modbus_register_r(dev, 0x8002, encoding="float", units="degC", precision=2,
                             name="pv_float")
    sp1 = modbus_register_rw(dev, 24, decimals=1, units="degC", name="sp1")
    sp1_f = modbus_register_rw(dev, 0x8000 + 2 * 24, encoding="float", units="degC", name="sp1_f")
    for s in (pv, pv_f, sp1, sp1_f):
        in_re_loop(s.connect())
    in_re_loop(sim.device("furnace").control("set_pv", {"value": 850.0}))

    RE(bp.count([pv, pv_f], 2))
    assert docs.event_data("pv") == [850.0, 850.0]
    assert docs.event_data("pv_float") == [850.0, 850.0]
    desc = docs.of("descriptor")[0]["data_keys"]
    assert desc["pv"]["units"] == "degC" and desc["pv"]["precision"] == 1
    assert desc["pv"]["source"] == f"modbus://tcp:127.0.0.1:{ep['tcp_port']}/1/hr/1"

    RE(bps.mv(sp1, 123.4))
    assert sim.device("furnace").state()["sp1"] == pytest.approx(123.4)
    RE(bps.mv(sp1_f, 321.5))
    assert sim.device("furnace").state()["sp1"] == pytest.approx(321.5)
    assert in_re_loop(sp1.get_value()) == pytest.approx(321.5)

    # The instrument refuses a setpoint above its limit (exception 3): the move fails with it.
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(sp1_f, 5000.0))
    assert isinstance(info.value.__cause__, InstrumentError)
    assert info.value.__cause__.code == 3
    # A value that cannot be encoded is refused before anything is sent.
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(sp1, 4000.0))
    assert isinstance(info.value.__cause__, InvalidParameter)
    assert sim.device("furnace").state()["sp1"] == pytest.approx(321.5)


async def _modbus(links: Links, port: int) -> Any:
    return links.modbus_device("furnace", ModbusLink(host="127.0.0.1", port=port))


def _grams(line: str) -> float:
    parts = line.split()
    if parts[:1] != ["S"] or len(parts) < 4:
        raise ValueError(f"not a weight reply: {line!r}")
    return float(parts[2])


def test_serial_query_signals(RE: RunEngine, docs: ValidatedDocuments,
                              cell: tuple[SimCell, Links]) -> None:
    sim, links = cell
    balance = sim.device("balance")
    in_re_loop(balance.control("place_mass", {"grams": 100.0}))
    in_re_loop(wait_for(lambda: balance.state()["stable"], timeout=10))

    async def make() -> Any:
        port = links.serial_port("balance", SerialLink(url=balance.endpoint()["pty"]))
        probe_ep = sim.device("probe").endpoint()
        probe_port = links.serial_port("probe", SerialLink(url=probe_ep["pty"]),
                                       write_terminator=b"\r", read_terminator=b"\r")
        weight = serial_query_r(port, "S", _grams, float, units="g", precision=4, name="weight")
        current = serial_query_rw(probe_port, ":SOUR:CURR?", float, float, ":SOUR:CURR {value}",
                                  units="A", name="current")
        await weight.connect()
        await current.connect()
        return weight, current

    weight, current = in_re_loop(make())
    RE(bp.count([weight], 2))
    assert docs.event_data("weight") == [pytest.approx(100.0, abs=0.001)] * 2
    RE(bps.mv(current, 0.002))
    assert sim.device("probe").state()["source"]["current_a"] == pytest.approx(0.002)
    assert in_re_loop(current.get_value()) == pytest.approx(0.002)


def test_mqtt_topic_signals(RE: RunEngine, docs: ValidatedDocuments,
                            cell: tuple[SimCell, Links], mosquitto: Mosquitto) -> None:
    sim, links = cell
    safety = sim.device("safety")
    conn = links.mqtt(MqttLink(host=mosquitto.host, port=mosquitto.port, topic=safety.root))
    o2 = mqtt_topic_r(conn, f"{safety.root}/telemetry/o2_ppm", float, units="ppm", name="o2")
    in_re_loop(o2.connect())

    RE(bp.count([o2], 1))
    assert docs.event_data("o2")[0] == pytest.approx(0.6, abs=0.3)
    assert docs.of("descriptor")[0]["data_keys"]["o2"]["units"] == "ppm"
    # Pushed, not polled: the value follows the instrument's telemetry.
    in_re_loop(safety.control("set_o2", {"ppm": 25.0}))
    in_re_loop(wait_for(lambda: abs(_cached(o2) - 25.0) < 1.0, timeout=10))


def test_mqtt_write_completes_on_acknowledgement(
    RE: RunEngine, cell: tuple[SimCell, Links], mosquitto: Mosquitto
) -> None:
    """The simulated cell's MQTT instruments have no writable property, so the instrument here is
    a raw-aiomqtt peer of the test's own (a Homie-style property: a command with an id, an ack,
    then the new retained value), refusing values above 100 with its own code 422."""
    _, links = cell
    root = "peer/chiller"
    conn = links.mqtt(MqttLink(host=mosquitto.host, port=mosquitto.port, topic=root))
    peer = in_re_loop(_start_peer(mosquitto, root))
    setpoint = mqtt_topic_rw(
        conn, f"{root}/setpoint", float, command_topic=f"{root}/cmd/set",
        reply_topic_for=lambda cid: f"{root}/ack/{cid}", units="degC", name="chiller",
    )
    try:
        in_re_loop(setpoint.connect())
        RE(bps.mv(setpoint, 18.5))
        in_re_loop(wait_for(lambda: _cached(setpoint) == 18.5, timeout=5))
        with pytest.raises(FailedStatus) as info:
            RE(bps.mv(setpoint, 150.0))
        assert isinstance(info.value.__cause__, InstrumentError)
        assert info.value.__cause__.code == 422
        assert _cached(setpoint) == 18.5
    finally:
        RE.loop.call_soon_threadsafe(peer.cancel)


async def _start_peer(broker: Mosquitto, root: str) -> asyncio.Task[None]:
    ready = asyncio.Event()

    async def serve() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.publish(f"{root}/setpoint", json.dumps({"value": 20.0}), qos=1, retain=True)
            await c.subscribe(f"{root}/cmd/set", qos=1)
            ready.set()
            async for m in c.messages:
                cmd = json.loads(m.payload)  # type: ignore[arg-type]
                ok = cmd["value"] <= 100
                ack: dict[str, Any] = {"id": cmd["id"], "accepted": ok}
                if not ok:
                    ack["error"] = {"code": 422, "message": "above 100 degC"}
                await c.publish(f"{root}/ack/{cmd['id']}", json.dumps(ack), qos=1)
                if ok:
                    await c.publish(f"{root}/setpoint", json.dumps({"value": cmd["value"]}),
                                    qos=1, retain=True)

    task = asyncio.create_task(serve())
    await asyncio.wait_for(ready.wait(), 5)
    return task


def _cached(signal: Any) -> float:
    """The signal's current value as its backend holds it (pushed, not read on demand)."""
    return float(signal._connector.backend.reading["value"])
