"""Furnace driver (Eurotherm 3216 / EPC3016) against the in-process simulator.

Every client method runs over Modbus TCP, over Modbus RTU on the simulator's pty, and over RTU
framing through TCP (the simulator's serial line also served on a socket, as a serial device
server in a lab serves an RS-485 line).
Faults are the simulator's, seen from the driver. The Bluesky tests use the real RunEngine with
schema-validated documents; the simulator and the devices run on the RunEngine's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine

from drivers.errors import (
    DeviceTimeout,
    InstrumentError,
    InvalidParameter,
    NotConnected,
)
from drivers.instruments.furnace import (
    Dwell,
    End,
    Furnace,
    FurnaceAlarm,
    FurnaceProgram,
    FurnaceSettings,
    Ramp,
    RampTime,
    RunMode,
    Step,
)
from drivers.links import Links, ModbusLink
from drivers.ophyd.furnace import make_furnace_device
from hardware_sims.base import SerialEndpointConfig
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.furnace import FurnaceConfig, FurnaceSim
from tests.conftest import make_context
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.support.procs import wait_for

FRAMINGS = ["tcp", "rtu", "rtu_tcp"]
TIME_SCALE = 200.0
#: Heating to 300 °C and settling takes ~15 virtual minutes (PID with a lagging heater).
RE_TIME_SCALE = 1000.0


def link_for(sim: FurnaceSim, framing: str, timeout: float = 0.3) -> ModbusLink:
    ep = sim.endpoint()
    if framing == "tcp":
        return ModbusLink(framing="tcp", host="127.0.0.1", port=ep["tcp_port"], unit_id=1,
                          timeout_s=timeout)
    if framing == "rtu_tcp":
        host, port = ep["tcp"].split(":")
        return ModbusLink(framing="rtu_tcp", host=host, port=int(port), unit_id=1,
                          timeout_s=timeout)
    return ModbusLink(framing="rtu", url=str(ep["pty"]), unit_id=1, timeout_s=timeout)


@dataclass
class Rig:
    sim: FurnaceSim
    client: Furnace
    links: Links
    framing: str


async def make_rig(tmp_path: Path, framing: str, read_retries: int = 0, **cfg: Any) -> Rig:
    ctx = make_context(tmp_path, time_scale=TIME_SCALE)
    if framing == "rtu_tcp":  # the RS-485 line also served on a socket (a serial server)
        cfg.setdefault("serial", SerialEndpointConfig(pty=True, tcp_port=0))
    sim = FurnaceSim("furnace", FurnaceConfig(**cfg), ctx)
    await sim.start()
    links = Links()
    settings = FurnaceSettings(link=link_for(sim, framing), read_retries=read_retries,
                               max_setpoint_c=1100.0)
    return Rig(sim, Furnace("furnace", settings, links), links, framing)


@pytest.fixture(params=FRAMINGS)
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path, request.param)
    yield r
    await r.links.close()
    await r.sim.stop()


# -- client methods ----------------------------------------------------------------------------
async def test_reads(rig: Rig) -> None:
    await rig.sim.control("set_pv", {"value": 850.0})
    assert await rig.client.temperature() == 850.0
    assert await rig.client.temperature() == 850.0  # a read changes nothing
    assert await rig.client.setpoint() == pytest.approx(25.0)
    assert 0.0 <= await rig.client.output() <= 100.0
    status = await rig.client.status()
    assert status.word == rig.sim.model.status_word
    assert not status.over_temperature and not status.sensor_break and not status.standby
    assert status.fault is None
    state = await rig.client.program_state()
    assert state.mode is RunMode.RESET and state.segment == 0 and not state.started


async def test_set_setpoint_and_rate(rig: Rig) -> None:
    await rig.client.set_rate(12.5)
    assert await rig.client.rate() == 12.5
    assert rig.sim.model.rate == pytest.approx(12.5)
    await rig.client.set_setpoint(300.0)
    assert await rig.client.setpoint() == 300.0
    assert rig.sim.model.sp1 == pytest.approx(300.0)
    # rate-limited: the working SP ramps from the PV, it does not jump
    assert await rig.client.working_setpoint() < 300.0
    await rig.client.set_rate(0)
    assert rig.sim.model.rate == 0.0


async def test_out_of_range_refused_with_nothing_sent(rig: Rig) -> None:
    before = rig.sim.requests
    with pytest.raises(InvalidParameter, match=r"setpoint 5000 °C outside 0\.\.1100 °C"):
        await rig.client.set_setpoint(5000)
    with pytest.raises(InvalidParameter, match="furnace"):
        await rig.client.set_setpoint(-10)
    with pytest.raises(InvalidParameter, match=r"rate -1 °C/min outside 0\.\.600 °C/min"):
        await rig.client.set_rate(-1)
    with pytest.raises(InvalidParameter, match="segment 2: target 1500"):
        await rig.client.run_program([Ramp(target_c=100, rate_c_min=10), Step(target_c=1500)])
    with pytest.raises(InvalidParameter, match="segment 1: rate 9000"):
        await rig.client.run_program([Ramp(target_c=100, rate_c_min=9000)])
    assert rig.sim.requests == before
    assert rig.sim.model.sp1 == pytest.approx(25.0) and rig.sim.model.rate == 0.0


async def test_setpoint_above_instrument_limit_is_its_exception(rig: Rig) -> None:
    # The driver's limit allows 1100 °C; the instrument's SP high limit (111) is lower here.
    await rig.client.modbus.write_register(111, 5000)  # 500.0 °C at 1 decimal
    with pytest.raises(InstrumentError) as info:
        await rig.client.set_setpoint(900)
    assert info.value.code == 3 and "ILLEGAL_VALUE" in str(info.value)
    assert "write target SP = 900" in str(info.value)


def test_program_models_validate() -> None:
    with pytest.raises(ValueError, match="only be the last"):
        FurnaceProgram(segments=[End(), Step(target_c=100)])
    with pytest.raises(ValueError):
        Ramp(target_c=100, rate_c_min=0)
    with pytest.raises(ValueError):
        Dwell(duration_s=-5)
    with pytest.raises(ValueError):
        FurnaceProgram(segments=[Step(target_c=10)] * 26)
    p = FurnaceProgram.model_validate(
        {"segments": [{"kind": "ramp", "target_c": 200, "rate_c_min": 50},
                      {"kind": "dwell", "duration_s": 60}, {"kind": "end"}]}
    )
    assert p.body() == [Ramp(target_c=200, rate_c_min=50), Dwell(duration_s=60)]


async def test_program_runs_to_completion(rig: Rig) -> None:
    program = FurnaceProgram(segments=[
        Ramp(target_c=100, rate_c_min=600), RampTime(target_c=120, duration_s=20),
        Dwell(duration_s=30), Step(target_c=60),
    ])
    await rig.client.run_program(program)
    segs = rig.sim.model.program.segments
    assert [s.type for s in segs[:5]] == [1, 2, 3, 4, 0]
    assert (segs[0].target, segs[0].value, segs[1].value, segs[2].value) == (100, 600, 20, 30)
    assert rig.sim.model.program.ramp_units == 1  # per minute
    state = await rig.client.program_state()
    assert state.started
    done = await rig.client.wait_program_done(timeout=10)
    assert done.mode is RunMode.COMPLETE
    assert (await rig.client.status()).program_end
    assert rig.sim.model.wsp == pytest.approx(60.0)


async def test_hold_and_reset(rig: Rig) -> None:
    await rig.client.run_program([Ramp(target_c=200, rate_c_min=1), End()])
    await rig.client.hold()
    assert (await rig.client.run_mode()) is RunMode.HOLD
    psp = (await rig.client.program_state()).programmer_sp_c
    clock = rig.sim.ctx.clock
    t0 = clock.now()
    await wait_for(lambda: clock.now() > t0 + 60, timeout=5)  # a virtual minute at 1 °C/min
    assert (await rig.client.program_state()).programmer_sp_c == psp  # held: frozen
    with pytest.raises(InstrumentError, match="already running"):
        await rig.client.run_program([Step(target_c=50)])
    await rig.client.resume()
    assert (await rig.client.run_mode()) is RunMode.RUN
    await rig.client.reset_program()
    assert rig.sim.model.run_mode == 1
    assert (await rig.client.program_state()).segment == 0


# -- lost replies: sent once, state read back ---------------------------------------------------
async def test_setpoint_reply_lost_is_verified_not_resent(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    before = rig.sim.requests
    await rig.client.set_setpoint(420.0)  # the readback proves it happened
    assert rig.sim.model.sp1 == pytest.approx(420.0)
    assert rig.sim.requests - before == 2  # one write, one read: never re-sent


async def test_program_start_reply_lost_reads_run_mode(rig: Rig) -> None:
    await rig.client.write_program(FurnaceProgram(segments=[Dwell(duration_s=600)]))
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    before = rig.sim.requests
    await rig.client.start_program()
    assert rig.sim.model.run_mode == 2
    assert rig.sim.requests - before == 2  # the run write once, then the run mode read


# -- faults --------------------------------------------------------------------------------------
async def test_no_reply_is_device_timeout(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout) as info:
        await rig.client.temperature()
    text = str(info.value)
    assert text.startswith("furnace: no reply to 'read PV (reg 1") and "0.3 s" in text
    assert info.value.device == "furnace"
    await rig.sim.clear_fault(FaultKind.NO_REPLY)
    assert await rig.client.temperature() == pytest.approx(rig.sim.model.pv, abs=1)


async def test_a_late_reply_does_not_desynchronise_later_requests(rig: Rig) -> None:
    """A reply that comes after the timeout: that read fails, and every request after it gets its
    own answer (on Modbus TCP the late reply would otherwise be taken by pymodbus as a stray
    transaction and the next requests time out one after the other)."""
    await rig.sim.control("set_pv", {"value": 640.0})
    await rig.sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.6, count=1))
    with pytest.raises(DeviceTimeout):
        await rig.client.temperature()
    await asyncio.sleep(0.7)  # the late reply has now arrived on the old link (or the line)
    for _ in range(5):
        assert await rig.client.temperature() == 640.0
    await rig.client.set_setpoint(222.0)
    assert rig.sim.model.sp1 == pytest.approx(222.0)


async def test_a_cancelled_read_keeps_the_bus_until_its_reply(rig: Rig) -> None:
    """A caller cancelled while its request is on the wire (an aborted plan, a monitor read given
    up): the request keeps the bus until its reply, so the next request is not answered with the
    reply meant for the first one, nor lost behind it."""
    await rig.sim.control("set_pv", {"value": 510.0})
    await rig.sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.2, count=1))
    slow = asyncio.create_task(rig.client.temperature())
    await wait_for(lambda: rig.sim.requests > 0 and rig.sim.faults.get(FaultKind.LATE_REPLY)
                   is None, timeout=5, what="the slow request to reach the furnace")
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The exchange still holds the bus: nothing else goes on the wire before its reply. (The
    # simulator's pymodbus TCP server, like many real devices, answers only the first of two
    # requests that arrive together, so a second request sent now would simply be lost.)
    assert rig.client.modbus.bus.lock.locked()
    await rig.client.set_setpoint(333.0)
    assert rig.sim.model.sp1 == pytest.approx(333.0)
    for _ in range(3):
        assert await rig.client.temperature() == 510.0


async def test_garbled_reply(rig: Rig) -> None:
    """A garbled reply: pymodbus 3.16 discards a frame with a bad CRC (RTU) or a bad MBAP
    header/length (TCP) and keeps waiting, so what the user gets is DeviceTimeout naming the
    command (a ProtocolError only comes from a frame that decodes to the wrong PDU). With a
    read retry, one garbled reply costs nothing."""
    await rig.sim.set_fault(Fault(kind=FaultKind.GARBLE))
    with pytest.raises(DeviceTimeout) as info:
        await rig.client.temperature()
    assert "read PV (reg 1" in str(info.value)
    await rig.sim.clear_fault(FaultKind.GARBLE)
    rig.client.settings.read_retries = 2
    await rig.sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    assert await rig.client.temperature() == pytest.approx(rig.sim.model.pv, abs=1)


async def test_exception_reply_is_instrument_error(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, code=4, count=1))
    with pytest.raises(InstrumentError) as info:
        await rig.client.setpoint()
    assert info.value.code == 4 and info.value.message == "DEVICE_FAILURE"
    assert "'read target SP (reg 2" in str(info.value)
    assert await rig.client.setpoint() == pytest.approx(25.0)


async def test_disconnect_then_reconnect(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.5))
    with pytest.raises((NotConnected, DeviceTimeout)) as info:
        await rig.client.temperature()
    assert info.value.device == "furnace"
    await asyncio.sleep(0)  # let the simulator's restore task run when it is due

    async def back() -> float | None:
        try:
            return await rig.client.temperature()
        except (NotConnected, DeviceTimeout):
            await asyncio.sleep(0.1)
            return None

    deadline = asyncio.get_running_loop().time() + 10
    value = None
    while value is None and asyncio.get_running_loop().time() < deadline:
        value = await back()
    # same client, same links: nothing recreated
    assert value == pytest.approx(rig.sim.model.pv, abs=1)
    await rig.client.set_setpoint(30.0)
    assert rig.sim.model.sp1 == pytest.approx(30.0)


async def test_alarm_shows_and_acknowledges(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.ALARM, code=1))
    status = await rig.client.status()
    assert status.over_temperature and status.alarms[0] and status.new_alarm
    assert "over-temperature" in (status.fault or "")
    assert await rig.client.output() == 0.0
    await rig.client.acknowledge_alarms()  # PV is below the threshold: the latch clears
    status = await rig.client.status()
    assert not status.over_temperature and not status.new_alarm


async def test_heater_off_safe_state(rig: Rig) -> None:
    await rig.client.set_setpoint(500.0)
    await rig.client.run_program([Ramp(target_c=400, rate_c_min=5)])
    await rig.client.heater_off()
    m = rig.sim.model
    assert m.run_mode == 1 and m.sp1 == pytest.approx(25.0) and m.inst_mode == 1
    assert (await rig.client.status()).standby
    await rig.client.set_setpoint(300.0)
    assert await rig.client.output() == 0.0  # standby: outputs stay off
    await rig.client.operate()
    assert m.inst_mode == 0


async def test_other_unit_id_is_silent_on_rtu(tmp_path: Path) -> None:
    r = await make_rig(tmp_path, "rtu")
    try:
        links = Links()
        link = link_for(r.sim, "rtu", timeout=0.2).model_copy(update={"unit_id": 7})
        await r.links.close()  # one owner per pty
        other = Furnace("furnace-7", FurnaceSettings(link=link, read_retries=0), links)
        with pytest.raises(DeviceTimeout, match="furnace-7: no reply to 'read PV"):
            await other.temperature()
        await links.close()
    finally:
        await r.sim.stop()


# -- ophyd-async in the real RunEngine -----------------------------------------------------------
@dataclass
class ReRig:
    sim: FurnaceSim
    links: Links
    device: Any


@pytest.fixture(params=FRAMINGS)
def re_rig(request: pytest.FixtureRequest, RE: RunEngine, tmp_path: Path) -> Iterator[ReRig]:
    async def start() -> ReRig:
        ctx = make_context(tmp_path, time_scale=RE_TIME_SCALE)
        sim = FurnaceSim("furnace", FurnaceConfig(serial=SerialEndpointConfig(tcp_port=0)), ctx)
        await sim.start()
        links = Links()
        client = Furnace("furnace", FurnaceSettings(link=link_for(sim, request.param, 0.5),
                                                    read_retries=1), links)
        device = make_furnace_device("furnace", client, tolerance_c=3.0, settle_s=0.1,
                                     poll_period=0.1)
        await device.connect()
        return ReRig(sim, links, device)

    rig = in_re_loop(start())
    yield rig

    async def stop() -> None:
        await rig.links.close()
        await rig.sim.stop()

    in_re_loop(stop())


def test_mv_then_count(RE: RunEngine, docs: ValidatedDocuments, re_rig: ReRig) -> None:
    furnace = re_rig.device
    RE(bps.mv(furnace.setpoint, 300.0))
    assert abs(re_rig.sim.model.pv - 300.0) <= 3.0
    RE(bp.count([furnace], 3))
    events = docs.of("event")
    assert len(events) == 3
    temps = docs.event_data("furnace-temperature")
    assert all(abs(t - 300.0) <= 5.0 for t in temps)
    assert docs.event_data("furnace-setpoint-target") == [300.0] * 3
    assert docs.event_data("furnace-programmer-state") == ["RESET"] * 3
    assert docs.event_data("furnace-over_temperature") == [False] * 3
    key = docs.of("descriptor")[0]["data_keys"]["furnace-temperature"]
    assert key["units"] == "degC" and key["precision"] == 1
    assert key["source"].startswith("modbus+")
    loc = in_re_loop(furnace.setpoint.locate())
    assert loc["setpoint"] == 300.0


def test_alarm_fails_setpoint_move(RE: RunEngine, re_rig: ReRig) -> None:
    furnace = re_rig.device

    async def move_and_trip() -> BaseException | None:
        status = furnace.setpoint.set(900.0)
        await wait_for(lambda: re_rig.sim.model.pv > 100, timeout=10)
        assert not status.done
        await re_rig.sim.set_fault(Fault(kind=FaultKind.ALARM, code=1))
        try:
            await asyncio.wait_for(status, 5)
        except Exception as exc:  # the failure is what we test
            return exc
        return None

    err = in_re_loop(move_and_trip())
    assert isinstance(err, FurnaceAlarm), err
    assert "over-temperature" in str(err) and "furnace" in str(err)
    assert err.status.over_temperature
    assert in_re_loop(furnace.over_temperature.get_value()) is True


def test_program_run_in_runengine(RE: RunEngine, docs: ValidatedDocuments,
                                  re_rig: ReRig) -> None:
    furnace = re_rig.device
    program = FurnaceProgram(segments=[Ramp(target_c=150, rate_c_min=300),
                                       Dwell(duration_s=60), Step(target_c=40)])

    def plan():  # type: ignore[no-untyped-def]
        yield from bps.mv(furnace.programmer, program)
        return (yield from bps.rd(furnace.programmer.state))

    result = RE(plan())
    assert result.plan_result == "COMPLETE"
    assert re_rig.sim.model.run_mode == 16
    # the AsyncStatus form, then the safe state
    async def run() -> None:
        await furnace.run_program([Step(target_c=60), Dwell(duration_s=30)])

    in_re_loop(run())
    assert re_rig.sim.model.run_mode == 16 and re_rig.sim.model.wsp == pytest.approx(60.0)
    in_re_loop(furnace.safe_state())
    m = re_rig.sim.model
    assert m.run_mode == 1 and m.inst_mode == 1 and m.sp1 == pytest.approx(25.0)
