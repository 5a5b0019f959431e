"""The balance simulator (MT-SICS) seen from a raw pyserial client on its pty.

The simulator runs on the test's event loop; blocking pyserial reads go through
``asyncio.to_thread``. Literal exchanges come from PROTOCOLS.md and the MT-SICS reference manual.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from hardware_sims.balance import BalanceConfig, BalanceSim
from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from tests.support.procs import wait_for
from tests.support.rawserial import RawPort

WEIGHT = re.compile(rb"^S (?P<status>[SD]) (?P<field>[ \-0-9.]{10}) g\r\n$")


Port = RawPort


Factory = Callable[..., Awaitable[tuple[BalanceSim, Port]]]


@pytest.fixture
async def make_balance(sim_ctx: SimContext) -> AsyncIterator[Factory]:
    sims: list[BalanceSim] = []
    ports: list[Port] = []

    async def make(**fields: Any) -> tuple[BalanceSim, Port]:
        sim = BalanceSim("balance", BalanceConfig(**fields), sim_ctx)
        await sim.start()
        sims.append(sim)
        port = Port(sim_ctx.run_dir / "balance")
        ports.append(port)
        return sim, port

    yield make
    for port in ports:
        port.close()
    for sim in sims:
        await sim.stop()


def grams(reply: bytes) -> float:
    match = WEIGHT.match(reply)
    assert match, reply
    return float(match["field"])


# -- conformance: literal exchanges -----------------------------------------------------------


@pytest.mark.conformance
async def test_literal_stable_weight_with_100_g_reference(make_balance: Factory) -> None:
    # A 0.01 g balance without noise gives the manual's literal line exactly.
    sim, port = await make_balance(readability_g=0.01, noise_g=0.0, settle_s=1.0)
    await sim.control("place_mass", {"grams": 100.0})
    assert await port.ask(b"S\r\n") == b"S S     100.00 g\r\n"


@pytest.mark.conformance
async def test_literal_immediate_dynamic_while_settling(make_balance: Factory) -> None:
    sim, port = await make_balance(settle_s=30.0)
    await sim.control("place_mass", {"grams": 12.3401})
    reply = await port.ask(b"SI\r\n")
    # PROTOCOLS.md shows `S D      12.3401 g` (a 12-character field); the MT-SICS manual's weight
    # field is 10 characters, as in its `S S     100.00 g`: the manual wins.
    assert WEIGHT.match(reply) and reply.startswith(b"S D "), reply
    assert len(reply) == len(b"S D    12.3401 g\r\n")


@pytest.mark.conformance
async def test_literal_zero_and_unknown_command(make_balance: Factory) -> None:
    _, port = await make_balance()
    assert await port.ask(b"Z\r\n") == b"Z A\r\n"
    assert await port.ask(b"XYZ\r\n") == b"ES\r\n"


@pytest.mark.conformance
async def test_identification_commands(make_balance: Factory) -> None:
    _, port = await make_balance(model="XS205DU", serial_number="B943621745", software="2.30")
    assert await port.ask(b"I1\r\n") == b'I1 A "01" "2.30" "2.30" "" ""\r\n'
    assert await port.ask(b"I2\r\n") == b'I2 A "XS205DU 220.0000 g"\r\n'
    assert await port.ask(b"I3\r\n") == b'I3 A "2.30"\r\n'
    assert await port.ask(b"I4\r\n") == b'I4 A "B943621745"\r\n'


@pytest.mark.conformance
async def test_tare_commands(make_balance: Factory) -> None:
    sim, port = await make_balance(noise_g=0.0, settle_s=0.5)
    await sim.control("place_mass", {"grams": 20.0})
    assert await port.ask(b"T\r\n") == b"T S    20.0000 g\r\n"
    assert await port.ask(b"S\r\n") == b"S S     0.0000 g\r\n"
    assert await port.ask(b"TA\r\n") == b"TA A    20.0000 g\r\n"
    assert await port.ask(b"TA 5.5 g\r\n") == b"TA A     5.5000 g\r\n"
    assert await port.ask(b"SI\r\n") == b"S S    14.5000 g\r\n"
    assert await port.ask(b"TA abc g\r\n") == b"TA L\r\n"
    assert await port.ask(b"TAC\r\n") == b"TAC A\r\n"
    assert await port.ask(b"S\r\n") == b"S S    20.0000 g\r\n"


@pytest.mark.conformance
async def test_zero_commands_and_range(make_balance: Factory) -> None:
    sim, port = await make_balance(noise_g=0.0, settle_s=0.5)
    await sim.control("place_mass", {"grams": 1.0, "name": "small"})
    assert await port.ask(b"ZI\r\n") == b"ZI D\r\n"  # still moving: zeroed anyway
    assert await port.ask(b"Z\r\n") == b"Z A\r\n"
    assert await port.ask(b"S\r\n") == b"S S     0.0000 g\r\n"
    await sim.control("remove_mass", {"name": "small"})
    assert await port.ask(b"S\r\n") == b"S S    -1.0000 g\r\n"
    # 50 g is outside the zero-setting range (±2 % of 220 g): Z +.
    await sim.control("place_mass", {"grams": 50.0})
    assert await port.ask(b"Z\r\n") == b"Z +\r\n"


@pytest.mark.conformance
async def test_overload_underload_and_parameter_errors(make_balance: Factory) -> None:
    sim, port = await make_balance(settle_s=0.5)
    await sim.control("place_mass", {"grams": 250.0})
    assert await port.ask(b"S\r\n") == b"S +\r\n"
    assert await port.ask(b"SI\r\n") == b"S +\r\n"
    await sim.control("remove_mass", {})
    await sim.control("remove_pan", {})
    await wait_for(lambda: sim.state()["stable"], what="the unloaded cell settles")
    assert await port.ask(b"S\r\n") == b"S -\r\n"
    await sim.control("replace_pan", {})
    assert await port.ask(b"S 1\r\n") == b"ES\r\n"
    assert await port.ask(b"s\r\n") == b"ES\r\n"  # commands are upper case
    assert await port.ask(b"S\xff\xfe\r\n") == b"ET\r\n"


@pytest.mark.conformance
async def test_sir_streams_until_another_command(make_balance: Factory) -> None:
    sim, port = await make_balance(noise_g=0.0)
    port.ser.write(b"SIR\r\n")
    lines = [await port.line() for _ in range(5)]
    assert all(WEIGHT.match(line) for line in lines), lines
    assert sim.state()["streaming"]
    port.ser.write(b"I4\r\n")
    # Stream lines already on the wire may come first; then the I4 reply, then silence.
    for _ in range(50):
        line = await port.line()
        if line.startswith(b"I4"):
            break
        assert WEIGHT.match(line), line
    assert line == b'I4 A "B943621745"\r\n'
    assert not sim.state()["streaming"]
    port.ser.timeout = 0.3
    assert await port.line() == b""


@pytest.mark.conformance
async def test_reset_cancels_a_waiting_s_and_clears_tare(make_balance: Factory) -> None:
    sim, port = await make_balance(settle_s=1000.0, stable_timeout_s=1000.0)
    assert await port.ask(b"TA 3 g\r\n") == b"TA A     3.0000 g\r\n"
    await sim.control("place_mass", {"grams": 10.0})
    port.ser.write(b"S\r\n")  # waits for a stability that will not come
    assert await port.ask(b"@\r\n") == b'I4 A "B943621745"\r\n'
    assert sim.cell.tare_g == 0.0
    port.ser.timeout = 0.3
    assert await port.line() == b""  # the cancelled S never answers


# -- physics ---------------------------------------------------------------------------------


@pytest.mark.physics
async def test_settles_dynamic_then_stable_within_noise(make_balance: Factory) -> None:
    sim, port = await make_balance(settle_s=2.0, noise_g=0.0002, readability_g=0.0001)
    clock = sim.ctx.clock
    await sim.control("place_mass", {"grams": 50.0})
    placed = clock.now()
    first = await port.ask(b"SI\r\n")
    assert first.startswith(b"S D"), first
    replies: list[bytes] = []
    while not (replies and replies[-1].startswith(b"S S")):
        replies.append(await port.ask(b"SI\r\n"))
        assert clock.now() - placed < 5.0, replies
    assert clock.now() - placed >= 2.0 - 0.05
    stable = [grams(await port.ask(b"SI\r\n")) for _ in range(20)]
    assert all(abs(v - 50.0) <= 5 * 0.0002 + 0.0001 for v in stable), stable
    assert len(set(stable)) > 1  # noise is there


@pytest.mark.physics
async def test_s_waits_for_stability_and_gives_up_with_s_i(make_balance: Factory) -> None:
    sim, port = await make_balance(settle_s=3.0, stable_timeout_s=10.0, noise_g=0.0)
    clock = sim.ctx.clock
    await sim.control("place_mass", {"grams": 7.0})
    t0 = clock.now()
    assert await port.ask(b"S\r\n") == b"S S     7.0000 g\r\n"
    assert 2.5 <= clock.now() - t0 <= 5.0

    sim.cell.settle_s = 50.0  # a draught: it will not settle within stable_timeout_s
    await sim.control("place_mass", {"grams": 1.0})
    t0 = clock.now()
    assert await port.ask(b"S\r\n") == b"S I\r\n"
    assert 9.5 <= clock.now() - t0 <= 13.0


@pytest.mark.physics
async def test_crucible_placed_in_the_world_is_weighed(make_balance: Factory) -> None:
    sim, port = await make_balance(noise_g=0.0, settle_s=1.0)
    world = sim.ctx.world
    crucible = world.crucibles["C001"]
    crucible.powders_mg["Fe"] = 123.4
    crucible.location = "balance"
    await wait_for(lambda: sim.state()["stable"] and sim.state()["crucible"] == "C001")
    assert await port.ask(b"S\r\n") == b"S S    12.1234 g\r\n"
    assert await port.ask(b"Z\r\n") == b"Z +\r\n"  # 12 g is beyond the zero range: tare it
    assert await port.ask(b"T\r\n") == b"T S    12.1234 g\r\n"
    crucible.location = "rack/1"
    await wait_for(lambda: sim.state()["stable"] and sim.state()["crucible"] is None)
    assert await port.ask(b"S\r\n") == b"S S   -12.1234 g\r\n"


# -- faults ----------------------------------------------------------------------------------


@pytest.mark.faults
async def test_no_reply_times_out_then_recovers(make_balance: Factory) -> None:
    sim, port = await make_balance()
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    port.ser.timeout = 0.5
    assert await port.ask(b"I4\r\n") == b""
    assert await port.ask(b"I4\r\n") == b'I4 A "B943621745"\r\n'


@pytest.mark.faults
async def test_late_reply_arrives_late(make_balance: Factory) -> None:
    sim, port = await make_balance()
    await sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.6, count=1))
    t0 = time.monotonic()
    assert await port.ask(b"Z\r\n") == b"Z A\r\n"
    assert time.monotonic() - t0 >= 0.55


@pytest.mark.faults
async def test_garbled_and_truncated_replies(make_balance: Factory) -> None:
    sim, port = await make_balance()
    good = b'I4 A "B943621745"\r\n'
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    port.ser.write(b"I4\r\n")
    # Line noise keeps the length but may hit the LF itself: read bytes, not a line.
    garbled = await asyncio.to_thread(port.ser.read, len(good))
    assert garbled != good and len(garbled) == len(good)
    assert await port.ask(b"I4\r\n") == good

    await sim.set_fault(Fault(kind=FaultKind.TRUNCATE, count=1))
    port.ser.timeout = 0.5
    assert await port.ask(b"I4\r\n") == good[: len(good) // 2]
    port.ser.timeout = 2.0
    assert await port.ask(b"I4\r\n") == good


@pytest.mark.faults
@pytest.mark.parametrize(
    ("code", "reply"), [(1, b"ES\r\n"), (2, b"ET\r\n"), (3, b"EL\r\n"), (7, b"S I\r\n")]
)
async def test_error_fault_codes(make_balance: Factory, code: int, reply: bytes) -> None:
    sim, port = await make_balance(noise_g=0.0)
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=code, count=1))
    assert await port.ask(b"S\r\n") == reply
    assert await port.ask(b"S\r\n") == b"S S     0.0000 g\r\n"


@pytest.mark.faults
async def test_disconnect_then_the_pty_comes_back(make_balance: Factory) -> None:
    sim, port = await make_balance()
    link = sim.ctx.run_dir / "balance"
    await sim.control("place_mass", {"grams": 5.0})
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.5))
    assert not sim.state()["connected"]
    assert not link.exists()
    await wait_for(lambda: link.exists() and sim.state()["connected"], what="pty back")
    port.close()
    again = Port(link)
    try:
        assert await again.ask(b"I4\r\n") == b'I4 A "B943621745"\r\n'
        assert abs(grams(await again.ask(b"S\r\n")) - 5.0) < 0.001  # state survived
    finally:
        again.close()


@pytest.mark.faults
async def test_disconnect_until_cleared(make_balance: Factory) -> None:
    sim, port = await make_balance()
    link = sim.ctx.run_dir / "balance"
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    assert not link.exists()
    await sim.clear_fault(FaultKind.DISCONNECT)
    assert link.exists() and sim.state()["connected"]
    port.close()
    again = Port(link)
    try:
        assert await again.ask(b"Z\r\n") == b"Z A\r\n"
    finally:
        again.close()
