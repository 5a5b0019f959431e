"""GRBL gantry driver and ophyd-async device against the GRBL 1.1h simulator on a real pty.

Client tests run on pytest-asyncio's loop; the Bluesky tests start the simulator, the link and
the device on the RunEngine's loop (DESIGN.md) and run standard plans with validated documents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine

from drivers.errors import DeviceTimeout, InstrumentError, InvalidParameter, ProtocolError
from drivers.instruments.gantry import Gantry, GantrySettings
from drivers.links import Links, SerialLink
from drivers.ophyd.gantry import GantryDevice, make_gantry_device
from hardware_sims.base import SerialEndpointConfig
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.gantry import GantryConfig, GantrySim
from hardware_sims.world import WorldConfig
from tests.conftest import make_context
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.support.procs import wait_for

SCALE = 400.0
LOCATIONS = {
    name: (loc.x, loc.y, loc.z)
    for name, loc in WorldConfig().locations.items()
    if name in ("rack/1", "rack/2", "doser", "park")
}


def settings(path: Path, **kw: object) -> GantrySettings:
    return GantrySettings(
        link=SerialLink(url=str(path), baudrate=115200, timeout_s=1.0),
        command_timeout_s=0.5,
        poll_interval_s=0.02,
        open_settle_s=0.05,
        locations=LOCATIONS,
        **kw,  # type: ignore[arg-type]
    )


class Rig:
    def __init__(self, tmp_path: Path, scale: float = SCALE) -> None:
        self.ctx = make_context(tmp_path, time_scale=scale)
        cfg = GantryConfig(serial=SerialEndpointConfig(baudrate=115200))
        self.sim = GantrySim("gantry", cfg, self.ctx)
        self.links = Links()
        self.gantry = Gantry("gantry", settings(tmp_path / "gantry"), self.links)

    async def start(self) -> None:
        await self.sim.start()

    async def stop(self) -> None:
        await self.links.close()
        await self.sim.stop()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def homed(rig: Rig) -> Rig:
    await rig.gantry.home(timeout=10)
    return rig


def near(a: object, b: tuple[float, float, float], tol: float = 0.01) -> bool:
    return all(abs(float(p) - q) <= tol for p, q in zip(a, b, strict=True))  # type: ignore[call-overload]


# -- client methods ----------------------------------------------------------------------------
async def test_startup_alarm_home_status_and_position(rig: Rig) -> None:
    g = rig.gantry
    st = await g.status()
    assert st.state == "Alarm" and g.needs_homing  # banner + unlock message seen
    with pytest.raises(InstrumentError) as err:
        await g.move_to(10, 10, -5)
    assert err.value.code == 9 and "home" in str(err.value)
    st = await g.home(timeout=10)
    assert st.state == "Idle" and st.mpos == (0.0, 0.0, 0.0)
    assert not g.needs_homing and rig.sim.state()["homed"]
    assert await g.position() == (0.0, 0.0, 0.0)


async def test_unlock_without_homing(rig: Rig) -> None:
    await rig.gantry.unlock()
    assert (await rig.gantry.status()).state == "Idle"
    assert rig.sim.state()["grbl_state"] == "Idle" and not rig.sim.state()["homed"]


async def test_move_completes_only_when_idle_at_target(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    task = asyncio.create_task(g.move_to(200.0, 150.0, -50.0, feed=3000))
    await wait_for(lambda: sim.state()["grbl_state"] == "Run", 5, 0.001, "Run")
    assert not task.done()  # 'ok' came when the line was planned; the move is not over
    st = await task
    s = sim.state()
    assert s["grbl_state"] == "Idle" and not s["moving"] and s["planner_blocks"] == 0
    assert near(s["mpos"], (200.0, 150.0, -50.0)) and st.state == "Idle"
    assert near(await g.position(), (200.0, 150.0, -50.0))


async def test_status_during_a_move_shares_the_link(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    task = asyncio.create_task(g.move_to(400.0, 0.0, 0.0, feed=2000))
    await wait_for(lambda: sim.state()["grbl_state"] == "Run", 5, 0.001, "Run")
    st = await g.status()
    assert st.state == "Run" and 0 < st.mpos[0] < 400
    await task


async def test_soft_limits_refused_before_sending(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    before = sim.state()["lines_processed"]
    for args in [(-1, 0, 0), (451, 0, 0), (0, 301, 0), (0, 0, 1), (0, 0, -100.5)]:
        with pytest.raises(InvalidParameter, match="outside the travel"):
            await g.move_to(*args)
    with pytest.raises(InvalidParameter, match="feed=0"):
        await g.move_to(10, 10, -5, feed=0)
    with pytest.raises(InvalidParameter, match="x=nan"):
        await g.move_to(float("nan"), 0, 0)
    assert sim.state()["lines_processed"] == before and sim.state()["alarm"] is None


async def test_feed_hold_and_resume(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    task = asyncio.create_task(g.move_to(440.0, 0.0, 0.0, feed=1500))
    await wait_for(lambda: sim.state()["grbl_state"] == "Run", 5, 0.001, "Run")
    await g.feed_hold()
    await wait_for(lambda: sim.state()["grbl_state"] == "Hold:0", 5, 0.005, "Hold:0")
    assert not task.done() and (await g.status()).state == "Hold"
    await g.resume()
    st = await task
    assert st.state == "Idle" and near(st.mpos, (440.0, 0.0, 0.0))


async def test_pick_and_place_rack_to_doser(homed: Rig) -> None:
    g, world = homed.gantry, homed.ctx.world
    assert world.crucible_at("rack/1") is not None
    crucible = world.crucible_at("rack/1")
    safe = 0.0

    async def visit(name: str, close: bool) -> None:
        x, y, z = LOCATIONS[name]
        await g.move_to(x, y, safe)
        await g.move_to(x, y, z, feed=1000)
        await g.gripper(close)
        await g.move_to(x, y, safe)

    await visit("rack/1", True)
    assert world.held is crucible and homed.sim.state()["gripper_closed"]
    await visit("doser", False)
    assert world.held is None and crucible is not None and crucible.location == "doser"
    assert world.crucible_at("rack/1") is None


# -- faults ------------------------------------------------------------------------------------
async def test_alarm_mid_move_fails_fast_and_recovers(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    task = asyncio.create_task(g.move_to(440.0, 290.0, 0.0, feed=1000))
    await wait_for(lambda: sim.state()["grbl_state"] == "Run", 5, 0.001, "Run")
    await sim.set_fault(Fault(kind=FaultKind.ALARM, code=1))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(InstrumentError) as err:
        await task
    assert loop.time() - t0 < 0.3  # at once, not at the move's timeout
    assert err.value.code == 1 and "Hard limit" in str(err.value)
    assert g.locked_until_reset and g.needs_homing
    st = await g.status()  # GRBL answers no '?' now; the driver knows why
    assert st.state == "Alarm" and st.alarm == 1
    with pytest.raises(InstrumentError) as err2:
        await g.move_to(10, 10, 0)
    assert err2.value.code == 1 and "soft reset" in str(err2.value)
    st = await g.soft_reset()
    assert st.state == "Alarm" and not g.locked_until_reset and g.needs_homing
    await g.home(timeout=10)
    st = await g.move_to(10.0, 10.0, -1.0)
    assert st.state == "Idle" and sim.state()["homed"]


async def test_error_fault_is_instrument_error(homed: Rig) -> None:
    await homed.sim.set_fault(Fault(kind=FaultKind.ERROR, code=20, count=1))
    with pytest.raises(InstrumentError) as err:
        await homed.gantry.move_to(5, 5, 0)
    assert err.value.code == 20 and "Unsupported" in str(err.value)
    assert err.value.command == "G90 G0 X5.000 Y5.000 Z0.000"
    assert homed.sim.state()["mpos"] == [0.0, 0.0, 0.0]  # not executed
    await homed.gantry.move_to(5, 5, 0)


async def test_no_reply_is_a_timeout_naming_the_command(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout) as err:
        await g.gripper(True)
    assert err.value.command == "M8" and "gantry" in str(err.value)
    with pytest.raises(DeviceTimeout) as err:
        await g.move_to(20, 0, 0)
    assert err.value.command == "G90 G0 X20.000 Y0.000 Z0.000"
    assert "not re-sent" in str(err.value)
    await sim.clear_fault(FaultKind.NO_REPLY)
    await g.status()


async def test_lost_ok_of_a_move_is_checked_not_resent(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    before = sim.state()["lines_processed"]
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))  # swallow the move's 'ok'
    st = await g.move_to(100.0, 50.0, -10.0)
    assert st.state == "Idle" and near(sim.state()["mpos"], (100.0, 50.0, -10.0))
    assert sim.state()["lines_processed"] == before + 1  # sent once
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))  # swallow the M8's 'ok'
    await g.gripper(True)  # checked with $G (M8 in the parser state), not sent again
    assert sim.state()["gripper_closed"]
    assert sim.state()["lines_processed"] == before + 3  # M8 once, then $G


async def test_garbled_reply_is_protocol_error(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    with pytest.raises(ProtocolError) as err:
        await g.status()
    assert err.value.raw and "gantry" in str(err.value)
    assert (await g.status()).state == "Idle"


async def test_disconnect_and_return(homed: Rig) -> None:
    g, sim = homed.gantry, homed.sim
    await g.move_to(30.0, 30.0, -5.0)
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.2))
    await wait_for(lambda: not sim.state()["connected"], 5, 0.01, "link down")
    await wait_for(lambda: sim.state()["connected"], 5, 0.01, "link back")
    # The replugged controller reset (DTR): it wants homing; the same client object goes on.
    with pytest.raises(InstrumentError) as err:
        await g.move_to(40.0, 30.0, -5.0)
    assert err.value.code == 9 and g.needs_homing and "home" in str(err.value)
    await g.home(timeout=10)
    st = await g.move_to(40.0, 30.0, -5.0)
    assert st.state == "Idle" and g.port.stats.reconnects >= 1


# -- ophyd-async / Bluesky --------------------------------------------------------------------
@pytest.fixture
def re_rig(tmp_path: Path, RE: RunEngine) -> Iterator[tuple[Rig, GantryDevice]]:
    rig = Rig(tmp_path)

    async def start() -> GantryDevice:
        await rig.start()
        await rig.gantry.home(timeout=10)
        device = make_gantry_device("gantry", rig.gantry)
        await device.connect()
        return device

    device = in_re_loop(start())
    yield rig, device
    in_re_loop(rig.stop())


def test_mv_rd_and_describe(
    RE: RunEngine, re_rig: tuple[Rig, GantryDevice], docs: ValidatedDocuments
) -> None:
    rig, gantry = re_rig
    RE(bps.mv(gantry.x, 10.0))
    assert near(rig.sim.state()["mpos"], (10.0, 0.0, 0.0))
    assert rig.sim.state()["grbl_state"] == "Idle"

    def read_back():  # type: ignore[no-untyped-def]
        return (yield from bps.rd(gantry.x))

    assert RE(read_back()).plan_result == pytest.approx(10.0)
    RE(bps.mv(gantry.position, "rack/2"))
    assert near(rig.sim.state()["mpos"], LOCATIONS["rack/2"])
    desc = in_re_loop(gantry.describe())
    assert desc["gantry-x"]["units"] == "mm" and desc["gantry-x"]["precision"] == 3

    async def bad_location() -> None:
        await gantry.position.set("nowhere")

    with pytest.raises(InvalidParameter, match="unknown location"):
        in_re_loop(bad_location())


def test_scan_and_list_scan(
    RE: RunEngine, re_rig: tuple[Rig, GantryDevice], docs: ValidatedDocuments
) -> None:
    rig, gantry = re_rig
    RE(bp.scan([gantry.y], gantry.x, 0, 50, 6))
    assert docs.event_data("gantry-x") == pytest.approx([0, 10, 20, 30, 40, 50], abs=0.01)
    assert docs.event_data("gantry-y") == pytest.approx([0.0] * 6, abs=0.01)
    (desc,) = docs.of("descriptor")
    assert desc["data_keys"]["gantry-x"]["units"] == "mm"
    (uid,) = RE(bp.list_scan([gantry], gantry.z, [-10.0, -30.0, -5.0])).run_start_uids
    (desc,) = [d for d in docs.of("descriptor") if d["run_start"] == uid]
    events = [e for e in docs.of("event") if e["descriptor"] == desc["uid"]]
    assert [e["data"]["gantry-z"] for e in events] == pytest.approx([-10, -30, -5], abs=0.01)
    assert [e["data"]["gantry-x"] for e in events] == pytest.approx([50.0] * 3, abs=0.01)
    assert set(desc["data_keys"]) == {"gantry-x", "gantry-y", "gantry-z"}
    RE(bp.count([gantry], 2))
    assert [d["exit_status"] for d in docs.of("stop")] == ["success"] * 3
    assert near(rig.sim.state()["mpos"], (50.0, 0.0, -5.0))


def test_stop_and_safe_state(RE: RunEngine, re_rig: tuple[Rig, GantryDevice]) -> None:
    rig, gantry = re_rig
    sim = rig.sim

    async def move_then_stop() -> None:
        resets = rig.gantry.resets_seen
        status = gantry.x.set(440.0)
        await wait_for(lambda: sim.state()["grbl_state"] == "Run", 5, 0.001, "Run")
        await gantry.x.stop()
        with pytest.raises((RuntimeError, InstrumentError)):
            await status
        # Feed hold first, so the reset found the machine stopped: no ALARM:3, position kept.
        s = sim.state()
        assert s["grbl_state"] == "Idle" and not s["moving"] and s["planner_blocks"] == 0
        assert 0 < s["mpos"][0] < 440 and s["homed"] and not rig.gantry.needs_homing
        assert rig.gantry.resets_seen == resets + 1
        x = s["mpos"][0]
        assert await gantry.x.user_readback.get_value() == pytest.approx(x, abs=0.01)
        await gantry.safe_state()
        assert sim.state()["grbl_state"] == "Idle" and rig.gantry.resets_seen == resets + 2
        await gantry.x.set(20.0)  # works on after a stop
        assert sim.state()["mpos"][0] == pytest.approx(20.0, abs=0.01)

    in_re_loop(move_then_stop())
