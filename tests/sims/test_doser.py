"""The Quantos doser simulator (MT-SICS + QRA/QRD) seen from a raw pyserial client on its pty.

The simulator runs on the test's event loop; blocking pyserial reads go through
``asyncio.to_thread``. Exchanges follow PROTOCOLS.md and the public Quantos drivers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from hardware_sims.base import SimContext
from hardware_sims.doser import DoserConfig, DoserSim, DosingHeadConfig
from hardware_sims.faults import Fault, FaultKind
from tests.conftest import make_context
from tests.support.procs import wait_for
from tests.support.rawserial import RawPort


class Port(RawPort):
    """The raw client, plus the Quantos' XML replies. XON/XOFF stays off on the host here,
    although the real Quantos wants it: the garble fault can turn a reply byte into XOFF (0x13),
    which the host's tty would swallow and obey."""

    def __init__(self, path: Path, timeout: float = 3.0) -> None:
        super().__init__(path, timeout)

    async def xml(self, command: bytes) -> ElementTree.Element:
        prefix = command.strip()
        assert await self.ask(command) == prefix + b" B\r\n"
        body: list[bytes] = []
        while (line := await self.line()) != prefix + b" A\r\n":
            assert line.endswith(b"\r\n") and line, body
            body.append(line)
        return ElementTree.fromstring(b"".join(body))


Factory = Callable[..., Awaitable[tuple[DoserSim, Port]]]


@pytest.fixture
async def ctx(tmp_path: Path) -> SimContext:
    return make_context(tmp_path, time_scale=100.0)


@pytest.fixture
async def make_doser(ctx: SimContext) -> AsyncIterator[Factory]:
    sims: list[DoserSim] = []
    ports: list[Port] = []

    async def make(vial: bool = True, **fields: Any) -> tuple[DoserSim, Port]:
        if vial:
            ctx.world.crucibles["C001"].location = "doser"
        sim = DoserSim("doser", DoserConfig(**fields), ctx)
        await sim.start()
        sims.append(sim)
        port = Port(ctx.run_dir / "doser")
        ports.append(port)
        return sim, port

    yield make
    for port in ports:
        port.close()
    for sim in sims:
        await sim.stop()


def head(element: str = "Fe", **kw: Any) -> DosingHeadConfig:
    return DosingHeadConfig(element=element, **kw)


WEIGHT = re.compile(rb"^S S (?P<field>[ \-0-9.]{10}) g\r\n$")


# -- conformance -----------------------------------------------------------------------------


@pytest.mark.conformance
async def test_set_target_and_two_phase_dose(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head(flow_mg_s=20.0)}, mounted=1)
    assert await port.ask(b"QRD 1 1 5 10.5\r\n") == b"QRD 1 1 5 A\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    assert sim.state()["job"] == "QRA 61 1"
    assert await port.line() == b"QRA 61 1 A\r\n"
    assert sim.state()["job"] is None


@pytest.mark.conformance
async def test_settings_validation(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head()})
    assert await port.ask(b"QRD 1 1 5 0.05\r\n") == b"QRD 1 1 5 L\r\n"
    assert await port.ask(b"QRD 1 1 5 abc\r\n") == b"QRD 1 1 5 L\r\n"
    assert await port.ask(b"QRD 1 1 6 2.5\r\n") == b"QRD 1 1 6 A\r\n"
    assert await port.ask(b"QRD 1 1 6 41\r\n") == b"QRD 1 1 6 L\r\n"
    assert await port.ask(b"QRD 1 1 7 1\r\n") == b"QRD 1 1 7 A\r\n"
    assert await port.ask(b"QRD 1 1 7 2\r\n") == b"QRD 1 1 7 L\r\n"
    assert await port.ask(b"QRD 1 1 8 S-0042\r\n") == b"QRD 1 1 8 A\r\n"
    assert await port.ask(b"QRD 9 9 9\r\n") == b"ES\r\n"
    assert await port.ask(b"QRA 99 9\r\n") == b"ES\r\n"
    assert await port.ask(b"XYZ\r\n") == b"ES\r\n"
    assert sim.state()["settings"]["tolerance_pct"] == 2.5
    assert sim.state()["settings"]["sample_id"] == "S-0042"


@pytest.mark.conformance
async def test_front_door_two_phase_and_position_query(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head()}, door_s=3.0)
    assert await port.ask(b"QRD 2 3 7\r\n") == b"QRD 2 3 7 2 A\r\n"
    assert await port.ask(b"QRA 60 7 3\r\n") == b"QRA 60 7 B\r\n"
    assert await port.ask(b"QRD 2 3 7\r\n") == b"QRD 2 3 7 9 A\r\n"  # running
    assert await port.line() == b"QRA 60 7 A\r\n"
    assert await port.ask(b"QRD 2 3 7\r\n") == b"QRD 2 3 7 3 A\r\n"
    assert sim.state()["door"] == "open"
    assert await port.ask(b"QRA 60 7 5\r\n") == b"QRA 60 7 L\r\n"
    assert await port.ask(b"QRA 60 7 2\r\n") == b"QRA 60 7 B\r\n"
    assert await port.line() == b"QRA 60 7 A\r\n"
    assert sim.state()["door"] == "closed"


@pytest.mark.conformance
async def test_sampler_pin_mount_and_head_data(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head("Fe"), 3: head("Ni", powder_g=2.5)})
    assert await port.ask(b"QRD 2 2 8\r\n") == b"QRD 2 2 8 1 A\r\n"
    assert await port.ask(b"QRD 2 4 11\r\n") == b"QRD 2 4 11 I 1\r\n"  # nothing mounted
    assert await port.ask(b"QRA 60 8 31\r\n") == b"QRA 60 8 L\r\n"
    assert await port.ask(b"QRA 60 2 4\r\n") == b"QRA 60 2 I 1\r\n"  # no head at home (0)
    assert await port.ask(b"QRA 60 8 3\r\n") == b"QRA 60 8 B\r\n"
    assert await port.line() == b"QRA 60 8 A\r\n"
    assert sim.state()["sampler"] == 3
    assert await port.ask(b"QRA 60 2 4\r\n") == b"QRA 60 2 B\r\n"
    assert await port.line() == b"QRA 60 2 A\r\n"
    assert sim.state()["mounted"] == 3
    data = await port.xml(b"QRD 2 4 11\r\n")
    assert data.findtext("Substance") == "Ni"
    quantity = data.find("Rem._quantity")
    assert quantity is not None and quantity.get("Unit") == "mg"
    assert float(quantity.text or "nan") == pytest.approx(2500.0)
    assert data.findtext("Dosing_counter") == "0"
    # A locked head keeps the sampler where it is.
    assert await port.ask(b"QRA 60 8 1\r\n") == b"QRA 60 8 I 5\r\n"
    assert await port.ask(b"QRA 60 2 3\r\n") == b"QRA 60 2 B\r\n"
    assert await port.line() == b"QRA 60 2 A\r\n"
    assert sim.state()["mounted"] is None


@pytest.mark.conformance
async def test_dose_refusals(make_doser: Factory) -> None:
    sim, port = await make_doser(vial=False, heads={1: head(flow_mg_s=1.0)})
    assert await port.ask(b"QRD 1 1 5 10\r\n") == b"QRD 1 1 5 A\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 I 1\r\n"  # no head mounted
    await sim.control("mount_head", {"head": 1})
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 I 5\r\n"  # no vial
    sim.ctx.world.crucibles["C002"].location = "doser"
    await sim.control("set_door", {"open": True})
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 I 5\r\n"  # door open
    await sim.control("set_door", {"open": False})
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 I 2\r\n"  # another job
    assert await port.ask(b"QRA 60 7 3\r\n") == b"QRA 60 7 I 2\r\n"
    assert await port.ask(b"QRD 1 1 5 20\r\n") == b"QRD 1 1 5 I 2\r\n"
    # Stop the running dose: the stop answers B, A; the dose ends with I 8.
    assert await port.ask(b"QRA 61 4\r\n") == b"QRA 61 4 B\r\n"
    assert await port.line() == b"QRA 61 4 A\r\n"
    assert await port.line() == b"QRA 61 1 I 8\r\n"
    assert sim.state()["last_dose"]["outcome"] == "I 8"


@pytest.mark.conformance
async def test_weighing_commands_on_the_doser(make_doser: Factory) -> None:
    _, port = await make_doser(
        heads={1: head()}, model="QB1", serial_number="Q1039527", noise_g=0.0
    )
    assert await port.ask(b"I4\r\n") == b'I4 A "Q1039527"\r\n'
    assert await port.ask(b"I2\r\n") == b'I2 A "QB1 220.00000 g"\r\n'
    assert WEIGHT.match(await port.ask(b"S\r\n"))  # the vial, 12 g gross
    assert await port.ask(b"Z\r\n") == b"Z +\r\n"  # beyond the zero range
    assert await port.ask(b"T\r\n") == b"T S   12.00000 g\r\n"


# -- physics ---------------------------------------------------------------------------------


@pytest.mark.physics
async def test_dose_lands_within_tolerance_and_takes_mass_over_flow(make_doser: Factory) -> None:
    flow, settle, target = 20.0, 2.0, 80.0
    sim, port = await make_doser(
        heads={2: head("Co", flow_mg_s=flow, tolerance=0.02, powder_g=5.0)},
        mounted=2,
        settle_s=settle,
    )
    clock = sim.ctx.clock
    crucible = sim.ctx.world.crucibles["C001"]
    assert await port.ask(b"QRD 1 1 5 80\r\n") == b"QRD 1 1 5 A\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    t0 = clock.now()
    # While dosing, the vial's weight grows: the internal balance is dynamic.
    await wait_for(lambda: (sim.state()["dosing_mg"] or 0) > 1.0, what="powder flowing")
    assert (await port.ask(b"SI\r\n")).startswith(b"S D")
    assert await port.line() == b"QRA 61 1 A\r\n"
    elapsed = clock.now() - t0
    actual = sim.state()["last_dose"]["actual_mg"]
    assert abs(actual - target) <= 5 * 0.02 * target
    assert actual != target  # the spread is real
    assert elapsed == pytest.approx(actual / flow + settle, abs=0.6)
    assert crucible.powders_mg == {"Co": pytest.approx(actual)}
    assert sim.heads[2].powder_mg == pytest.approx(5000.0 - actual)
    assert sim.state()["heads"]["2"]["doses"] == 1
    # The balance is net after the Quantos' tare: S answers the dosed mass.
    match = WEIGHT.match(await port.ask(b"S\r\n"))
    assert match and float(match["field"]) * 1000 == pytest.approx(actual, abs=0.05)
    sample = await port.xml(b"QRD 2 4 12\r\n")
    assert float(sample.findtext("Content") or "nan") == pytest.approx(actual, abs=0.001)
    assert sample.findtext("Validity") == "Valid"


@pytest.mark.physics
async def test_head_runs_out_mid_dose(make_doser: Factory) -> None:
    flow, settle = 10.0, 1.0
    sim, port = await make_doser(
        heads={1: head("Ni", powder_g=0.012, flow_mg_s=flow)}, mounted=1, settle_s=settle
    )
    clock = sim.ctx.clock
    crucible = sim.ctx.world.crucibles["C001"]
    assert await port.ask(b"QRD 1 1 5 50\r\n") == b"QRD 1 1 5 A\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    t0 = clock.now()
    assert await port.line() == b"QRA 61 1 I 7\r\n"
    assert clock.now() - t0 == pytest.approx(12.0 / flow + settle, abs=0.6)
    state = sim.state()
    assert state["heads"]["1"]["powder_g"] == 0.0
    assert crucible.powders_mg["Ni"] == pytest.approx(12.0)
    assert state["last_dose"]["actual_mg"] == pytest.approx(12.0)
    data = await port.xml(b"QRD 2 4 11\r\n")
    assert float(data.findtext("Rem._quantity") or "nan") == 0.0
    # Refilled, the head doses again.
    await sim.control("refill", {"head": 1, "grams": 1.0})
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    assert await port.line() == b"QRA 61 1 A\r\n"
    assert crucible.powders_mg["Ni"] == pytest.approx(62.0, abs=3.0)


@pytest.mark.physics
async def test_default_heads_follow_the_ground_truth(make_doser: Factory) -> None:
    sim, _ = await make_doser()
    heads = sim.state()["heads"]
    assert [heads[str(i + 1)]["element"] for i in range(5)] == ["Fe", "Co", "Ni", "Cr", "Mn"]
    assert sim.state()["mounted"] is None
    await sim.control("set_powder", {"head": 4, "grams": 3.0})
    assert sim.state()["heads"]["4"]["powder_g"] == 3.0
    with pytest.raises(ValueError, match="no dosing head at position 9"):
        await sim.control("mount_head", {"head": 9})


# -- faults ----------------------------------------------------------------------------------


@pytest.mark.faults
async def test_error_fault_ends_the_next_job_with_its_code(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head(flow_mg_s=20.0)}, mounted=1)
    crucible = sim.ctx.world.crucibles["C001"]
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=6, count=1))
    assert await port.ask(b"QRA 60 7 3\r\n") == b"QRA 60 7 B\r\n"
    assert await port.line() == b"QRA 60 7 I 6\r\n"
    assert sim.state()["door"] == "closed"  # the move did not happen
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=7, count=1))
    assert await port.ask(b"QRD 1 1 5 40\r\n") == b"QRD 1 1 5 A\r\n"  # settings unaffected
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    assert await port.line() == b"QRA 61 1 I 7\r\n"
    assert crucible.powders_mg["Fe"] == pytest.approx(20.0, abs=2.0)  # stopped half way
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"  # the fault is used up
    assert await port.line() == b"QRA 61 1 A\r\n"


@pytest.mark.faults
async def test_no_reply_loses_the_b_but_the_dose_completes(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head(flow_mg_s=20.0)}, mounted=1)
    assert await port.ask(b"QRD 1 1 5 10\r\n") == b"QRD 1 1 5 A\r\n"
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 A\r\n"  # the B never came


@pytest.mark.faults
async def test_garbled_and_late_replies(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head()})
    good = b"QRD 2 3 7 2 A\r\n"
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    port.ser.write(b"QRD 2 3 7\r\n")
    garbled = await asyncio.to_thread(port.ser.read, len(good))
    assert garbled != good and len(garbled) == len(good)
    await sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.5, count=1))
    port.ser.timeout = 0.25
    assert await port.ask(b"QRD 2 3 7\r\n") == b""
    port.ser.timeout = 2.0
    assert await port.line() == good


@pytest.mark.faults
async def test_disconnect_mid_dose_then_the_pty_comes_back(make_doser: Factory) -> None:
    sim, port = await make_doser(heads={1: head(flow_mg_s=5.0)}, mounted=1)
    link = sim.ctx.run_dir / "doser"
    assert await port.ask(b"QRD 1 1 5 25\r\n") == b"QRD 1 1 5 A\r\n"
    assert await port.ask(b"QRA 61 1\r\n") == b"QRA 61 1 B\r\n"
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0.3))
    assert not link.exists()
    await wait_for(lambda: link.exists() and sim.state()["connected"], what="pty back")
    port.close()
    again = Port(link)
    try:
        assert await again.ask(b"QRD 2 2 8\r\n") == b"QRD 2 2 8 1 A\r\n"
        # The dose went on while the cable was out; its A arrives if it ended after the replug.
        await wait_for(lambda: sim.state()["job"] is None, what="dose finished")
        assert sim.state()["last_dose"]["outcome"] == "A"
        assert sim.ctx.world.crucibles["C001"].powders_mg["Fe"] > 20.0
    finally:
        again.close()
