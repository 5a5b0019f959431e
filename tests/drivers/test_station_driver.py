"""Station protocol client and ophyd device against the station simulator on a real mosquitto.

The simulator runs in-process on the test's loop (or the RunEngine's); the driver talks to it
only through the broker. A raw aiomqtt probe (``tests.sims.mqtt_probe``) watches the command
topic where a test must show what went over the wire (the same-id re-ask).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine
from bluesky.utils import FailedStatus

from drivers.errors import (
    DeviceTimeout,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
)
from drivers.instruments.station import Station, StationSettings
from drivers.links import Links, MqttLink
from drivers.ophyd.station import make_station_device
from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.station import StationConfig, StationSim
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.sims.mqtt_probe import clear_retained, probe, unique_context
from tests.support.procs import Mosquitto, wait_for

SCALE = 1000.0  # 180 virtual s of measurement = 0.18 s wall
ELEMENTS = ["Fe", "Co", "Ni", "Cr", "Mn"]
XRF_TOL = 0.02  # xrf_sigma 0.003 per element, renormalised


@dataclass
class Rig:
    ctx: SimContext
    sim: StationSim
    links: Links
    client: Station
    broker: Mosquitto


def settings(sim: StationSim, broker: Mosquitto, **kw: object) -> StationSettings:
    return StationSettings.model_validate(
        {
            "link": MqttLink(host=broker.host, port=broker.port, topic=sim.root),
            "ack_timeout_s": 0.3,
            "online_timeout_s": 2.0,
            "elements": ELEMENTS,
            "property_unit": "HV",
            **kw,
        }
    )


async def make_rig(
    tmp_path: Path, broker: Mosquitto, config: StationConfig | None = None, **kw: object
) -> Rig:
    ctx = unique_context(tmp_path, broker, SCALE)
    sim = StationSim("station", config or StationConfig(), ctx)
    await sim.start()
    links = Links("labd-test")
    client = Station("station", settings(sim, broker, **kw), links)
    await client.start()
    await client.wait_online(5.0)
    return Rig(ctx, sim, links, client, broker)


async def close_rig(rig: Rig) -> None:
    await rig.links.close()
    await rig.sim.stop()
    await clear_retained(rig.broker, f"labd-sim/{rig.ctx.cell}")


@pytest.fixture
async def rig(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path, mosquitto)
    yield r
    await close_rig(r)


def dose(ctx: SimContext, mg: dict[str, float], slot: str = "rack/1") -> str:
    """Carry a crucible from ``slot`` to the station and dose it there."""
    world = ctx.world
    src, station = world.locations[slot], world.locations["station"]
    crucible = world.grip(src.x, src.y, src.z)
    assert crucible is not None
    world.release(station.x, station.y, station.z)
    for el, amount in mg.items():
        world.add_powder("station", el, amount)
    return crucible.id


# -- the measure exchange ------------------------------------------------------------------------
async def test_measure_end_to_end(rig: Rig) -> None:
    cid = dose(rig.ctx, {"Fe": 40.0, "Co": 30.0, "Ni": 30.0})
    crucible = rig.ctx.world.crucibles[cid]
    made = crucible.composition()
    truth = rig.ctx.world.true_property(crucible)

    result = await rig.client.measure("S-0042", timeout=5.0)

    assert result.sample_id == "S-0042" and result.crucible == cid and result.attempts == 1
    assert set(result.composition) == set(made)
    for el, x in made.items():
        assert abs(result.composition[el] - x) < XRF_TOL
    assert result.composition != made  # XRF noise is there: the values are measured, not echoed
    assert result.property is not None
    assert result.property.value == pytest.approx(truth.value)
    truth_model = rig.ctx.world.truth
    assert (result.property.name, result.property.unit) == (
        truth_model.property_name, truth_model.unit
    )
    assert result.anneal_c is None  # never annealed
    assert crucible.sample_id == "S-0042"
    await wait_for(lambda: rig.client.busy is False, what="busy telemetry back to false")

    status = await rig.client.status()
    assert status.measurements == 1 and not status.busy and status.crucible == cid
    assert rig.sim.state()["started"] == 1 and rig.client.reasks == 0


async def test_measure_subset_and_status_while_measuring(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    r = await make_rig(tmp_path, mosquitto, StationConfig(measure_s=500.0))
    try:
        dose(r.ctx, {"Fe": 50.0, "Ni": 50.0})
        task = asyncio.create_task(r.client.measure("S-1", timeout=5.0, measure=["property"]))
        await wait_for(lambda: r.sim.state()["current"] is not None, what="measuring")
        status = await r.client.status()
        assert status.busy and status.sample_id == "S-1" and status.measuring is not None
        with pytest.raises(InstrumentError) as busy:  # one at a time: the station says 409
            other = Station("station", r.client.settings, r.links)
            await other.start()
            await other.measure("S-2")
        assert busy.value.code == 409
        result = await task
        assert result.composition == {} and result.property is not None
    finally:
        await close_rig(r)


@pytest.mark.parametrize(
    ("setup", "code"),
    [("nothing", 412), ("empty", 422), ("busy", 409), ("fault", 500), ("fault503", 503)],
)
async def test_refusals_are_instrument_errors(rig: Rig, setup: str, code: int) -> None:
    if setup == "empty":
        dose(rig.ctx, {})
    elif setup != "nothing":
        dose(rig.ctx, {"Fe": 10.0})
    if setup == "busy":
        await rig.sim.control("set_busy", {"busy": True})
    elif setup.startswith("fault"):
        fcode = None if setup == "fault" else 503
        await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, count=1, code=fcode))
    with pytest.raises(InstrumentError) as err:
        await rig.client.measure("S-9", timeout=5.0)
    assert err.value.code == code and err.value.device == "station"
    assert err.value.command == "measure 'S-9'" and err.value.message
    assert rig.sim.state()["started"] == 0


@pytest.mark.parametrize(
    ("args", "what"),
    [
        ({"sample_id": ""}, "sample_id"),
        ({"sample_id": "a/b"}, "sample_id"),
        ({"sample_id": "x" * 129}, "sample_id"),
        ({"sample_id": "S-1", "measure": []}, "measure"),
        ({"sample_id": "S-1", "measure": ["colour"]}, "measure"),
        ({"sample_id": "S-1", "timeout": 0.0}, "timeout"),
        ({"sample_id": "S-1", "timeout": math.inf}, "timeout"),
    ],
)
async def test_bad_parameters_send_nothing(rig: Rig, args: dict[str, object], what: str) -> None:
    dose(rig.ctx, {"Fe": 10.0})
    before = rig.sim.commands_received
    with pytest.raises(InvalidParameter, match=what) as err:
        await rig.client.measure(**args)  # type: ignore[arg-type]
    assert "nothing sent" in str(err.value) and err.value.device == "station"
    await asyncio.sleep(0.05)
    assert rig.sim.commands_received == before


# -- faults --------------------------------------------------------------------------------
async def test_no_reply_same_id_reask_then_timeout(rig: Rig) -> None:
    dose(rig.ctx, {"Fe": 10.0, "Co": 10.0})
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    async with probe(rig.broker, f"{rig.sim.root}/cmd/measure") as p:
        with pytest.raises(DeviceTimeout) as err:
            await rig.client.measure("S-5", timeout=5.0)
        await p.expect(f"{rig.sim.root}/cmd/measure", start=1)
        sent = [s.json() for s in p.seen]
    assert err.value.device == "station" and err.value.command == "measure 'S-5'"
    assert "asked twice with the same id" in str(err.value)
    assert len(sent) == 2 and sent[0] == sent[1] and sent[0]["sample_id"] == "S-5"
    assert rig.sim.state()["started"] == 1  # the station measured once, not twice
    await rig.sim.clear_fault()


async def test_lost_ack_recovered_by_same_id(rig: Rig) -> None:
    dose(rig.ctx, {"Fe": 10.0, "Co": 10.0})
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    result = await rig.client.measure("S-6", timeout=5.0)
    assert result.attempts == 2 and rig.client.reasks == 1
    assert rig.sim.state()["started"] == 1


async def test_lost_result_recovered_by_same_id(tmp_path: Path, mosquitto: Mosquitto) -> None:
    r = await make_rig(tmp_path, mosquitto, StationConfig(measure_s=200.0))
    try:
        dose(r.ctx, {"Fe": 10.0, "Ni": 10.0})
        async with probe(mosquitto, f"{r.sim.root}/ack/+") as p:
            task = asyncio.create_task(r.client.measure("S-7", timeout=0.5))
            await wait_for(lambda: p.seen, what="the ack")
        await r.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))  # swallows the result
        result = await task
        assert result.attempts == 2 and result.property is not None
        assert r.sim.state()["started"] == 1
    finally:
        await close_rig(r)


@pytest.mark.parametrize(("delay", "attempts"), [(0.1, 1), (0.5, 2)])
async def test_late_ack(rig: Rig, delay: float, attempts: int) -> None:
    dose(rig.ctx, {"Fe": 10.0, "Co": 10.0})
    await rig.sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, count=1, delay_s=delay))
    result = await rig.client.measure("S-8", timeout=5.0)
    assert result.attempts == attempts
    assert rig.sim.state()["started"] == 1


@pytest.mark.parametrize("kind", [FaultKind.GARBLE, FaultKind.TRUNCATE])
async def test_garbled_ack_is_protocol_error(rig: Rig, kind: FaultKind) -> None:
    dose(rig.ctx, {"Fe": 10.0})
    await rig.sim.set_fault(Fault(kind=kind, count=1))
    with pytest.raises(ProtocolError) as err:
        await rig.client.measure("S-10", timeout=5.0)
    assert err.value.device == "station" and err.value.command == "measure 'S-10'"
    assert err.value.raw
    assert rig.client.reasks == 0


async def test_drop_off_then_back(tmp_path: Path, mosquitto: Mosquitto) -> None:
    r = await make_rig(tmp_path, mosquitto, StationConfig(measure_s=5000.0), online_timeout_s=0.3)
    try:
        dose(r.ctx, {"Fe": 10.0, "Co": 10.0})
        states: list[str] = []
        r.client.on_state(states.append)
        task = asyncio.create_task(r.client.measure("S-11", timeout=30.0))
        await wait_for(lambda: r.sim.state()["current"] is not None, what="measuring")
        await r.sim.set_fault(Fault(kind=FaultKind.DROP_OFF, duration_s=0))
        with pytest.raises(NotConnected, match="went offline") as err:
            await asyncio.wait_for(task, 3.0)
        assert err.value.command == "measure 'S-11'"
        assert r.client.state == "offline" and not r.client.online
        # While it is gone a measure is refused without sending anything.
        before = r.sim.commands_received
        with pytest.raises(NotConnected, match="not online"):
            await r.client.measure("S-12", timeout=5.0)
        assert r.sim.commands_received == before
        await r.sim.clear_fault(FaultKind.DROP_OFF)
        await r.client.wait_online(5.0)
        assert states == ["offline", "online"]
        r.sim.config.measure_s = 100.0
        result = await r.client.measure("S-13", timeout=5.0)
        assert result.sample_id == "S-13"
    finally:
        await close_rig(r)


async def test_broker_restart(tmp_path: Path, private_broker: Mosquitto) -> None:
    r = await make_rig(tmp_path, private_broker)
    try:
        dose(r.ctx, {"Fe": 10.0, "Co": 10.0})
        assert (await r.client.measure("S-20", timeout=5.0)).attempts == 1
        connections = r.sim.connections
        private_broker.restart()
        await wait_for(lambda: r.client.conn.stats.reconnects >= 1, what="driver reconnect")
        await wait_for(lambda: r.sim.connections > connections, what="station reconnect")
        await r.client.wait_online(5.0)
        result = await r.client.measure("S-21", timeout=5.0)
        assert result.sample_id == "S-21"
        assert (await r.client.status()).measurements == 2
    finally:
        await close_rig(r)


# -- ophyd device in the real RunEngine --------------------------------------------------
def test_count_in_runengine(
    RE: RunEngine, docs: ValidatedDocuments, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    r = in_re_loop(make_rig(tmp_path, mosquitto))
    try:
        cid = dose(r.ctx, {"Fe": 30.0, "Co": 30.0, "Cr": 40.0})
        crucible = r.ctx.world.crucibles[cid]
        station = make_station_device("station", r.client, timeout=5.0)
        in_re_loop(station.connect())

        def plan():  # type: ignore[no-untyped-def]
            yield from bps.mv(station.sample_id, "S-77")
            yield from bp.count([station], 1)
            return (yield from bps.rd(station.property_value))

        value = RE(plan()).plan_result
        truth = r.ctx.world.true_property(crucible).value
        assert value == pytest.approx(truth)
        (desc,) = docs.of("descriptor")
        keys = desc["data_keys"]
        assert keys["station-property_value"]["units"] == "HV"
        assert keys["station-composition-Fe"]["units"] == "at. fraction"
        assert keys["station-composition-Fe"]["precision"] == 4
        (event,) = docs.of("event")
        made = crucible.composition()
        for el in ELEMENTS:
            got = event["data"][f"station-composition-{el}"]
            assert abs(got - made.get(el, 0.0)) < XRF_TOL
        assert event["data"]["station-property_value"] == pytest.approx(truth)
        assert event["data"]["station-crucible"] == cid
        assert event["data"]["station-measured_sample"] == "S-77"
        assert desc["configuration"]["station"]["data"]["station-sample_id"] == "S-77"
        assert crucible.sample_id == "S-77"

        # A refused measurement fails the trigger, and so the plan, with the station's code.
        r.ctx.world.crucibles[cid].powders_mg.clear()
        with pytest.raises(FailedStatus) as failed:
            RE(bp.count([station], 1))
        err = failed.value.__cause__
        assert isinstance(err, InstrumentError) and err.code == 422
    finally:
        in_re_loop(close_rig(r))
