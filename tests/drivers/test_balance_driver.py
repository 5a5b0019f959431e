"""The MT-SICS balance driver and its ophyd-async device against the balance simulator.

The simulator (``hardware_sims.balance.BalanceSim``) serves the real wire protocol on a pty; the
driver reaches it through ``Links``/``SerialTransport`` as it would reach a real balance.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
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
    ProtocolError,
)
from drivers.instruments.balance import Balance, BalanceSettings
from drivers.links import Links, SerialLink
from drivers.ophyd.balance import Balance as BalanceDevice
from drivers.ophyd.balance import make_balance_device, tare, zero
from hardware_sims.balance import BalanceConfig, BalanceSim
from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from tests.conftest import make_context
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.support.procs import wait_for

SCALE = 500.0


def settings(ctx: SimContext, **kw: Any) -> BalanceSettings:
    link = SerialLink(url=str(ctx.run_dir / "balance"), timeout_s=1.0)
    return BalanceSettings(link=link, command_timeout_s=1.0, stable_timeout_s=2.0, **kw)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[BalanceSim, Balance]]:
    ctx = make_context(tmp_path, time_scale=SCALE)
    sim = BalanceSim("balance", BalanceConfig(settle_s=1.0), ctx)
    await sim.start()
    links = Links()
    client = Balance("balance", settings(ctx), links)
    yield sim, client
    await links.close()
    await sim.stop()


async def settled(sim: BalanceSim) -> None:
    await wait_for(lambda: sim.state()["stable"], timeout=5)


# -- client methods ------------------------------------------------------------------------------


async def test_stable_and_immediate_weight_in_grams(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.control("place_mass", {"grams": 100.0, "name": "M100"})
    grams = await bal.stable_weight()
    assert grams == pytest.approx(100.0, abs=0.0005)
    assert bal.decimals == 4  # readability 0.1 mg, learnt from the reply
    w = await bal.immediate_weight()
    assert w.stable and w.unit == "g" and w.grams == pytest.approx(100.0, abs=0.0005)
    await sim.control("place_mass", {"grams": 5.0})
    w = await bal.immediate_weight()  # just after a load change: still moving
    assert not w.stable


async def test_identity(rig: tuple[BalanceSim, Balance]) -> None:
    _, bal = rig
    ident = await bal.identity()
    assert ident.model == "XS205DU"
    assert ident.capacity_g == pytest.approx(220.0)
    assert ident.serial_number == "B943621745"


async def test_tare_zero_and_tare_value(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.control("place_mass", {"grams": 12.5, "name": "vial"})
    assert await bal.tare() == pytest.approx(12.5, abs=0.0005)
    assert await bal.tare_value() == pytest.approx(12.5, abs=0.0005)
    assert await bal.stable_weight() == pytest.approx(0.0, abs=0.0005)
    await bal.clear_tare()
    assert await bal.tare_value() == 0.0
    await sim.control("remove_mass", {"name": "vial"})
    await sim.control("place_mass", {"grams": 0.5})  # within the ±2 % zero range
    await bal.zero()
    assert sim.state()["zero_g"] == pytest.approx(0.5, abs=0.001)
    assert await bal.stable_weight() == pytest.approx(0.0, abs=0.0005)


async def test_overload_underload_and_zero_range(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.control("place_mass", {"grams": 300.0, "name": "big"})
    with pytest.raises(InstrumentError) as over:
        await bal.stable_weight()
    assert over.value.code == "+" and "overload" in str(over.value)
    await sim.control("remove_mass", {"name": "big"})
    await sim.control("place_mass", {"grams": 50.0, "name": "heavy"})
    await settled(sim)  # (while it comes down from 300 g the balance is still in overload)
    with pytest.raises(InstrumentError) as zr:
        await bal.zero()
    assert zr.value.code == "+" and "zero-setting range" in str(zr.value)
    await sim.control("remove_mass", {"name": "heavy"})
    await sim.control("remove_pan", {})
    with pytest.raises(InstrumentError) as under:
        await bal.stable_weight()
    assert under.value.code == "-" and "underload" in str(under.value)
    assert "balance" in str(under.value) and "S (stable weight)" in str(under.value)


async def test_no_stable_value_in_time_is_s_i(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, time_scale=SCALE)
    sim = BalanceSim("balance", BalanceConfig(settle_s=1000.0, stable_timeout_s=20.0), ctx)
    await sim.start()
    links = Links()
    bal = Balance("balance", settings(ctx), links)
    try:
        await sim.control("place_mass", {"grams": 1.0})
        with pytest.raises(InstrumentError) as exc:
            await bal.stable_weight()
        assert exc.value.code == "I" and "no stable value in time" in str(exc.value)
        with pytest.raises(InstrumentError) as z:
            await bal.zero()
        assert z.value.code == "I" and "not executed" in str(z.value)
    finally:
        await links.close()
        await sim.stop()


async def test_bad_timeout_is_refused_before_sending(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    before = sim.sics.commands_seen
    with pytest.raises(InvalidParameter) as exc:
        await bal.stable_weight(timeout=0)
    assert "timeout" in str(exc.value) and "nothing sent" in str(exc.value)
    with pytest.raises(InvalidParameter):
        await bal.zero(timeout=-1)
    assert sim.sics.commands_seen == before


# -- faults --------------------------------------------------------------------------------------


async def test_no_reply_is_device_timeout(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout) as exc:
        await bal.stable_weight(timeout=0.2)
    assert "balance" in str(exc.value) and "S (stable weight)" in str(exc.value)
    sim.faults.clear()
    assert await bal.stable_weight() == pytest.approx(0.0, abs=0.0005)


async def test_a_lost_read_reply_is_retried(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    assert await bal.stable_weight(timeout=0.3) == pytest.approx(0.0, abs=0.0005)
    assert bal.port.stats.requests >= 2


async def test_garbled_reply_is_protocol_error(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await settled(sim)
    await sim.set_fault(Fault(kind=FaultKind.GARBLE))
    with pytest.raises(ProtocolError) as exc:
        await bal.immediate_weight()
    assert exc.value.raw is not None and "SI (immediate weight)" in str(exc.value)


@pytest.mark.parametrize(("code", "expected"), [(1, "ES"), (2, "ET"), (3, "EL"), (9, "I")])
async def test_instrument_error_codes(
    rig: tuple[BalanceSim, Balance], code: int, expected: str
) -> None:
    sim, bal = rig
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=code, count=1))
    with pytest.raises(InstrumentError) as exc:
        await bal.stable_weight()
    assert exc.value.code == expected
    assert exc.value.device == "balance"
    assert await bal.stable_weight() == pytest.approx(0.0, abs=0.0005)  # the next one works


async def test_zero_reply_lost_is_confirmed_not_repeated(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.control("place_mass", {"grams": 1.0})
    await settled(sim)
    seen = sim.sics.commands_seen
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))  # Z's "Z A" is lost
    await bal.zero(timeout=0.3)  # confirmed by SI reading zero, Z not re-sent
    assert sim.state()["zero_g"] == pytest.approx(1.0, abs=0.001)
    assert sim.sics.commands_seen == seen + 2  # Z and SI, nothing else


async def test_tare_reply_lost_and_unconfirmable_says_so(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout) as exc:
        await bal.tare(timeout=0.2)
    text = str(exc.value)
    assert "T (tare)" in text and "not repeated" in text and "SI failed too" in text


async def test_pulled_cable_then_next_command_works(rig: tuple[BalanceSim, Balance]) -> None:
    sim, bal = rig
    assert await bal.stable_weight() == pytest.approx(0.0, abs=0.0005)
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    await wait_for(lambda: not sim.state()["connected"])
    with pytest.raises(NotConnected) as exc:
        await bal.immediate_weight()
    assert "balance" in str(exc.value) and "SI (immediate weight)" in str(exc.value)
    await sim.clear_fault(FaultKind.DISCONNECT)
    await wait_for(lambda: sim.state()["connected"])
    w = await bal.immediate_weight()
    assert w.grams == pytest.approx(0.0, abs=0.0005)
    assert bal.port.stats.reconnects >= 1


# -- Bluesky -------------------------------------------------------------------------------------


@pytest.fixture
def re_rig(RE: RunEngine, tmp_path: Path) -> Iterator[tuple[BalanceSim, BalanceDevice]]:
    ctx = make_context(tmp_path, time_scale=SCALE)
    sim = BalanceSim("balance", BalanceConfig(settle_s=1.0), ctx)
    in_re_loop(sim.start())
    links = Links()
    client = Balance("balance", settings(ctx), links)
    device = make_balance_device("balance", client)
    assert isinstance(device, BalanceDevice)
    in_re_loop(device.connect())
    yield sim, device
    in_re_loop(links.close())
    in_re_loop(sim.stop())


def test_count_with_validated_documents(
    RE: RunEngine, docs: ValidatedDocuments, re_rig: tuple[BalanceSim, BalanceDevice]
) -> None:
    sim, balance = re_rig
    in_re_loop(sim.control("place_mass", {"grams": 20.0, "name": "vial"}))

    def plan() -> Any:
        grams = yield from tare(balance)
        assert grams == pytest.approx(20.0, abs=0.0005)
        yield from bp.count([balance], 3)

    RE(plan())
    values = docs.event_data("balance-weight")
    assert len(values) == 3 and all(abs(v) < 0.0005 for v in values)
    desc = docs.of("descriptor")[0]
    key = desc["data_keys"]["balance-weight"]
    assert key["units"] == "g" and key["precision"] == 4
    conf = desc["configuration"]["balance"]["data"]
    assert conf["balance-tare_weight"] == pytest.approx(20.0, abs=0.0005)
    assert docs.of("stop")[0]["exit_status"] == "success"


def test_zero_plan_then_rd(
    RE: RunEngine, re_rig: tuple[BalanceSim, BalanceDevice]
) -> None:
    sim, balance = re_rig
    in_re_loop(sim.control("place_mass", {"grams": 1.5}))

    def plan() -> Any:
        yield from zero(balance)
        yield from bps.trigger(balance, wait=True)
        value = yield from bps.rd(balance)
        return value

    result = RE(plan())
    assert result.plan_result == pytest.approx(0.0, abs=0.0005)
    assert sim.state()["zero_g"] == pytest.approx(1.5, abs=0.001)
