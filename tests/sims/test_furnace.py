"""Eurotherm 3216 / EPC3016 simulator: literal RTU frames on the pty, Modbus TCP with pymodbus's
client and mbpoll, the float region, exception replies, physics on the virtual clock, faults.

The simulator runs on the test's event loop; blocking pyserial calls and mbpoll run in a thread
or a subprocess so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import serial
from pymodbus.client import AsyncModbusTcpClient

from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.furnace import FurnaceConfig, FurnaceSim
from hardware_sims.modbus_rtu import crc_ok, with_crc
from tests.conftest import make_context
from tests.support.procs import wait_for

MBPOLL = shutil.which("mbpoll") or "/usr/bin/mbpoll"


# -- helpers -----------------------------------------------------------------------------------
def _read_reply(port: serial.Serial, expect: int | None, timeout: float) -> bytes:
    """Read until ``expect`` bytes came, or the line stays quiet (then return what came)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = port.read(max(1, (expect or 256) - len(buf)))
        if chunk:
            buf += chunk
            if expect is not None and len(buf) >= expect:
                break
            deadline = max(deadline, time.monotonic() + 0.1)  # gap ends a frame
        elif buf:
            break
    return buf


async def rtu(path: str, frame: bytes, expect: int | None, timeout: float = 2.0) -> bytes:
    """Write raw ``frame`` to the pty with pyserial and read the reply."""

    def exchange() -> bytes:
        with serial.Serial(path, 9600, timeout=0.05) as port:
            port.reset_input_buffer()
            port.write(frame)
            return _read_reply(port, expect, timeout)

    return await asyncio.to_thread(exchange)


async def mbpoll(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        MBPOLL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode(errors="replace")


def _float_regs(value: float) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(">f", value)))


def _regs_float(regs: list[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", *regs))[0])


async def make_sim(ctx: SimContext, **cfg: object) -> FurnaceSim:
    sim = FurnaceSim("furnace", FurnaceConfig(**cfg), ctx)  # type: ignore[arg-type]
    await sim.start()
    return sim


@pytest.fixture
async def sim(sim_ctx: SimContext) -> AsyncIterator[FurnaceSim]:
    s = await make_sim(sim_ctx)
    yield s
    await s.stop()


@pytest.fixture
async def tcp(sim: FurnaceSim) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.endpoint()["tcp_port"], timeout=2)
    await client.connect()
    assert client.connected
    yield client
    client.close()


def pty(sim: FurnaceSim) -> str:
    return str(sim.endpoint()["pty"])


# -- conformance: the literal frames of PROTOCOLS.md ------------------------------------------
LITERAL = [
    ("01 03 00 01 00 01 D5 CA", "01 03 02 21 34 A1 C3"),  # PV 8500 -> 850.0 °C
    ("01 03 80 02 00 02 4C 0B", "01 03 04 44 54 80 00 CE D3"),  # PV as float 850.0
    ("01 06 00 18 1F 40 00 0D", "01 06 00 18 1F 40 00 0D"),  # SP1 = 800.0, echo
    ("01 03 03 E7 00 01 34 79", "01 83 02 C0 F1"),  # exception 2
]


@pytest.mark.conformance
@pytest.mark.parametrize(("request_hex", "reply_hex"), LITERAL)
async def test_literal_rtu_frames(sim: FurnaceSim, request_hex: str, reply_hex: str) -> None:
    await sim.control("set_pv", {"value": 850.0})
    reply = bytes.fromhex(reply_hex)
    got = await rtu(pty(sim), bytes.fromhex(request_hex), len(reply))
    assert got == reply, got.hex(" ")


@pytest.mark.conformance
async def test_rtu_sp1_write_is_applied(sim: FurnaceSim) -> None:
    await rtu(pty(sim), bytes.fromhex("01 06 00 18 1F 40 00 0D"), 8)
    assert sim.state()["sp1"] == pytest.approx(800.0)
    assert sim.state()["target_sp"] == pytest.approx(800.0)  # SP1 is the active setpoint
    # read back through the input-register function (4), as the 3216 mirrors 3 and 4
    got = await rtu(pty(sim), with_crc(bytes.fromhex("01 04 00 18 00 01")), 7)
    assert got == with_crc(bytes.fromhex("01 04 02 1F 40"))


@pytest.mark.conformance
async def test_tcp_reads_with_pymodbus(sim: FurnaceSim, tcp: AsyncModbusTcpClient) -> None:
    await sim.control("set_pv", {"value": 850.0})
    rr = await tcp.read_holding_registers(1, count=1, device_id=1)
    assert not rr.isError() and rr.registers == [0x2134]
    rr = await tcp.read_holding_registers(0x8002, count=2, device_id=1)
    assert rr.registers == [0x4454, 0x8000]
    rr = await tcp.read_input_registers(1, count=1, device_id=1)
    assert rr.registers == [0x2134]
    wr = await tcp.write_register(24, 8000, device_id=1)
    assert not wr.isError() and wr.registers == [8000]
    rr = await tcp.read_holding_registers(999, count=1, device_id=1)
    assert rr.isError() and rr.exception_code == 2


@pytest.mark.conformance
async def test_float_region_read_write(sim: FurnaceSim, tcp: AsyncModbusTcpClient) -> None:
    await sim.control("set_pv", {"value": 850.0})
    # eurothermlib reads PV, target SP, manual OP, working OP, working SP as 5 floats
    wr = await tcp.write_registers(0x8000 + 2 * 24, _float_regs(812.5), device_id=1)
    assert not wr.isError()
    assert sim.state()["sp1"] == pytest.approx(812.5)
    rr = await tcp.read_holding_registers(0x8002, count=10, device_id=1)
    assert not rr.isError()
    floats = [_regs_float(rr.registers[i : i + 2]) for i in range(0, 10, 2)]
    assert floats[0] == pytest.approx(850.0)
    assert floats[1] == pytest.approx(812.5)
    # the scaled-integer view of the same parameter
    rr = await tcp.read_holding_registers(24, count=1, device_id=1)
    assert rr.registers == [8125]
    # a read that starts in the middle of a float is refused
    rr = await tcp.read_holding_registers(0x8003, count=2, device_id=1)
    assert rr.isError() and rr.exception_code == 2
    # over the pty too: write SP2 = 300.25 as a float with function 16
    body = bytes.fromhex("01 10") + struct.pack(">HHB", 0x8000 + 2 * 25, 2, 4)
    body += struct.pack(">f", 300.25)
    got = await rtu(pty(sim), with_crc(body), 8)
    assert got == with_crc(bytes.fromhex("01 10") + struct.pack(">HH", 0x8000 + 50, 2))
    assert sim.state()["sp2"] == pytest.approx(300.25)


@pytest.mark.conformance
async def test_mbpoll_tcp(sim: FurnaceSim) -> None:
    await sim.control("set_pv", {"value": 850.0})
    port = str(sim.endpoint()["tcp_port"])
    # mbpoll's -r is 1-based by default: reference 2 is PDU address 1 (PV)
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "1", "-r", "2", "-c", "1", "-1",
                           "127.0.0.1")  # fmt: skip
    assert rc == 0, out
    assert "[2]: \t8500" in out
    # with -0 the reference is the PDU address; float region, big-endian word order
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-0", "-r", str(0x8002), "-t", "4:float",
                           "-B", "-c", "1", "-1", "127.0.0.1")  # fmt: skip
    assert rc == 0, out
    assert "850" in out


@pytest.mark.conformance
async def test_mbpoll_rtu(sim: FurnaceSim) -> None:
    await sim.control("set_pv", {"value": 850.0})
    rc, out = await mbpoll("-m", "rtu", "-b", "9600", "-P", "none", "-a", "1", "-0", "-r", "1",
                           "-c", "1", "-1", pty(sim))  # fmt: skip
    assert rc == 0, out
    assert "[1]: \t8500" in out
    # a write: SP1 = 800.0 (8000) at PDU address 24
    rc, out = await mbpoll("-m", "rtu", "-b", "9600", "-P", "none", "-a", "1", "-0", "-r", "24",
                           pty(sim), "8000")  # fmt: skip
    assert rc == 0, out
    assert sim.state()["sp1"] == pytest.approx(800.0)


@pytest.mark.conformance
async def test_exception_replies(sim: FurnaceSim) -> None:
    path = pty(sim)
    # setpoint above max_c (1200.0): 13000 -> exception 3
    got = await rtu(path, with_crc(bytes.fromhex("01 06 00 18") + (13000).to_bytes(2, "big")), 5)
    assert got == with_crc(bytes.fromhex("01 86 03"))
    # PV is read-only: the address exists, the value is refused (exception 3)
    got = await rtu(path, with_crc(bytes.fromhex("01 06 00 01 00 64")), 5)
    assert got == with_crc(bytes.fromhex("01 86 03"))
    # unsupported function (read coils) -> exception 1
    got = await rtu(path, with_crc(bytes.fromhex("01 01 00 00 00 08")), 5)
    assert got == with_crc(bytes.fromhex("01 81 01"))
    # a block that runs into an unmapped address -> exception 2
    got = await rtu(path, with_crc(bytes.fromhex("01 03 00 05 00 03")), 5)
    assert got == with_crc(bytes.fromhex("01 83 02"))
    # a write that fails changes nothing
    assert sim.state()["sp1"] == pytest.approx(25.0)


@pytest.mark.conformance
async def test_other_unit_and_bad_crc_stay_silent(sim: FurnaceSim) -> None:
    path = pty(sim)
    # unit 2 on the RS-485 line: no reply, not even an exception
    got = await rtu(path, with_crc(bytes.fromhex("02 03 00 01 00 01")), None, timeout=0.5)
    assert got == b""
    # our unit with a corrupted CRC: dropped silently
    got = await rtu(path, bytes.fromhex("01 03 00 01 00 01 D5 CB"), None, timeout=0.5)
    assert got == b""
    # and the line is still in sync for the next request
    got = await rtu(path, with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
    assert crc_ok(got) and got[:3] == bytes.fromhex("01 03 02")


# -- physics -----------------------------------------------------------------------------------
@pytest.mark.physics
async def test_ramp_at_rate_limit_and_overshoot(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, time_scale=500)
    sim = await make_sim(ctx)
    try:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.endpoint()["tcp_port"], timeout=2)
        await client.connect()
        # 30 °C/min to 300 °C: 550 virtual seconds of ramp
        assert not (await client.write_register(35, 300, device_id=1)).isError()
        assert not (await client.write_register(2, 3000, device_id=1)).isError()
        t0 = ctx.clock.now()
        w0 = sim.state()["working_sp"]
        await wait_for(lambda: ctx.clock.now() - t0 > 120, timeout=5)
        rr = await client.read_holding_registers(5, count=1, device_id=1)
        t1 = ctx.clock.now()
        slope = (rr.registers[0] / 10 - w0) / ((t1 - t0) / 60)
        assert slope == pytest.approx(30.0, rel=0.05)
        status = (await client.read_holding_registers(75, count=1, device_id=1)).registers[0]
        assert status & (1 << 13)  # ramp running
        # once the heater lag is worked off, PV tracks the working SP closely
        await wait_for(lambda: ctx.clock.now() - t0 > 450, timeout=5)
        st = sim.state()
        assert st["working_sp"] < 300.0
        assert abs(st["pv"] - st["working_sp"]) < 5.0
        # at the target: working SP = target, PV settles after a bounded overshoot
        peak = 0.0

        def settled() -> bool:
            nonlocal peak
            st = sim.state()
            peak = max(peak, st["pv"])
            return ctx.clock.now() - t0 > 1200 and abs(st["pv"] - 300.0) < 1.0

        await wait_for(settled, timeout=20, interval=0.01)
        assert sim.state()["working_sp"] == pytest.approx(300.0)
        status = (await client.read_holding_registers(75, count=1, device_id=1)).registers[0]
        assert not status & (1 << 13)
        # the heater lag overshoots a ramp end by about rate x lag (30 °C here): bounded
        assert 300.5 < peak < 300.0 + 35.0
        client.close()
    finally:
        await sim.stop()


@pytest.mark.physics
async def test_program_runs_to_completion(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, time_scale=500)
    sim = await make_sim(ctx)
    try:
        path = pty(sim)

        async def write(addr: int, value: int) -> None:
            frame = with_crc(bytes([1, 6]) + struct.pack(">HH", addr, value))
            assert await rtu(path, frame, 8) == frame

        await write(8330, 1)  # ramp units: per minute
        seg = 8336
        await write(seg, 1)  # segment 1: ramp at rate
        await write(seg + 1, 3000)  # to 300.0
        await write(seg + 2, 1200)  # at 120.0 °C/min
        await write(seg + 8, 3)  # segment 2: dwell
        await write(seg + 8 + 2, 120)  # 120 s
        await write(seg + 16, 0)  # segment 3: end
        got = await rtu(path, with_crc(bytes.fromhex("01 03 20 8F 00 01")), 7)
        assert got == with_crc(bytes.fromhex("01 03 02 00 03"))  # configured segments
        await write(23, 2)  # run
        assert sim.state()["run_mode"] == 2
        await wait_for(lambda: sim.state()["program"]["segment"] == 2, timeout=10)
        assert sim.state()["working_sp"] == pytest.approx(300.0)
        await wait_for(lambda: sim.state()["run_mode"] == 16, timeout=10)
        got = await rtu(path, with_crc(bytes.fromhex("01 03 00 17 00 01")), 7)
        assert got == with_crc(bytes.fromhex("01 03 02 00 10"))  # 16: complete
        got = await rtu(path, with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
        assert int.from_bytes(got[3:5], "big") & (1 << 9)  # program end
        assert sim.state()["working_sp"] == pytest.approx(300.0)  # end type dwell: holds
        # The chamber lags a 120 °C/min ramp; holding the end setpoint, it gets there.
        await wait_for(lambda: abs(sim.state()["pv"] - 300.0) < 5.0, timeout=10,
                       what="PV within 5 °C of the held setpoint")
        assert sim.state()["run_mode"] == 16
        await write(23, 1)  # reset
        assert sim.state()["run_mode"] == 1
        # 8 and 16 are states, not commands
        got = await rtu(path, with_crc(bytes.fromhex("01 06 00 17 00 10")), 5)
        assert got == with_crc(bytes.fromhex("01 86 03"))
    finally:
        await sim.stop()


@pytest.mark.physics
async def test_overtemp_alarm_latches_until_acknowledged(sim: FurnaceSim) -> None:
    path = pty(sim)
    await sim.control("set_pv", {"value": 1160.0})  # above overtemp_c 1150
    got = await rtu(path, with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
    status = int.from_bytes(got[3:5], "big")
    assert status & 1 and status & (1 << 12)
    assert sim.state()["output"] == 0.0 and not sim.state()["heater_on"]
    # acknowledge while still over: the alarm stays
    await rtu(path, with_crc(bytes.fromhex("01 06 01 12 00 01")), 8)
    assert sim.state()["alarms"]["overtemp_latched"]
    # back below: still latched until acknowledged
    await sim.control("set_pv", {"value": 900.0})
    got = await rtu(path, with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
    assert int.from_bytes(got[3:5], "big") & 1
    ack = with_crc(bytes.fromhex("01 06 01 12 00 01"))
    assert await rtu(path, ack, 8) == ack
    got = await rtu(path, with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
    assert int.from_bytes(got[3:5], "big") & 1 == 0


# -- faults ------------------------------------------------------------------------------------
READ_PV = bytes.fromhex("01 03 00 01 00 01 D5 CA")


@pytest.mark.faults
async def test_fault_no_reply_then_recovers(sim: FurnaceSim) -> None:
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    assert await rtu(pty(sim), READ_PV, None, timeout=0.5) == b""
    got = await rtu(pty(sim), READ_PV, 7)
    assert crc_ok(got) and got[:3] == bytes.fromhex("01 03 02")


@pytest.mark.faults
async def test_fault_garble_fails_crc(sim: FurnaceSim) -> None:
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    got = await rtu(pty(sim), READ_PV, 7)
    assert len(got) == 7 and not crc_ok(got)


@pytest.mark.faults
async def test_fault_truncate_and_late(sim: FurnaceSim) -> None:
    await sim.set_fault(Fault(kind=FaultKind.TRUNCATE, count=1))
    got = await rtu(pty(sim), READ_PV, 7, timeout=0.5)
    assert 0 < len(got) < 7
    await sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, count=1, delay_s=0.6))
    t0 = time.monotonic()
    got = await rtu(pty(sim), READ_PV, 7, timeout=3)
    assert crc_ok(got) and time.monotonic() - t0 >= 0.5


@pytest.mark.faults
async def test_fault_error_code(sim: FurnaceSim, tcp: AsyncModbusTcpClient) -> None:
    await sim.set_fault(Fault(kind=FaultKind.ERROR, count=1))
    got = await rtu(pty(sim), READ_PV, 5)
    assert got == with_crc(bytes.fromhex("01 83 04"))
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=6, count=1))
    rr = await tcp.read_holding_registers(1, count=1, device_id=1)
    assert rr.isError() and rr.exception_code == 6
    rr = await tcp.read_holding_registers(1, count=1, device_id=1)
    assert not rr.isError()


@pytest.mark.faults
async def test_fault_garble_and_no_reply_on_tcp(sim: FurnaceSim) -> None:
    port = int(sim.endpoint()["tcp_port"])
    request = bytes.fromhex("00 07 00 00 00 06 01 03 00 01 00 01")

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(request)
            try:
                return s.recv(64)
            except TimeoutError:
                return b""

    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    assert await asyncio.to_thread(exchange) == b""
    await sim.control("set_pv", {"value": 850.0})
    assert await asyncio.to_thread(exchange) == bytes.fromhex("00 07 00 00 00 05 01 03 02 21 34")
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    got = await asyncio.to_thread(exchange)
    assert len(got) == 11 and got != bytes.fromhex("00 07 00 00 00 05 01 03 02 21 34")


@pytest.mark.faults
async def test_fault_alarm_forces_overtemp(sim: FurnaceSim) -> None:
    await sim.set_fault(Fault(kind=FaultKind.ALARM, code=1))
    got = await rtu(pty(sim), with_crc(bytes.fromhex("01 03 00 4B 00 01")), 7)
    assert int.from_bytes(got[3:5], "big") & 1
    assert sim.state()["output"] == 0.0
    await rtu(pty(sim), with_crc(bytes.fromhex("01 06 01 12 00 01")), 8)
    assert not sim.state()["alarms"]["overtemp_latched"]


@pytest.mark.faults
async def test_fault_disconnect_and_reconnect(sim: FurnaceSim) -> None:
    path = Path(pty(sim))
    port = int(sim.endpoint()["tcp_port"])
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await client.connect()
    try:
        await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.5))
        assert not path.exists()  # the cable is out: the pty is gone
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        await wait_for(lambda: path.exists() and sim.state()["connected"], timeout=5)
        await wait_for(lambda: _listening(port), timeout=5)
        got = await rtu(str(path), READ_PV, 7)
        assert crc_ok(got)
        client.close()
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1)
        await client.connect()
        assert not (await client.read_holding_registers(1, count=1, device_id=1)).isError()
        # a disconnect that lasts until cleared
        await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
        assert not path.exists() and not _listening(port)
        await sim.clear_fault(FaultKind.DISCONNECT)
        assert path.exists() and _listening(port)
    finally:
        client.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
