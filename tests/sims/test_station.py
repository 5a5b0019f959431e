"""Characterisation station simulator on a real mosquitto, observed by raw MQTT clients.

The simulator runs on the test's event loop; the raw clients are aiomqtt clients of their own
(and ``mosquitto_sub`` for the retained status), never labd driver code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.station import StationConfig, StationSim
from tests.sims.mqtt_probe import clear_retained, probe, publish, unique_context
from tests.support.procs import Mosquitto, wait_for

SCALE = 500.0  # 180 virtual s of measurement = 0.36 s wall


def place_dosed_crucible(ctx: SimContext, mg: dict[str, float]) -> str:
    """Carry crucible C001 from the rack to the station with the gripper and dose it there."""
    world = ctx.world
    rack, station = world.locations["rack/1"], world.locations["station"]
    crucible = world.grip(rack.x, rack.y, rack.z)
    assert crucible is not None
    world.release(station.x, station.y, station.z)
    assert world.crucible_at("station") is crucible
    for el, amount in mg.items():
        world.add_powder("station", el, amount)
    return crucible.id


@pytest.fixture
async def station(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[StationSim]:
    ctx = unique_context(tmp_path, mosquitto, SCALE)
    sim = StationSim("station", StationConfig(), ctx)
    await sim.start()
    yield sim
    await sim.stop()
    await clear_retained(mosquitto, f"labd-sim/{ctx.cell}")


def measure(cid: str, sample_id: str = "S-0001", **extra: object) -> dict[str, object]:
    return {"id": cid, "sample_id": sample_id, **extra}


# -- conformance -------------------------------------------------------------------------------
@pytest.mark.conformance
async def test_retained_status_seen_by_mosquitto_sub(
    station: StationSim, mosquitto: Mosquitto
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-v",
        "-t", f"{station.root}/status", "-t", f"{station.root}/telemetry/#",
        "-C", "3", "-W", "5",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    lines = dict(line.split(" ", 1) for line in out.decode().splitlines())
    status = json.loads(lines[f"{station.root}/status"])
    assert status["state"] == "online"
    assert status["model"] == "SIM-XRF-1" and status["serial"] == "XRF-0001"
    assert isinstance(status["ts"], float)
    assert json.loads(lines[f"{station.root}/telemetry/busy"])["value"] is False
    assert json.loads(lines[f"{station.root}/telemetry/measurements"])["value"] == 0


@pytest.mark.conformance
async def test_measure_ack_then_result(station: StationSim, mosquitto: Mosquitto) -> None:
    ctx = station.ctx
    dosed = {"Fe": 40.0, "Co": 30.0, "Ni": 30.0}
    cid = place_dosed_crucible(ctx, dosed)
    crucible = ctx.world.crucibles[cid]
    made = crucible.composition()
    truth = ctx.world.true_property(crucible).value
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status", lambda s: s["state"] == "online")
        t0 = ctx.clock.now()
        await publish(mosquitto, f"{R}/cmd/measure", measure("m-1", "S-0042"))
        ack = await p.expect(f"{R}/ack/m-1")
        assert ack.qos == 1 and not ack.retain
        assert ack.json() == {"id": "m-1", "accepted": True, "eta_s": 180.0}
        await p.expect(f"{R}/telemetry/busy", lambda b: b["value"] is True)
        res = await p.expect(f"{R}/result/m-1")
        assert ctx.clock.now() - t0 >= 180.0
        assert res.qos == 1 and not res.retain
        result = res.json()
        await p.expect(f"{R}/telemetry/busy", lambda b: b["value"] is False)
        await p.expect(f"{R}/telemetry/measurements", lambda b: b["value"] == 1)
    assert result["id"] == "m-1" and result["sample_id"] == "S-0042"
    assert result["crucible"] == cid
    comp = result["composition"]
    assert set(comp) == set(made)
    assert sum(comp.values()) == pytest.approx(1.0, abs=1e-5)
    # XRF noise: sigma 0.003 per element, then renormalised.
    assert all(abs(comp[el] - made[el]) < 0.02 for el in made)
    assert comp != pytest.approx(made, abs=1e-7)
    assert result["property"] == {
        "name": ctx.world.truth.property_name,
        "value": pytest.approx(truth),
        "unit": ctx.world.truth.unit,
    }
    assert result["anneal_c"] is None
    assert crucible.sample_id == "S-0042"
    assert station.state()["measurements"] == 1


@pytest.mark.conformance
async def test_measure_composition_only_and_status_command(
    station: StationSim, mosquitto: Mosquitto
) -> None:
    place_dosed_crucible(station.ctx, {"Cr": 10.0, "Mn": 10.0})
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await publish(mosquitto, f"{R}/cmd/measure", measure("m-2", measure=["composition"]))
        await p.expect(f"{R}/ack/m-2", lambda a: a["accepted"])
        await publish(mosquitto, f"{R}/cmd/status", {"id": "q-1"})
        status = (await p.expect(f"{R}/ack/q-1")).json()
        assert status["accepted"] is True
        assert status["state"]["busy"] is True
        assert status["state"]["measuring"] == "m-2"
        assert status["state"]["crucible"] == "C001"
        result = (await p.expect(f"{R}/result/m-2")).json()
    assert set(result["composition"]) == {"Cr", "Mn"}
    assert "property" not in result


@pytest.mark.conformance
async def test_duplicate_id_is_idempotent(station: StationSim, mosquitto: Mosquitto) -> None:
    place_dosed_crucible(station.ctx, {"Fe": 50.0, "Ni": 50.0})
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        cmd = measure("dup-1")
        await publish(mosquitto, f"{R}/cmd/measure", cmd)
        await publish(mosquitto, f"{R}/cmd/measure", cmd)
        await wait_for(lambda: len(p.find(f"{R}/ack/dup-1")) == 2, what="two acks")
        acks = [s.json() for s in p.find(f"{R}/ack/dup-1")]
        assert acks[0] == acks[1] == {"id": "dup-1", "accepted": True, "eta_s": 180.0}
        first = await p.expect(f"{R}/result/dup-1")
        # Re-sent after the result: the same ack and the same result again, nothing re-measured.
        mark = p.mark()
        await publish(mosquitto, f"{R}/cmd/measure", cmd)
        await p.expect(f"{R}/ack/dup-1", start=mark)
        again = await p.expect(f"{R}/result/dup-1", start=mark)
        assert again.json() == first.json()
    assert station.state()["started"] == 1
    assert station.state()["measurements"] == 1


@pytest.mark.conformance
async def test_malformed_and_refused_commands(station: StationSim, mosquitto: Mosquitto) -> None:
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await publish(mosquitto, f"{R}/cmd/measure", b"{not json")
        bad = (await p.expect(f"{R}/ack/invalid")).json()
        assert bad["accepted"] is False and bad["error"]["code"] == 400
        assert bad["topic"] == f"{R}/cmd/measure" and bad["id"] is None

        mark = p.mark()
        await publish(mosquitto, f"{R}/cmd/measure", {"sample_id": "S-1"})
        bad = (await p.expect(f"{R}/ack/invalid", start=mark)).json()
        assert bad["error"]["code"] == 400 and "id" in bad["error"]["message"]

        mark = p.mark()
        await publish(mosquitto, f"{R}/cmd/measure", {"id": "a/b", "sample_id": "S-1"})
        bad = (await p.expect(f"{R}/ack/invalid", start=mark)).json()
        assert bad["id"] == "a/b" and bad["error"]["code"] == 400

        await publish(mosquitto, f"{R}/cmd/measure", {"id": "x-1", "sample_id": 7})
        err = (await p.expect(f"{R}/ack/x-1")).json()
        assert err["accepted"] is False and err["error"]["code"] == 400

        await publish(mosquitto, f"{R}/cmd/measure", measure("x-2", measure=["colour"]))
        assert (await p.expect(f"{R}/ack/x-2")).json()["error"]["code"] == 400

        await publish(mosquitto, f"{R}/cmd/explode", {"id": "x-3"})
        assert (await p.expect(f"{R}/ack/x-3")).json()["error"]["code"] == 404

        # Nothing at the station yet: 412; an empty crucible there: 422.
        await publish(mosquitto, f"{R}/cmd/measure", measure("x-4"))
        assert (await p.expect(f"{R}/ack/x-4")).json()["error"]["code"] == 412
        place_dosed_crucible(station.ctx, {})
        await publish(mosquitto, f"{R}/cmd/measure", measure("x-5"))
        assert (await p.expect(f"{R}/ack/x-5")).json()["error"]["code"] == 422
    assert station.state()["started"] == 0


@pytest.mark.conformance
async def test_busy_refusals(station: StationSim, mosquitto: Mosquitto) -> None:
    place_dosed_crucible(station.ctx, {"Fe": 50.0, "Co": 50.0})
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await station.control("set_busy", {"busy": True})
        await p.expect(f"{R}/telemetry/busy", lambda b: b["value"] is True)
        await publish(mosquitto, f"{R}/cmd/measure", measure("b-1"))
        assert (await p.expect(f"{R}/ack/b-1")).json()["error"]["code"] == 409
        await station.control("set_busy", {"busy": False})
        await p.expect(f"{R}/telemetry/busy", lambda b: b["value"] is False)
        await publish(mosquitto, f"{R}/cmd/measure", measure("b-2"))
        await p.expect(f"{R}/ack/b-2", lambda a: a["accepted"])
        await publish(mosquitto, f"{R}/cmd/measure", measure("b-3"))
        refused = (await p.expect(f"{R}/ack/b-3")).json()
        assert refused["error"]["code"] == 409 and "b-2" in refused["error"]["message"]
        await p.expect(f"{R}/result/b-2")
    with pytest.raises(ValueError, match="set_busy"):
        await station.control("set_busy", {"busy": "yes"})


# -- faults ------------------------------------------------------------------------------------
@pytest.mark.faults
async def test_no_reply_then_replies_again(station: StationSim, mosquitto: Mosquitto) -> None:
    place_dosed_crucible(station.ctx, {"Fe": 50.0, "Co": 50.0})
    R = station.root
    await station.set_fault(Fault(kind=FaultKind.NO_REPLY, count=2))
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await publish(mosquitto, f"{R}/cmd/measure", measure("n-1"))
        # The command was received and the measurement ran, but ack and result never came.
        await wait_for(lambda: station.state()["measurements"] == 1, what="measurement done")
        await publish(mosquitto, f"{R}/cmd/status", {"id": "n-2"})
        await p.expect(f"{R}/ack/n-2")
        assert not p.find(f"{R}/ack/n-1") and not p.find(f"{R}/result/n-1")


@pytest.mark.faults
async def test_late_garbled_truncated_replies(station: StationSim, mosquitto: Mosquitto) -> None:
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await station.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
        await publish(mosquitto, f"{R}/cmd/status", {"id": "g-1"})
        garbled = await p.expect(f"{R}/ack/g-1", lambda b: True, raw=True)
        with pytest.raises(ValueError):
            json.loads(garbled.payload)

        await station.set_fault(Fault(kind=FaultKind.TRUNCATE, count=1))
        await publish(mosquitto, f"{R}/cmd/status", {"id": "t-1"})
        cut = await p.expect(f"{R}/ack/t-1", lambda b: True, raw=True)
        whole = json.dumps({"id": "t-1", "accepted": True, "state": station._status()}).encode()
        assert cut.payload == whole[: len(whole) // 2]

        await station.set_fault(Fault(kind=FaultKind.LATE_REPLY, count=1, delay_s=0.5))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await publish(mosquitto, f"{R}/cmd/status", {"id": "l-1"})
        await p.expect(f"{R}/ack/l-1")
        assert loop.time() - t0 >= 0.5


@pytest.mark.faults
async def test_error_fault_refuses_next_command(station: StationSim, mosquitto: Mosquitto) -> None:
    place_dosed_crucible(station.ctx, {"Fe": 50.0, "Co": 50.0})
    R = station.root
    await station.set_fault(Fault(kind=FaultKind.ERROR, code=503, count=1))
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status")
        await publish(mosquitto, f"{R}/cmd/measure", measure("e-1"))
        assert (await p.expect(f"{R}/ack/e-1")).json() == {
            "id": "e-1",
            "accepted": False,
            "error": {"code": 503, "message": "instrument error 503"},
        }
        await publish(mosquitto, f"{R}/cmd/measure", measure("e-2"))
        assert (await p.expect(f"{R}/ack/e-2")).json()["accepted"] is True


@pytest.mark.faults
async def test_drop_off_fires_last_will_then_back_online(
    station: StationSim, mosquitto: Mosquitto
) -> None:
    place_dosed_crucible(station.ctx, {"Fe": 50.0, "Co": 50.0})
    station.ctx.clock.set_time_scale(10.0)  # a measurement (180 s) now outlasts the drop-off
    R = station.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status", lambda s: s["state"] == "online")
        await publish(mosquitto, f"{R}/cmd/measure", measure("d-1"))
        await p.expect(f"{R}/ack/d-1", lambda a: a["accepted"])
        mark = p.mark()
        await station.set_fault(Fault(kind=FaultKind.DROP_OFF, duration_s=0))
        will = await p.expect(f"{R}/status", start=mark)
        assert will.json() == {"state": "offline"} and will.qos == 1
        assert station.state()["powered"] is False and station.state()["busy"] is False
        await station.clear_fault(FaultKind.DROP_OFF)
        back = await p.expect(f"{R}/status", lambda s: s["state"] == "online", start=mark)
        assert back.json()["serial"] == "XRF-0001"
        # The rebooted station measures again; the lost measurement never reports.
        station.ctx.clock.set_time_scale(SCALE)
        await publish(mosquitto, f"{R}/cmd/measure", measure("d-2"))
        await p.expect(f"{R}/result/d-2")
        assert not p.find(f"{R}/result/d-1")
    # A subscriber arriving now sees the retained online status.
    async with probe(mosquitto, f"{R}/status") as late:
        retained = await late.expect(f"{R}/status")
        assert retained.retain and retained.json()["state"] == "online"


@pytest.mark.faults
async def test_silent_network_loss_will_after_keepalive(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    ctx = unique_context(tmp_path, mosquitto, 20.0)
    sim = StationSim("station", StationConfig(keepalive_s=1, measure_s=40.0), ctx)
    await sim.start()
    R = sim.root
    try:
        place_dosed_crucible(ctx, {"Ni": 50.0, "Cr": 50.0})
        async with probe(mosquitto, f"{R}/#") as p:
            await p.expect(f"{R}/status", lambda s: s["state"] == "online")
            await publish(mosquitto, f"{R}/cmd/measure", measure("s-1"))
            await p.expect(f"{R}/ack/s-1", lambda a: a["accepted"])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
            # Nothing is closed: the broker gives up only after 1.5 x keepalive (mosquitto 2.0
            # checks keepalives every few seconds: the will came after about 5 s here).
            await p.expect(f"{R}/status", lambda s: s["state"] == "offline", timeout=12)
            # The broker counts from the last packet it got, at most one keepalive (1 s) before
            # t0, so the will cannot come earlier than 1.5 - 1 = 0.5 s after it (a drop_off's
            # will comes within milliseconds).
            assert loop.time() - t0 >= 0.5
            # The measurement (2 s wall) finishes meanwhile; its result waits for the link.
            await wait_for(lambda: sim.state()["measurements"] == 1, what="measurement done")
            assert not p.find(f"{R}/result/s-1")
            mark = p.mark()
            await sim.clear_fault(FaultKind.DISCONNECT)
            await p.expect(f"{R}/status", lambda s: s["state"] == "online", start=mark)
            result = await p.expect(f"{R}/result/s-1")
            assert set(result.json()["composition"]) == {"Ni", "Cr"}
    finally:
        await sim.stop()
        await clear_retained(mosquitto, f"labd-sim/{ctx.cell}")


@pytest.mark.faults
async def test_broker_restart_reconnects_and_answers(
    tmp_path: Path, private_broker: Mosquitto
) -> None:
    ctx = unique_context(tmp_path, private_broker, SCALE)
    sim = StationSim("station", StationConfig(), ctx)
    await sim.start()
    try:
        place_dosed_crucible(ctx, {"Fe": 30.0, "Mn": 70.0})
        connections = sim.state()["connections"]
        await asyncio.to_thread(private_broker.restart)
        await wait_for(
            lambda: sim.state()["connected"] and sim.state()["connections"] > connections,
            what="station reconnected",
        )
        R = sim.root
        async with probe(private_broker, f"{R}/#") as p:
            # persistence is off: the retained status on the new broker was published anew.
            status = await p.expect(f"{R}/status")
            assert status.retain and status.json()["state"] == "online"
            assert (await p.expect(f"{R}/telemetry/busy")).retain
            await publish(private_broker, f"{R}/cmd/measure", measure("r-1"))
            await p.expect(f"{R}/ack/r-1", lambda a: a["accepted"])
            await p.expect(f"{R}/result/r-1")
    finally:
        await sim.stop()


async def test_clean_stop_publishes_offline(tmp_path: Path, mosquitto: Mosquitto) -> None:
    ctx = unique_context(tmp_path, mosquitto, SCALE)
    sim = StationSim("station", StationConfig(), ctx)
    await sim.start()
    R = sim.root
    try:
        async with probe(mosquitto, f"{R}/status") as p:
            await p.expect(f"{R}/status", lambda s: s["state"] == "online")
            mark = p.mark()
            await sim.stop()
            offline = await p.expect(f"{R}/status", start=mark)
            assert offline.json() == {"state": "offline"}
        async with probe(mosquitto, f"{R}/status") as late:
            assert (await late.expect(f"{R}/status")).json() == {"state": "offline"}
    finally:
        await sim.stop()
        await clear_retained(mosquitto, f"labd-sim/{ctx.cell}")
