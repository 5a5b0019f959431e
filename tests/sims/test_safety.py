"""Cell safety sensors simulator on a real mosquitto, observed by raw MQTT clients.

The simulator runs on the test's event loop; the observers are aiomqtt clients of their own and
``mosquitto_sub``, never labd driver code.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hardware_sims.faults import Fault, FaultKind
from hardware_sims.safety import SafetyConfig, SafetySim
from tests.sims.mqtt_probe import clear_retained, probe, unique_context
from tests.support.procs import Mosquitto, wait_for

TELEMETRY = ("o2_ppm", "h2o_ppm", "door_open", "estop")


@pytest.fixture
async def safety(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[SafetySim]:
    # A long period: the only publications during a test are the ones the test causes, unless
    # the test shortens it.
    ctx = unique_context(tmp_path, mosquitto, 100.0)
    sim = SafetySim("safety", SafetyConfig(period_s=30.0), ctx)
    await sim.start()
    yield sim
    await sim.stop()
    await clear_retained(mosquitto, f"labd-sim/{ctx.cell}")


@pytest.mark.conformance
async def test_retained_telemetry_seen_by_mosquitto_sub(
    safety: SafetySim, mosquitto: Mosquitto
) -> None:
    R = safety.root
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-v",
        "-t", f"{R}/status", "-t", f"{R}/telemetry/#", "-C", "5", "-W", "5",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    got = {t: json.loads(p) for t, p in (line.split(" ", 1) for line in out.decode().splitlines())}
    status = got[f"{R}/status"]
    assert status["state"] == "online" and status["model"] == "SIM-GLOVEBOX-1"
    o2, h2o = got[f"{R}/telemetry/o2_ppm"], got[f"{R}/telemetry/h2o_ppm"]
    assert o2["unit"] == h2o["unit"] == "ppm"
    assert o2["value"] == pytest.approx(0.6, abs=0.3)
    assert h2o["value"] == pytest.approx(0.9, abs=0.3)
    assert got[f"{R}/telemetry/door_open"]["value"] is False
    assert got[f"{R}/telemetry/estop"]["value"] is False
    assert all(isinstance(got[f"{R}/telemetry/{k}"]["ts"], float) for k in TELEMETRY)


@pytest.mark.conformance
async def test_controls_publish_at_once(safety: SafetySim, mosquitto: Mosquitto) -> None:
    R = safety.root
    async with probe(mosquitto, f"{R}/telemetry/#") as p:
        await p.expect(f"{R}/telemetry/estop")
        await safety.control("open_door", {})
        await p.expect(f"{R}/telemetry/door_open", lambda v: v["value"] is True)
        await safety.control("press_estop", {})
        await p.expect(f"{R}/telemetry/estop", lambda v: v["value"] is True)
        await safety.control("set_o2", {"ppm": 25.0})
        await p.expect(f"{R}/telemetry/o2_ppm", lambda v: abs(v["value"] - 25.0) < 0.3)
        await safety.control("set_h2o", {"ppm": 4.0})
        await p.expect(f"{R}/telemetry/h2o_ppm", lambda v: abs(v["value"] - 4.0) < 0.3)
        await safety.control("close_door", {})
        await safety.control("release_estop", {})
        await p.expect(f"{R}/telemetry/door_open", lambda v: v["value"] is False)
        await p.expect(f"{R}/telemetry/estop", lambda v: v["value"] is False)
    # The retained values are the latest ones.
    async with probe(mosquitto, f"{R}/telemetry/o2_ppm") as late:
        seen = await late.expect(f"{R}/telemetry/o2_ppm")
        assert seen.retain and seen.json()["value"] == pytest.approx(25.0, abs=0.3)
    state = safety.state()
    assert state["o2_target_ppm"] == 25.0 and state["door_open"] is False


async def test_bad_control_changes_nothing(safety: SafetySim) -> None:
    before = safety.state()
    for action, args in (("set_o2", {"ppm": -1}), ("set_h2o", {}), ("set_o2", {"ppm": "x"})):
        with pytest.raises(ValueError, match="ppm"):
            await safety.control(action, args)
    with pytest.raises(ValueError, match="ramp_s"):
        await safety.control("set_o2", {"ppm": 5, "ramp_s": -3})
    with pytest.raises(ValueError, match="unknown action"):
        await safety.control("flood", {})
    after = safety.state()
    assert after["o2_target_ppm"] == before["o2_target_ppm"]
    assert after["h2o_target_ppm"] == before["h2o_target_ppm"]


@pytest.mark.physics
async def test_periodic_wander_and_ramp(tmp_path: Path, mosquitto: Mosquitto) -> None:
    ctx = unique_context(tmp_path, mosquitto, 100.0)
    sim = SafetySim("safety", SafetyConfig(period_s=0.02, o2_noise_ppm=0.05), ctx)
    await sim.start()
    R = sim.root
    try:
        async with probe(mosquitto, f"{R}/telemetry/o2_ppm") as p:
            await wait_for(lambda: len(p.seen) >= 40, what="40 O2 readings")
            values = [s.json()["value"] for s in p.seen[:40]]
            # Noise around the level: it moves, it stays near 0.6, never below 0.
            assert len(set(values)) > 5
            assert statistics.mean(values) == pytest.approx(0.6, abs=0.1)
            assert min(values) >= 0.0 and max(values) < 1.0
            # A leak: O2 drifts to 50 ppm over 100 virtual s (1 s wall).
            mark = p.mark()
            await sim.control("set_o2", {"ppm": 50.0, "ramp_s": 100.0})
            await p.expect(f"{R}/telemetry/o2_ppm", lambda v: 15 < v["value"] < 35, start=mark)
            await p.expect(f"{R}/telemetry/o2_ppm", lambda v: v["value"] > 49.5, start=mark)
            ramp = [s.json()["value"] for s in p.seen[mark:]]
            assert ramp.index(max(ramp)) > 10  # it drifted there, it did not jump
    finally:
        await sim.stop()
        await clear_retained(mosquitto, f"labd-sim/{ctx.cell}")


@pytest.mark.faults
async def test_garble_error_and_no_reply(safety: SafetySim, mosquitto: Mosquitto) -> None:
    R = safety.root
    async with probe(mosquitto, f"{R}/telemetry/#") as p:
        await p.expect(f"{R}/telemetry/estop")
        mark = p.mark()
        await safety.set_fault(Fault(kind=FaultKind.GARBLE, count=4))
        await safety.control("open_door", {})
        door = await p.expect(f"{R}/telemetry/door_open", lambda b: True, start=mark, raw=True)
        with pytest.raises(ValueError):
            json.loads(door.payload)

        mark = p.mark()
        await safety.set_fault(Fault(kind=FaultKind.ERROR, code=7, count=1))
        await safety.control("set_o2", {"ppm": 3.0})
        o2 = (await p.expect(f"{R}/telemetry/o2_ppm", start=mark)).json()
        assert o2["value"] is None and o2["error"] == {"code": 7, "message": "sensor error 7"}
        # The whole round carries the error: wait for its last topic before the next mark.
        await p.expect(f"{R}/telemetry/estop", lambda v: v["value"] is None, start=mark)

        await safety.set_fault(Fault(kind=FaultKind.NO_REPLY))
        mark = p.mark()
        await safety.control("press_estop", {})
        await safety.clear_fault(FaultKind.NO_REPLY)
        await safety.control("close_door", {})
        await p.expect(f"{R}/telemetry/door_open", lambda v: v["value"] is False, start=mark)
        # The round under no_reply was swallowed; the next one carries the e-stop again.
        assert len(p.find(f"{R}/telemetry/door_open", start=mark)) == 1
        assert (await p.expect(f"{R}/telemetry/estop", start=mark)).json()["value"] is True


@pytest.mark.faults
async def test_drop_off_will_then_telemetry_back(safety: SafetySim, mosquitto: Mosquitto) -> None:
    R = safety.root
    async with probe(mosquitto, f"{R}/#") as p:
        await p.expect(f"{R}/status", lambda s: s["state"] == "online")
        mark = p.mark()
        await safety.set_fault(Fault(kind=FaultKind.DROP_OFF, duration_s=0.3))
        will = await p.expect(f"{R}/status", start=mark)
        assert will.json() == {"state": "offline"}
        await safety.control("open_door", {})  # happens while the gateway is gone
        await p.expect(f"{R}/status", lambda s: s["state"] == "online", start=mark)
        door = p.find(f"{R}/telemetry/door_open", start=mark)
        assert door and door[-1].json()["value"] is True
        # Retained telemetry precedes the online status on reconnection.
        order = [s.topic for s in p.seen[mark:]]
        assert order.index(f"{R}/telemetry/door_open") < len(order) - 1


@pytest.mark.faults
async def test_broker_restart(tmp_path: Path, private_broker: Mosquitto) -> None:
    ctx = unique_context(tmp_path, private_broker, 100.0)
    sim = SafetySim("safety", SafetyConfig(period_s=30.0, o2_ppm=1.5), ctx)
    await sim.start()
    try:
        await sim.control("press_estop", {})
        n = sim.state()["connections"]
        await asyncio.to_thread(private_broker.restart)
        await wait_for(
            lambda: sim.state()["connected"] and sim.state()["connections"] > n,
            what="safety reconnected",
        )
        R = sim.root
        async with probe(private_broker, f"{R}/#") as p:
            assert (await p.expect(f"{R}/status")).json()["state"] == "online"
            estop = await p.expect(f"{R}/telemetry/estop")
            assert estop.retain and estop.json()["value"] is True
            o2 = await p.expect(f"{R}/telemetry/o2_ppm")
            assert o2.json()["value"] == pytest.approx(1.5, abs=0.3)
    finally:
        await sim.stop()
