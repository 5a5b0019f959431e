"""Keithley 2400 simulator, seen from a raw pyserial client on its real pseudo-terminal.

The simulator runs on the test's event loop; every blocking pyserial call goes through
``asyncio.to_thread``. Replies are read up to the 2400's configured terminator (CR by default).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import serial

from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.probe import ProbeConfig, ProbeSim, nordheim_resistivity
from tests.support.procs import wait_for

NAN = 9.91e37
TERM = b"\r"


class Client:
    """A raw SCPI client: writes a line, reads one response up to the terminator."""

    def __init__(self, path: str, term: bytes = TERM) -> None:
        self.path = path
        self.term = term
        self.ser = serial.Serial(path, timeout=2.0)

    async def send(self, line: str, eol: bytes = b"\n") -> None:
        await asyncio.to_thread(self.ser.write, line.encode("latin-1") + eol)

    async def read(self, timeout: float = 2.0) -> bytes:
        self.ser.timeout = timeout
        return await asyncio.to_thread(self.ser.read_until, self.term)

    async def ask(self, line: str, eol: bytes = b"\n") -> str:
        await self.send(line, eol)
        raw = await self.read()
        assert raw.endswith(self.term), f"no complete reply to {line!r}: {raw!r}"
        return raw[: -len(self.term)].decode("ascii")

    async def silent(self, line: str, wait: float = 0.3) -> None:
        """Send ``line`` and check that nothing comes back within ``wait`` seconds."""
        await self.send(line)
        assert await self.read(timeout=wait) == b""

    def close(self) -> None:
        self.ser.close()


@pytest.fixture
async def probe(sim_ctx: SimContext) -> AsyncIterator[ProbeSim]:
    sim = ProbeSim("probe", ProbeConfig(), sim_ctx)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def client(probe: ProbeSim) -> AsyncIterator[Client]:
    c = await asyncio.to_thread(Client, probe.endpoint()["pty"])
    try:
        yield c
    finally:
        c.close()


def place_crucible(ctx: SimContext, location: str = "station", slot: str = "rack/1") -> str:
    """Carry the crucible in ``slot`` to ``location`` with the world's gripper."""
    world = ctx.world
    src, dst = world.locations[slot], world.locations[location]
    crucible = world.grip(src.x, src.y, src.z)
    assert crucible is not None
    placed = world.release(dst.x, dst.y, dst.z)
    assert placed is not None and placed.location == location
    return placed.id


def dose(ctx: SimContext, powders_mg: dict[str, float], location: str = "station") -> None:
    for element, mg in powders_mg.items():
        assert ctx.world.add_powder(location, element, mg) is not None


def fields(reply: str) -> list[float]:
    return [float(x) for x in reply.split(",")]


CANTOR = {"Fe": 55.8, "Co": 58.9, "Ni": 58.7, "Cr": 52.0, "Mn": 54.9}  # ~ equimolar, mg


# -- conformance ------------------------------------------------------------------------------


@pytest.mark.conformance
async def test_identity_opc_and_empty_error_queue(client: Client) -> None:
    assert await client.ask("*IDN?") == (
        "KEITHLEY INSTRUMENTS INC.,MODEL 2400,1278437,C30   Mar 17 2006 09:29:29/A02  /K/J"
    )
    assert await client.ask("*OPC?") == "1"
    assert await client.ask("SYST:ERR?") == '0,"No error"'
    assert await client.ask(":SYST:ERR:NEXT?") == '0,"No error"'


@pytest.mark.conformance
async def test_undefined_header_is_queued_and_not_answered(client: Client) -> None:
    await client.silent(":SYST:BOGUS?")
    assert await client.ask("SYST:ERR?") == '-113,"Undefined header"'
    assert await client.ask("SYST:ERR?") == '0,"No error"'
    assert await client.ask("*ESR?") == "32"  # command error bit
    assert await client.ask("*ESR?") == "0"  # reading clears it


@pytest.mark.conformance
async def test_read_returns_five_fields_with_nan_marker(
    probe: ProbeSim, client: Client, sim_ctx: SimContext
) -> None:
    place_crucible(sim_ctx)
    dose(sim_ctx, CANTOR)
    # pymeasure's Keithley2400 sends this at connect; *RST sense function is "CURR:DC" only.
    await client.send(":FORM:ELEM VOLT, CURR, RES, TIME, STAT")
    await client.send(":SOUR:VOLT 0.0001;:OUTP ON")  # ~33 µA, under the 105 µA compliance
    reply = await client.ask(":READ?")
    parts = reply.split(",")
    assert len(parts) == 5
    for p in parts:
        assert len(p) == len("+1.000000E-03") and p[0] in "+-" and p[9] == "E", p
    volts, amps, ohms, stamp, status = fields(reply)
    assert volts == pytest.approx(1e-4)  # the programmed source value (voltage not measured)
    assert ohms == NAN and parts[2] == "+9.910000E+37"  # resistance is not a sense function
    assert 0 < amps < 105e-6 and stamp >= 0
    word = int(status)
    assert not word & 8  # not in compliance
    assert word & (1 << 12) and word & (1 << 14) and not word & (1 << 13)  # I-meas, V-sour


@pytest.mark.conformance
async def test_short_long_forms_case_and_compound_messages(client: Client) -> None:
    await client.send(":SYSTem:RSENse ON")
    assert await client.ask(":syst:rsen?") == "1"
    await client.send("SYST:RSEN OFF")
    assert await client.ask("SYSTEM:RSENSE?") == "0"
    # tree-relative path after ';', replies joined with ';'
    await client.send(":SOUR:FUNC CURR;CURR 0.002;:SENS:FUNC 'RES';RES:MODE MAN")
    assert await client.ask(":SOUR:FUNC?;:SOUR:CURR:LEV?;*OPC?") == "CURR;+2.000000E-03;1"
    assert await client.ask(":SENS:RES:MODE?") == "MAN"
    assert await client.ask(":SENSe1:FUNCtion:ON?") == '"CURR:DC","RES"'
    assert await client.ask(":OUTPut1:STATe?") == "0"
    # CR as the line end is accepted as well as LF
    assert await client.ask("*OPC?", eol=b"\r") == "1"
    assert await client.ask("SYST:ERR?") == '0,"No error"'


@pytest.mark.conformance
async def test_out_of_range_and_illegal_values(client: Client) -> None:
    await client.send(":SOUR:CURR 0.001")
    await client.send(":SOUR:CURR 2")  # beyond the 2400's 1.05 A
    assert await client.ask(":SOUR:CURR?") == "+1.000000E-03"  # unchanged
    assert await client.ask("SYST:ERR?") == '-222,"Parameter data out of range"'
    await client.send(":SOUR:VOLT -300")
    assert await client.ask("SYST:ERR?") == '-222,"Parameter data out of range"'
    await client.send(":SOUR:FUNC RES")
    assert await client.ask("SYST:ERR?") == '-224,"Illegal parameter value"'
    await client.send(':SENS:FUNC "TEMP"')
    assert await client.ask("SYST:ERR?") == '-224,"Illegal parameter value"'
    await client.send(":SOUR:CURR")
    assert await client.ask("SYST:ERR?") == '-109,"Missing parameter"'
    await client.send(":SOUR:CURR abc")
    assert await client.ask("SYST:ERR?") == '-104,"Data type error"'
    await client.send(":SOUR:CURR MAX")
    assert await client.ask(":SOUR:CURR?") == "+1.050000E+00"
    assert await client.ask("SYST:ERR?") == '0,"No error"'


@pytest.mark.conformance
async def test_error_queue_order_and_overflow(client: Client) -> None:
    await client.send(":SOUR:CURR 5")  # -222
    await client.send("BOGUS")  # -113
    await client.send(":SOUR:FUNC XYZ")  # -224
    assert await client.ask(":SYST:ERR:COUN?") == "3"
    assert await client.ask("*STB?") == "4"  # EAV: error available
    assert await client.ask("SYST:ERR?") == '-222,"Parameter data out of range"'
    assert await client.ask("SYST:ERR?") == '-113,"Undefined header"'
    assert await client.ask("SYST:ERR?") == '-224,"Illegal parameter value"'
    assert await client.ask("SYST:ERR?") == '0,"No error"'
    assert await client.ask("*STB?") == "0"

    for i in range(12):
        await client.send(f"BOGUS{i}")
    assert await client.ask(":SYST:ERR:COUN?") == "10"
    replies = [await client.ask("SYST:ERR?") for _ in range(11)]
    assert replies[:9] == ['-113,"Undefined header"'] * 9
    assert replies[9] == '-350,"Queue overflow"'
    assert replies[10] == '0,"No error"'

    await client.send("BOGUS")
    await client.send("*CLS")
    assert await client.ask("SYST:ERR?") == '0,"No error"'


@pytest.mark.conformance
async def test_read_with_output_off_gives_803_and_no_reply(client: Client) -> None:
    await client.silent(":READ?")
    assert await client.ask("SYST:ERR?") == '803,"Not permitted with OUTPUT off"'
    # With auto output-off the output turns on for the reading and off after it.
    await client.send(":SOUR:CLE:AUTO ON")
    assert len((await client.ask(":READ?")).split(",")) == 5
    assert await client.ask(":OUTP?") == "0"
    assert await client.ask("SYST:ERR?") == '0,"No error"'


@pytest.mark.conformance
async def test_configured_terminator(sim_ctx: SimContext) -> None:
    sim = ProbeSim("probe-lf", ProbeConfig(terminator="CRLF"), sim_ctx)
    await sim.start()
    c = await asyncio.to_thread(Client, sim.endpoint()["pty"], b"\r\n")
    try:
        await c.send("*OPC?", eol=b"\r")
        assert await c.read() == b"1\r\n"
    finally:
        c.close()
        await sim.stop()


# -- physics ----------------------------------------------------------------------------------


@pytest.mark.physics
async def test_four_point_measurement_sequence(
    probe: ProbeSim, client: Client, sim_ctx: SimContext
) -> None:
    cid = place_crucible(sim_ctx)
    dose(sim_ctx, CANTOR)
    model = probe.model_resistance()
    assert model is not None and 0.1 < model < 10.0
    for line in (
        "*RST",
        ":SOUR:FUNC CURR",
        ":SOUR:CURR 0.001",
        ':SENS:FUNC "RES"',
        ":SENS:RES:MODE MAN",
        ":SYST:RSEN 1",
        ":OUTP ON",
    ):
        await client.send(line)
    volts, amps, ohms, _, status = fields(await client.ask(":READ?"))
    assert amps == pytest.approx(0.001)
    assert ohms == pytest.approx(model, rel=0.02)
    assert volts == pytest.approx(amps * ohms, rel=1e-6)
    word = int(status)
    assert word & (1 << 22)  # remote sense
    assert word & (1 << 13) and word & (1 << 15)  # ohms measured, current sourced
    assert not word & 8  # not in compliance
    await client.send(":OUTP OFF")
    assert await client.ask(":OUTP?") == "0"
    state = probe.state()
    assert state["sample"]["crucible"] == cid
    assert state["four_wire"] is True and state["output_on"] is False
    assert state["last_reading"]["resistance"] == pytest.approx(ohms)
    assert await client.ask("SYST:ERR?") == '0,"No error"'


@pytest.mark.physics
async def test_auto_ohms_after_rst_sources_its_own_current(
    probe: ProbeSim, client: Client, sim_ctx: SimContext
) -> None:
    """The brief's sequence without :SENS:RES:MODE MAN: *RST leaves auto ohms on."""
    place_crucible(sim_ctx)
    dose(sim_ctx, CANTOR)
    for line in ("*RST", ":SOUR:FUNC CURR", ":SOUR:CURR 0.001", ':SENS:FUNC "RES"'):
        await client.send(line)
    await client.send(":SYST:RSEN 1;:OUTP ON")
    _, amps, ohms, _, status = fields(await client.ask(":READ?"))
    assert amps == pytest.approx(0.1)  # 20-ohm range test current, not the programmed 1 mA
    assert ohms == pytest.approx(probe.model_resistance(), rel=0.02)
    assert int(status) & (1 << 10)  # auto ohms


@pytest.mark.physics
async def test_two_wire_adds_lead_resistance(
    probe: ProbeSim, client: Client, sim_ctx: SimContext
) -> None:
    place_crucible(sim_ctx)
    dose(sim_ctx, CANTOR)
    await client.send(':SOUR:FUNC CURR;CURR 0.001;:SENS:FUNC "RES";RES:MODE MAN;:OUTP ON')
    four = []
    two = []
    for _ in range(5):
        await client.send(":SYST:RSEN 1")
        four.append(fields(await client.ask(":READ?"))[2])
        await client.send(":SYST:RSEN 0")
        two.append(fields(await client.ask(":READ?"))[2])
    lead = probe.config.lead_resistance_ohm
    diff = sum(two) / 5 - sum(four) / 5
    assert diff == pytest.approx(lead, rel=0.1)
    assert sum(four) / 5 == pytest.approx(probe.model_resistance(), rel=0.01)


@pytest.mark.physics
async def test_resistance_follows_composition(
    probe: ProbeSim, client: Client, sim_ctx: SimContext
) -> None:
    place_crucible(sim_ctx, slot="rack/1")
    dose(sim_ctx, {"Ni": 100.0})
    await client.send(':SOUR:FUNC CURR;CURR 0.01;:SENS:FUNC "RES";RES:MODE MAN')
    await client.send(":SYST:RSEN 1;:OUTP ON")
    nickel = fields(await client.ask(":READ?"))[2]
    # swap in a Cantor-alloy sample
    world = sim_ctx.world
    st, rack = world.locations["station"], world.locations["rack/1"]
    world.grip(st.x, st.y, st.z)
    world.release(rack.x, rack.y, rack.z)
    place_crucible(sim_ctx, slot="rack/2")
    dose(sim_ctx, CANTOR)
    alloy = fields(await client.ask(":READ?"))[2]
    ratio = nordheim_resistivity({"Fe": 1, "Co": 1, "Ni": 1, "Cr": 1, "Mn": 1}, 100.0) / 6.93
    assert alloy / nickel == pytest.approx(ratio, rel=0.02)


@pytest.mark.physics
async def test_open_circuit_sits_at_compliance(client: Client) -> None:
    # no crucible at the station
    await client.send(":SOUR:FUNC CURR;CURR 0.001;:SENS:FUNC 'RES';RES:MODE MAN")
    await client.send(":SENS:VOLT:PROT 10;:OUTP ON")
    volts, amps, ohms, _, status = fields(await client.ask(":READ?"))
    assert volts == pytest.approx(10.0)
    assert abs(amps) < 1e-9
    assert ohms > 1e9  # manual ohms is V/I of what was measured
    assert int(status) & 8  # compliance
    # auto ohms: beyond the top range is an overflow
    await client.send(":SENS:RES:MODE AUTO")
    _, _, ohms, _, status = fields(await client.ask(":READ?"))
    assert ohms == 9.9e37 and int(status) & 1


@pytest.mark.physics
async def test_sample_resistance_override(probe: ProbeSim, client: Client) -> None:
    await probe.control("set_sample_resistance", {"ohms": 42.0})
    await client.send(':SOUR:FUNC CURR;CURR 0.001;:SENS:FUNC "RES";RES:MODE MAN')
    await client.send(":SYST:RSEN 1;:OUTP ON")
    assert fields(await client.ask(":MEAS:RES?"))[2] == pytest.approx(42.0, rel=0.02)
    await probe.control("set_sample_resistance", {"ohms": None})
    await client.send(":MEAS:RES?")  # open circuit again: compliance at 21 V
    assert int(fields((await client.read()).decode().strip())[4]) & 8
    with pytest.raises(ValueError):
        await probe.control("set_sample_resistance", {"ohms": -1})


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.faults
async def test_no_reply_fault(probe: ProbeSim, client: Client) -> None:
    await probe.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    await client.silent("*IDN?")
    assert await client.ask("*OPC?") == "1"


@pytest.mark.faults
async def test_late_reply_fault(probe: ProbeSim, client: Client) -> None:
    await probe.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.6, count=1))
    await client.send("*OPC?")
    assert await client.read(timeout=0.2) == b""
    assert await client.read(timeout=3.0) == b"1\r"


@pytest.mark.faults
async def test_garble_fault(probe: ProbeSim, client: Client) -> None:
    clean = (await client.ask("*IDN?")).encode() + TERM
    await probe.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    await client.send("*IDN?")
    client.ser.timeout = 2.0
    garbled = await asyncio.to_thread(client.ser.read, len(clean))
    assert len(garbled) == len(clean) and garbled != clean
    assert await client.ask("*OPC?") == "1"


@pytest.mark.faults
async def test_truncate_fault(probe: ProbeSim, client: Client) -> None:
    clean = (await client.ask("*IDN?")).encode() + TERM
    await probe.set_fault(Fault(kind=FaultKind.TRUNCATE, count=1))
    await client.send("*IDN?")
    partial = await client.read(timeout=0.5)
    assert partial == clean[: len(clean) // 2] and not partial.endswith(TERM)
    assert await client.ask("*OPC?") == "1"


@pytest.mark.faults
async def test_error_fault_queues_the_code(probe: ProbeSim, client: Client) -> None:
    await probe.set_fault(Fault(kind=FaultKind.ERROR, code=-113))
    assert probe.state()["error_queue"] == [[-113, "Undefined header"]]
    assert await client.ask("*STB?") == "4"
    assert await client.ask("SYST:ERR?") == '-113,"Undefined header"'
    await probe.set_fault(Fault(kind=FaultKind.ERROR, code=803, count=2))
    assert await client.ask("SYST:ERR:ALL?") == (
        '803,"Not permitted with OUTPUT off",803,"Not permitted with OUTPUT off"'
    )
    assert probe.faults.active() == []


@pytest.mark.faults
async def test_initial_error_fault_from_config(sim_ctx: SimContext) -> None:
    cfg = ProbeConfig(faults=[Fault(kind=FaultKind.ERROR, code=-350)])
    sim = ProbeSim("probe-init", cfg, sim_ctx)
    await sim.start()
    try:
        assert sim.state()["error_queue"] == [[-350, "Queue overflow"]]
    finally:
        await sim.stop()


@pytest.mark.faults
async def test_disconnect_and_reconnect(probe: ProbeSim, client: Client) -> None:
    link = Path(probe.endpoint()["pty"])
    await client.send(":SYST:RSEN 1")
    assert await client.ask("*OPC?") == "1"
    await probe.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.5))
    await wait_for(lambda: not link.exists(), timeout=2, what="pty link gone")
    assert probe.state()["connected"] is False
    client.close()
    await wait_for(link.exists, timeout=5, what="pty link back")
    again = await asyncio.to_thread(Client, str(link))
    try:
        assert await again.ask("*OPC?") == "1"
        assert await again.ask(":SYST:RSEN?") == "1"  # settings survive a cable pull
    finally:
        again.close()

    # down until cleared
    await probe.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    await wait_for(lambda: not link.exists(), timeout=2, what="pty link gone")
    await probe.clear_fault(FaultKind.DISCONNECT)
    assert link.exists()
    third = await asyncio.to_thread(Client, str(link))
    try:
        assert await third.ask("*OPC?") == "1"
    finally:
        third.close()


@pytest.mark.faults
async def test_garbage_bytes_give_invalid_character(client: Client) -> None:
    await client.send("*ID\x8fN?")
    assert await client.ask("SYST:ERR?") == '-101,"Invalid character"'
    # ^X discards a half-sent line
    await asyncio.to_thread(client.ser.write, b":SOUR:CURR 0.5\x18*OPC?\n")
    assert (await client.read()) == b"1\r"
    assert await client.ask(":SOUR:CURR?") == "+0.000000E+00"


def test_nordheim_rule_values() -> None:
    assert nordheim_resistivity({"Ni": 1.0}, 100.0) == pytest.approx(6.93)
    binary = nordheim_resistivity({"Cu": 0.5, "Ni": 0.5}, 100.0)
    assert binary == pytest.approx((1.68 + 6.93) / 2 + 100.0 * 0.5)
    assert math.isclose(nordheim_resistivity({"Xx": 1.0}, 0.0), 50.0)
