"""Safety sensors client and ophyd device against the safety simulator on a real mosquitto.

The simulator publishes every ``PERIOD`` wall seconds; the client's ``max_age_s`` is a few
periods, so a hung gateway is seen as stale quickly. Waits are on state, never fixed sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine

from drivers.errors import DeviceTimeout, InstrumentError, NotConnected
from drivers.instruments.safety import KEYS, SafetyEvent, SafetySensors, SafetySettings
from drivers.links import Links, MqttLink
from drivers.ophyd.backends import ALARM_INVALID, ALARM_NONE
from drivers.ophyd.safety import make_safety_device
from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.safety import SafetyConfig, SafetySim
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.sims.mqtt_probe import clear_retained, unique_context
from tests.support.procs import Mosquitto, wait_for

PERIOD = 0.05
MAX_AGE = 0.4
NOISE = 0.05  # ppm, the simulator's default sensor noise


@dataclass
class Rig:
    ctx: SimContext
    sim: SafetySim
    links: Links
    client: SafetySensors
    broker: Mosquitto


async def make_rig(tmp_path: Path, broker: Mosquitto) -> Rig:
    ctx = unique_context(tmp_path, broker, 100.0)
    sim = SafetySim("safety", SafetyConfig(period_s=PERIOD), ctx)
    await sim.start()
    links = Links("labd-test")
    link = MqttLink(host=broker.host, port=broker.port, topic=sim.root)
    client = SafetySensors("safety", SafetySettings(link=link, max_age_s=MAX_AGE), links)
    await client.start()
    await client.wait_ready(5.0)
    return Rig(ctx, sim, links, client, broker)


async def close_rig(rig: Rig) -> None:
    await rig.client.close()
    await rig.links.close()
    await rig.sim.stop()
    await clear_retained(rig.broker, f"labd-sim/{rig.ctx.cell}")


@pytest.fixture
async def rig(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path, mosquitto)
    yield r
    await close_rig(r)


def near(get: object, target: float, tol: float = 6 * NOISE) -> bool:
    try:
        return abs(get() - target) < tol  # type: ignore[operator]
    except Exception:
        return False


async def test_values_follow_the_cell(rig: Rig) -> None:
    c = rig.client
    assert c.online and c.state == "online"
    assert near(lambda: c.oxygen_ppm, 0.6) and near(lambda: c.water_ppm, 0.9)
    assert c.door_open is False and c.estop is False
    r = c.reading("o2_ppm")
    assert r is not None and r.unit == "ppm" and r.ts is not None and r.age() < MAX_AGE

    events: list[SafetyEvent] = []
    remove = c.on_change(events.append)
    async with c.changes() as stream:
        await rig.sim.control("set_o2", {"ppm": 25.0})
        await rig.sim.control("set_h2o", {"ppm": 3.0})
        await wait_for(lambda: near(lambda: c.oxygen_ppm, 25.0), what="O2 at 25 ppm")
        await wait_for(lambda: near(lambda: c.water_ppm, 3.0), what="H2O at 3 ppm")
        await rig.sim.control("open_door", {})
        await wait_for(lambda: c.door_open, what="door open")
        await rig.sim.control("press_estop", {})
        await wait_for(lambda: c.estop, what="estop pressed")
        seen = []
        async for ev in stream:
            seen.append(ev)
            if ev.key == "estop":
                break
    remove()
    door = [e for e in seen if e.key == "door_open"]
    assert door and door[-1].reading is not None and door[-1].reading.value is True
    assert any(e.key == "o2_ppm" and e.kind == "reading" for e in events)
    await rig.sim.control("close_door", {})
    await rig.sim.control("release_estop", {})
    await wait_for(lambda: not c.door_open and not c.estop, what="door closed, estop released")


async def test_hung_gateway_goes_stale(rig: Rig) -> None:
    c = rig.client
    stale: list[SafetyEvent] = []
    c.on_change(lambda e: stale.append(e) if e.kind == "stale" else None)
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY))  # status stays online
    await wait_for(lambda: c.is_stale("o2_ppm"), timeout=3, what="stale O2")
    with pytest.raises(DeviceTimeout, match="old") as err:
        _ = c.oxygen_ppm
    assert err.value.device == "safety" and err.value.command == "read o2_ppm"
    assert c.online  # the status says online: only the age tells
    await wait_for(lambda: {e.key for e in stale} == {"o2_ppm", "h2o_ppm", "door_open", "estop"},
                   timeout=3, what="stale events for all four")
    await rig.sim.clear_fault()
    await wait_for(lambda: near(lambda: c.oxygen_ppm, 0.6), what="fresh again")


async def test_sensor_error_is_instrument_error(rig: Rig) -> None:
    c = rig.client
    await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, code=7))
    await wait_for(
        lambda: all((r := c.reading(k)) is not None and not r.ok for k in KEYS),
        what="all four in error",
    )
    with pytest.raises(InstrumentError) as err:
        _ = c.oxygen_ppm
    assert err.value.code == 7 and "sensor error 7" in err.value.message
    with pytest.raises(InstrumentError):
        _ = c.estop
    await rig.sim.clear_fault()
    await wait_for(lambda: near(lambda: c.oxygen_ppm, 0.6), what="sensor back")


@pytest.mark.parametrize("kind", [FaultKind.GARBLE, FaultKind.TRUNCATE])
async def test_garbled_telemetry_is_dropped(rig: Rig, kind: FaultKind) -> None:
    c = rig.client
    await rig.sim.set_fault(Fault(kind=kind, count=8))  # two rounds of four readings
    await wait_for(lambda: c.unreadable >= 8, what="garbled payloads counted")
    assert near(lambda: c.oxygen_ppm, 0.6)  # the last good value, still fresh


async def test_drop_off_offline_then_back(rig: Rig) -> None:
    c = rig.client
    await rig.sim.set_fault(Fault(kind=FaultKind.DROP_OFF, duration_s=0))
    await wait_for(lambda: c.state == "offline", what="last will")
    assert not c.online
    with pytest.raises(NotConnected, match="offline"):
        _ = c.door_open
    await rig.sim.clear_fault(FaultKind.DROP_OFF)
    await c.wait_ready(5.0)
    assert near(lambda: c.oxygen_ppm, 0.6)


async def test_broker_restart(tmp_path: Path, private_broker: Mosquitto) -> None:
    r = await make_rig(tmp_path, private_broker)
    try:
        dev = make_safety_device("safety", r.client)
        await dev.connect()
        private_broker.restart()
        await wait_for(lambda: r.client.conn.stats.reconnects >= 1, what="driver reconnect")
        await wait_for(lambda: r.sim.connected, what="gateway reconnect")
        await r.sim.control("set_o2", {"ppm": 12.0})
        await wait_for(lambda: near(lambda: r.client.oxygen_ppm, 12.0), what="new O2 value")
        reading = await dev.read()
        assert abs(reading["safety-o2_ppm"]["value"] - 12.0) < 6 * NOISE
        assert reading["safety-o2_ppm"]["alarm_severity"] == ALARM_NONE
    finally:
        await close_rig(r)


async def test_ophyd_signals_go_stale(rig: Rig) -> None:
    dev = make_safety_device("safety", rig.client)
    await dev.connect()
    desc = await dev.describe()
    assert desc["safety-o2_ppm"]["units"] == "ppm" and desc["safety-o2_ppm"]["precision"] == 2
    assert desc["safety-door_open"]["dtype"] == "boolean"
    assert (await dev.read())["safety-o2_ppm"]["alarm_severity"] == ALARM_NONE

    async def severities() -> set[int]:
        return {v["alarm_severity"] for v in (await dev.read()).values()}  # type: ignore[misc]

    await rig.sim.set_fault(Fault(kind=FaultKind.DROP_OFF, duration_s=0))
    await wait_for(lambda: rig.client.state == "offline", what="last will")
    assert await severities() == {ALARM_INVALID}
    await rig.sim.clear_fault(FaultKind.DROP_OFF)
    await rig.client.wait_ready(5.0)
    await rig.sim.control("set_o2", {"ppm": 5.0})
    await wait_for(lambda: near(lambda: rig.client.oxygen_ppm, 5.0), what="O2 5 ppm")
    assert await severities() == {ALARM_NONE}

    await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, code=3))
    await wait_for(
        lambda: not rig.client.reading("o2_ppm").ok,  # type: ignore[union-attr]
        what="sensor error",
    )
    reading = await dev.read()
    assert reading["safety-o2_ppm"]["alarm_severity"] == ALARM_INVALID
    assert abs(reading["safety-o2_ppm"]["value"] - 5.0) < 6 * NOISE  # last good value kept
    await rig.sim.clear_fault()
    stale: list[SafetyEvent] = []
    rig.client.on_change(lambda e: stale.append(e) if e.kind == "stale" else None)
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    await wait_for(lambda: any(e.key == "estop" for e in stale), timeout=3, what="stale estop")
    assert (await dev.read())["safety-estop"]["alarm_severity"] == ALARM_INVALID
    await rig.sim.clear_fault()
    dev.close()


def test_count_in_runengine(
    RE: RunEngine, docs: ValidatedDocuments, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    r = in_re_loop(make_rig(tmp_path, mosquitto))
    try:
        dev = make_safety_device("safety", r.client)
        in_re_loop(dev.connect())
        in_re_loop(r.sim.control("open_door", {}))
        in_re_loop(wait_for(lambda: r.client.door_open, what="door open"))
        RE(bp.count([dev], 3))
        (desc,) = docs.of("descriptor")
        assert desc["data_keys"]["safety-h2o_ppm"]["units"] == "ppm"
        assert len(docs.of("event")) == 3
        assert all(abs(v - 0.6) < 6 * NOISE for v in docs.event_data("safety-o2_ppm"))
        assert docs.event_data("safety-door_open") == [True, True, True]
        assert docs.event_data("safety-estop") == [False, False, False]
        (stop,) = docs.of("stop")
        assert stop["exit_status"] == "success"
    finally:
        dev.close()
        in_re_loop(close_rig(r))
