"""GRBL 1.1h gantry simulator, talked to with a raw pyserial client on its real pty.

The simulator runs on the test's event loop; every blocking pyserial call goes through
``asyncio.to_thread``. Literal exchanges come from gnea/grbl ``doc/markdown/interface.md`` and
``commands.md``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import serial

from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.gantry import GantryConfig, GantrySim
from tests.support.procs import wait_for

BANNER = b"\r\nGrbl 1.1h ['$' for help]\r\n"
UNLOCK = b"[MSG:'$H'|'$X' to unlock]\r\n"
STATUS_RE = re.compile(r"^<([A-Za-z]+(?::\d)?)\|MPos:(-?[\d.]+),(-?[\d.]+),(-?[\d.]+)\|FS:(\d+),")


class Raw:
    """A raw GRBL client: bytes out, lines in."""

    def __init__(self, path: Path) -> None:
        self.ser = serial.Serial(str(path), 115200, timeout=0.02)

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.ser.write, data)

    async def read_exact(self, n: int, timeout: float = 3.0) -> bytes:
        def blocking() -> bytes:
            buf = b""
            deadline = time.monotonic() + timeout
            while len(buf) < n and time.monotonic() < deadline:
                buf += self.ser.read(n - len(buf))
            return buf

        return await asyncio.to_thread(blocking)

    async def line(self, timeout: float = 3.0) -> str | None:
        def blocking() -> bytes:
            buf = b""
            deadline = time.monotonic() + timeout
            while not buf.endswith(b"\r\n") and time.monotonic() < deadline:
                buf += self.ser.read_until(b"\r\n")
            return buf

        data = await asyncio.to_thread(blocking)
        return data.decode("latin-1").removesuffix("\r\n") if data.endswith(b"\r\n") else None

    async def cmd(self, text: str, timeout: float = 5.0) -> list[str]:
        """Send one line (LF only, as GRBL's stream.py does); lines until ok / error:N."""
        await self.write(text.encode() + b"\n")
        out: list[str] = []
        while True:
            line = await self.line(timeout)
            assert line is not None, f"no reply to {text!r} after {out}"
            out.append(line)
            if line == "ok" or line.startswith("error:"):
                return out

    async def status(self) -> str:
        await self.write(b"?")
        while True:
            line = await self.line()
            assert line is not None, "no status report"
            if line.startswith("<"):
                return line

    async def quiet(self, wait: float = 0.3) -> bytes:
        """Whatever arrives within ``wait`` wall seconds (used to show that nothing does)."""
        return await asyncio.to_thread(self._drain, wait)

    def _drain(self, wait: float) -> bytes:
        buf = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            buf += self.ser.read(256)
        return buf

    def close(self) -> None:
        self.ser.close()


def read_pending(path: Path, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        buf = b""
        deadline = time.monotonic() + 3.0
        while len(buf) < n and time.monotonic() < deadline:
            try:
                buf += os.read(fd, n - len(buf))
            except BlockingIOError:
                time.sleep(0.01)
        return buf
    finally:
        os.close(fd)


def parse(report: str) -> tuple[str, tuple[float, float, float], int]:
    m = STATUS_RE.match(report)
    assert m, report
    return m.group(1), (float(m.group(2)), float(m.group(3)), float(m.group(4))), int(m.group(5))


async def start_sim(ctx: SimContext, **cfg: object) -> GantrySim:
    sim = GantrySim("gantry", GantryConfig(**cfg), ctx)  # type: ignore[arg-type]
    await sim.start()
    return sim


@pytest.fixture
async def gantry(sim_ctx: SimContext) -> AsyncIterator[GantrySim]:
    sim = await start_sim(sim_ctx)
    yield sim
    await sim.stop()


@pytest.fixture
async def client(gantry: GantrySim) -> AsyncIterator[Raw]:
    path = Path(gantry.endpoint()["pty"])
    # The power-up banner waits in the pty; read it plainly (pyserial flushes input on open).
    assert await asyncio.to_thread(read_pending, path, len(BANNER + UNLOCK)) == BANNER + UNLOCK
    raw = Raw(path)
    yield raw
    raw.close()


async def homed(client: Raw) -> None:
    assert await client.cmd("$H") == ["ok"]


async def wait_idle(client: Raw, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = await client.status()
        if report.startswith("<Idle"):
            return report
        await asyncio.sleep(0.005)
    raise TimeoutError("gantry never became Idle")


# -- conformance -----------------------------------------------------------------------------------
@pytest.mark.conformance
async def test_banner_on_connect_and_after_soft_reset(client: Raw) -> None:
    assert await client.quiet(0.1) == b""  # the power-up banner was read by the fixture
    await client.write(b"\x18")
    assert await client.read_exact(len(BANNER + UNLOCK)) == BANNER + UNLOCK
    assert parse(await client.status())[0] == "Alarm"


@pytest.mark.conformance
async def test_manual_exchanges(client: Raw, gantry: GantrySim) -> None:
    assert await client.cmd("G0 X10") == ["error:9"]  # g-code locked out during alarm
    assert await client.cmd("$H") == ["ok"]
    # GRBL's report counters: WCO in the first report after a reset, Ov in the next one.
    assert await client.status() == "<Idle|MPos:0.000,0.000,0.000|FS:0,0|WCO:0.000,0.000,0.000>"
    assert await client.status() == "<Idle|MPos:0.000,0.000,0.000|FS:0,0|Ov:100,100,100>"
    assert await client.status() == "<Idle|MPos:0.000,0.000,0.000|FS:0,0>"
    assert await client.cmd("G99") == ["error:20"]
    assert await client.cmd("$G") == ["[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]", "ok"]
    settings = await client.cmd("$$")
    assert settings[-1] == "ok"
    assert settings[0] == "$0=10"
    for expected in ("$20=1", "$22=1", "$110=6000.000", "$112=1500.000", "$120=500.000"):
        assert expected in settings
    assert "$130=450.000" in settings and "$132=100.000" in settings
    assert len(settings) == 35
    assert await client.cmd("$I") == ["[VER:1.1h.20190830:]", "[OPT:VZ+,15,128]", "ok"]
    params = await client.cmd("$#")
    assert params[0] == "[G54:0.000,0.000,0.000]" and params[-2:] == [
        "[PRB:0.000,0.000,0.000:0]",
        "ok",
    ]
    assert await client.cmd("$") == [
        "[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]",
        "ok",
    ]
    assert await client.cmd("G1 X1") == ["error:22"]  # feed rate not set
    assert await client.cmd("G0 X") == ["error:2"]
    assert await client.cmd("10") == ["error:1"]
    assert await client.cmd("$Q") == ["error:2"]
    assert await client.cmd("$X1") == ["error:3"]
    assert await client.cmd("G0 G1 X1") == ["error:21"]
    assert await client.cmd("G0 X1 X2") == ["error:25"]
    assert await client.cmd("G4") == ["error:28"]
    assert await client.cmd("$J=X500 F1000") == ["error:15"]  # jog beyond travel: no alarm
    assert await client.cmd("$J=X5") == ["error:22"]
    assert await client.cmd("g1 x0 f300 (comment) ; rest") == ["ok"]
    assert await client.cmd("") == ["ok"]
    # CR LF is two line ends for GRBL: the empty second line gets its own ok.
    await client.write(b"G21\r\n")
    assert [await client.line(), await client.line()] == ["ok", "ok"]
    assert parse(await client.status())[0] == "Idle"
    assert gantry.state()["lines_processed"] >= 20


@pytest.mark.conformance
async def test_unlock_without_homing(client: Raw, gantry: GantrySim) -> None:
    assert await client.cmd("$X") == ["[MSG:Caution: Unlocked]", "ok"]
    assert gantry.state()["homed"] is False
    assert await client.cmd("G0 X1") == ["ok"]
    await wait_idle(client)


# -- physics ---------------------------------------------------------------------------------------
def trapezoid_s(t: float, length: float, v: float, a: float) -> float:
    """Distance after t seconds of a rest-to-rest move (v mm/s cruise, a mm/s^2)."""
    ta = v / a
    total = length / v + ta
    if t <= 0:
        return 0.0
    if t < ta:
        return a * t * t / 2
    if t < total - ta:
        return a * ta * ta / 2 + v * (t - ta)
    if t >= total:
        return length
    rest = total - t
    return length - a * rest * rest / 2


@pytest.mark.physics
async def test_move_takes_the_trapezoid_time(client: Raw, gantry: GantrySim) -> None:
    clock = gantry.ctx.clock
    await homed(client)
    length, v, a = 100.0, 600.0 / 60.0, 500.0
    expected = length / v + v / a  # 10.02 s virtual
    assert await client.cmd(f"G1 X{length} F600") == ["ok"]  # ok when planned, not when done
    t0 = clock.now()
    runs = 0
    while True:
        before = clock.now()
        report = await client.status()
        after = clock.now()
        state, pos, feed = parse(report)
        if state == "Idle":
            break
        assert state == "Run"
        runs += 1
        # The reported position lies on the profile at the time of the query.
        lo = trapezoid_s(before - t0 - 0.05, length, v, a)
        hi = trapezoid_s(after - t0 + 0.05, length, v, a)
        assert lo - 0.01 <= pos[0] <= hi + 0.01, (before - t0, pos, lo, hi)
        assert pos[1] == 0.0 and pos[2] == 0.0
        assert 0 <= feed <= 600
        await asyncio.sleep(0.01)
    elapsed = clock.now() - t0
    assert runs >= 5
    assert expected - 0.05 <= elapsed <= expected + 1.0, elapsed
    assert pos == (100.0, 0.0, 0.0)
    assert gantry.state()["moving"] is False


@pytest.mark.physics
async def test_homing_takes_time_and_ends_at_machine_zero(sim_ctx: SimContext) -> None:
    sim = await start_sim(sim_ctx, start_position=(200.0, 100.0, -50.0))
    path = Path(sim.endpoint()["pty"])
    assert await asyncio.to_thread(read_pending, path, len(BANNER + UNLOCK)) == BANNER + UNLOCK
    client = Raw(path)
    try:
        # Unlocked without homing, GRBL believes it is at 0,0,0: the head is where it was.
        assert await client.cmd("$X") == ["[MSG:Caution: Unlocked]", "ok"]
        assert sim.state()["position"] == [200.0, 100.0, -50.0]
        seek, feed, pulloff, debounce = 2000.0 / 60, 200.0 / 60, 1.0, 0.25
        z = (50 + pulloff) / seek + 3 * pulloff / feed + 4 * debounce
        xy = (200 + pulloff) / seek + 3 * pulloff / feed + 4 * debounce
        t0 = sim_ctx.clock.now()
        await client.write(b"$H\n")
        await wait_for(lambda: sim.state()["grbl_state"] == "Home", what="homing")
        await client.write(b"?")
        # The status query during homing is answered when homing ends, before the ok.
        report = await client.line(timeout=5)
        assert report is not None and report.startswith("<Home|MPos:0.000,0.000,0.000|")
        assert await client.line() == "ok"
        elapsed = sim_ctx.clock.now() - t0
        assert z + xy <= elapsed <= z + xy + 1.5, (elapsed, z + xy)
        assert sim.state()["position"] == [0.0, 0.0, 0.0] and sim.state()["homed"] is True
    finally:
        client.close()
        await sim.stop()


@pytest.mark.physics
async def test_soft_limit_alarm_needs_reset_and_unlock(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    assert await client.cmd("G0 X10") == ["ok"]
    await wait_idle(client)
    await client.write(b"G0 X500\n")
    assert await client.line() == "ALARM:2"
    assert await client.line() == "[MSG:Reset to continue]"
    await client.write(b"?G0 X20\n")
    assert await client.quiet() == b""  # critical alarm: no report, no line served
    await client.write(b"\x18")
    assert await client.read_exact(len(b"ok\r\n" + BANNER + UNLOCK)) == b"ok\r\n" + BANNER + UNLOCK
    assert await client.cmd("G0 X20") == ["error:9"]
    assert await client.cmd("$X") == ["[MSG:Caution: Unlocked]", "ok"]
    assert parse(await client.status())[:2] == ("Idle", (10.0, 0.0, 0.0))  # position retained
    assert gantry.state()["alarm"] is None


@pytest.mark.physics
async def test_gripper_moves_a_crucible_from_rack_to_doser(client: Raw, gantry: GantrySim) -> None:
    world = gantry.ctx.world
    await homed(client)
    assert world.crucibles["C001"].location == "rack/1"
    for line in ("G0 X20 Y20", "G0 Z-40"):
        assert await client.cmd(line) == ["ok"]
    assert await client.cmd("M8") == ["ok"]  # waits until the moves ended, then closes
    assert gantry.state()["moving"] is False
    assert world.held is not None and world.held.id == "C001"
    assert world.crucibles["C001"].location is None
    for line in ("G0 Z0", "G0 X250 Y40", "G0 Z-35"):
        assert await client.cmd(line) == ["ok"]
    assert await client.cmd("$G") == ["[GC:G0 G54 G17 G21 G90 G94 M5 M8 T0 F0 S0]", "ok"]
    assert await client.cmd("M9") == ["ok"]
    assert world.held is None and world.crucibles["C001"].location == "doser"
    state = gantry.state()
    assert state["position"] == [250.0, 40.0, -35.0] and state["gripper_closed"] is False


@pytest.mark.physics
async def test_feed_hold_and_resume(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    assert await client.cmd("G1 X50 F1200") == ["ok"]
    await wait_for(lambda: gantry.state()["moving"], what="motion")
    await client.write(b"!")
    held = await wait_for(lambda: gantry.state()["grbl_state"] == "Hold:0", what="hold")
    assert held
    state, pos, feed = parse(await client.status())
    assert state == "Hold:0" and 0 < pos[0] < 50 and feed == 0
    assert await client.quiet(0.1) == b""
    assert parse(await client.status())[1] == pos  # stays put while held
    await client.write(b"~")
    _, final, _ = parse(await wait_idle(client))
    assert final == (50.0, 0.0, 0.0)


@pytest.mark.physics
async def test_safety_door_stops_motion_and_drops_the_gripper(
    client: Raw, gantry: GantrySim
) -> None:
    world = gantry.ctx.world
    await homed(client)
    for line in ("G0 X20 Y20 Z-40", "M8", "G1 X200 F1200"):
        assert await client.cmd(line) == ["ok"]
    assert world.held is not None
    await wait_for(lambda: gantry.state()["position"][0] > 60, what="motion")
    await gantry.control("open_door", {})
    assert await client.line() == "[MSG:Check Door]"
    await wait_for(lambda: gantry.state()["grbl_state"] == "Door:1", what="door stop")
    report = await client.status()
    assert report.startswith("<Door:1|") and "|Pn:D" in report
    assert world.held is None and world.crucibles["C001"].location == "floor"
    await client.write(b"$G\n")  # while the door holds, GRBL reads no lines
    await client.write(b"~")  # door still open: cannot resume
    assert await client.quiet(0.1) == b""
    assert parse(await client.status())[0] == "Door:1"
    await gantry.control("close_door", {})
    assert await client.line() == "[MSG:Check Door]"
    assert parse(await client.status())[0] == "Door:0"
    await client.write(b"~")  # Door:3 (gripper output restored for 1 s), then Run
    assert await client.line() == "[GC:G1 G54 G17 G21 G90 G94 M5 M8 T0 F1200 S0]"
    assert await client.line() == "ok"
    _, final, _ = parse(await wait_idle(client))
    assert final == (200.0, 20.0, -40.0)


# -- faults ----------------------------------------------------------------------------------------
@pytest.mark.faults
async def test_alarm_fault_hard_limit(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    assert await client.cmd("G1 X100 F1200") == ["ok"]
    await wait_for(lambda: gantry.state()["moving"], what="motion")
    await gantry.set_fault(Fault(kind=FaultKind.ALARM, code=1))
    assert await client.line() == "ALARM:1"
    assert await client.line() == "[MSG:Reset to continue]"
    assert gantry.state()["moving"] is False and gantry.state()["homed"] is False
    await client.write(b"\x18")
    assert await client.read_exact(len(BANNER + UNLOCK)) == BANNER + UNLOCK
    assert await client.cmd("G0 X10") == ["error:9"]
    assert await client.cmd("$X") == ["[MSG:Caution: Unlocked]", "ok"]
    assert await client.cmd("G0 X10") == ["ok"]
    await wait_idle(client)


@pytest.mark.faults
async def test_reset_during_motion_loses_position(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    assert await client.cmd("G1 X100 F1200") == ["ok"]
    await wait_for(lambda: gantry.state()["moving"], what="motion")
    await client.write(b"\x18")
    expected = b"ALARM:3\r\n" + BANNER + UNLOCK
    assert await client.read_exact(len(expected)) == expected
    assert gantry.state()["homed"] is False
    assert parse(await client.status())[0] == "Alarm"


@pytest.mark.faults
async def test_error_no_reply_and_garble_faults(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    await gantry.set_fault(Fault(kind=FaultKind.ERROR, code=3, count=1))
    assert await client.cmd("G0 X5") == ["error:3"]
    assert gantry.state()["planner_blocks"] == 0 and gantry.state()["mpos"] == [0.0, 0.0, 0.0]
    assert await client.cmd("G4 P0") == ["ok"]

    await gantry.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    await client.write(b"G4 P0\n")
    assert await client.quiet() == b""
    assert await client.cmd("$G") == ["[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]", "ok"]

    good = b"[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\nok\r\n"
    await gantry.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    await client.write(b"$G\n")
    garbled = await client.read_exact(len(good))
    assert len(garbled) == len(good) and garbled != good
    assert await client.cmd("$G") == [good.split(b"\r\n")[0].decode(), "ok"]


@pytest.mark.faults
async def test_disconnect_then_banner_on_the_new_pty(client: Raw, gantry: GantrySim) -> None:
    await homed(client)
    assert await client.cmd("G0 X30") == ["ok"]
    await wait_idle(client)
    await gantry.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.3))
    assert gantry.state()["connected"] is False
    client.close()
    await wait_for(lambda: gantry.state()["connected"], what="link back")
    path = Path(gantry.endpoint()["pty"])
    # Plugging in resets the controller: the banner waits in the new pty (read it with a plain
    # read, before pyserial's open would flush it), then alarm and machine position cleared.
    banner = await asyncio.to_thread(read_pending, path, len(BANNER + UNLOCK))
    assert banner == BANNER + UNLOCK
    fresh = Raw(path)
    try:
        state, pos, _ = parse(await fresh.status())
        assert (state, pos) == ("Alarm", (0.0, 0.0, 0.0))
        assert gantry.state()["position"] == [30.0, 0.0, 0.0]  # the head did not move
        assert await fresh.cmd("$H") == ["ok"]
        assert await fresh.cmd("G0 X5") == ["ok"]
        _, final, _ = parse(await wait_idle(fresh))
        assert final == (5.0, 0.0, 0.0) and gantry.state()["position"] == [5.0, 0.0, 0.0]
    finally:
        fresh.close()


def test_trapezoid_helper_is_consistent() -> None:
    total = 100 / 10 + 10 / 500
    assert math.isclose(trapezoid_s(total, 100, 10, 500), 100)
    assert math.isclose(trapezoid_s(total / 2, 100, 10, 500), 50)
