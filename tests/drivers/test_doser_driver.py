"""The Quantos doser driver and its ophyd-async device against the doser simulator.

``hardware_sims.doser.DoserSim`` serves MT-SICS with the QRA/QRD extensions on a pty; a crucible
(the vial) is placed at the doser's world location so doses land somewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine
from bluesky.utils import FailedStatus

from drivers.errors import (
    DeviceTimeout,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
)
from drivers.instruments.doser import (
    DoseFailed,
    DoseGarbled,
    DoseLinkLost,
    Doser,
    DoserSettings,
    DoseTimeout,
)
from drivers.links import Links, SerialLink
from drivers.ophyd.doser import Doser as DoserDevice
from drivers.ophyd.doser import make_doser_device
from hardware_sims.base import SimContext
from hardware_sims.doser import DoserConfig, DoserSim, DosingHeadConfig
from hardware_sims.faults import Fault, FaultKind
from tests.conftest import make_context
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.support.procs import wait_for

SCALE = 200.0


def doser_config() -> DoserConfig:
    return DoserConfig(
        heads={
            1: DosingHeadConfig(element="Fe", flow_mg_s=20.0),
            2: DosingHeadConfig(element="Ni", flow_mg_s=20.0, powder_g=0.03),  # 30 mg left
            3: DosingHeadConfig(element="Co", flow_mg_s=1.0),  # slow: a dose to stop
        },
        settle_s=1.0,
    )


def settings(ctx: SimContext, **kw: Any) -> DoserSettings:
    link = SerialLink(url=str(ctx.run_dir / "doser"), timeout_s=1.0, xonxoff=False)
    base: dict[str, Any] = {"command_timeout_s": 0.5, "dose_timeout_s": 10.0,
                            "move_timeout_s": 5.0, "head_max_mg": {1: 1000.0}}
    base.update(kw)
    return DoserSettings(link=link, **base)


def new_context(tmp_path: Path) -> SimContext:
    ctx = make_context(tmp_path, time_scale=SCALE)
    ctx.world.crucibles["C001"].location = "doser"  # the vial under the dosing head
    return ctx


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[DoserSim, Doser]]:
    ctx = new_context(tmp_path)
    sim = DoserSim("doser", doser_config(), ctx)
    await sim.start()
    links = Links()
    client = Doser("doser", settings(ctx), links)
    yield sim, client
    await links.close()
    await sim.stop()


async def running(sim: DoserSim) -> None:
    await wait_for(lambda: sim.state()["job"] == "QRA 61 1" and sim.state()["dosing_mg"] > 0,
                   timeout=5)


# -- client methods ------------------------------------------------------------------------------


async def test_dose_mounts_the_head_and_returns_the_delivered_mass(
    rig: tuple[DoserSim, Doser],
) -> None:
    sim, doser = rig
    assert sim.state()["mounted"] is None
    result = await doser.dose(1, 50.0)
    state = sim.state()
    assert state["mounted"] == 1 and doser.mounted == 1
    assert result.head == 1 and result.substance == "Fe" and result.target_mg == 50.0
    assert result.dosed_mg == pytest.approx(state["last_dose"]["actual_mg"], abs=0.001)
    assert result.dosed_mg == pytest.approx(50.0, rel=0.05)
    assert result.valid is state["last_dose"]["valid"]
    assert state["target_mg"] == 50.0
    # Same head again: no re-mount, one more dose.
    sampler_moves = sim.sics.commands_seen
    again = await doser.dose(1, 20.0)
    assert again.dosed_mg == pytest.approx(20.0, rel=0.05)
    assert sim.state()["heads"]["1"]["doses"] == 2
    assert sim.sics.commands_seen - sampler_moves <= 5  # head data, target, dose, sample data
    powder = sim.ctx.world.crucibles["C001"].powders_mg["Fe"]
    assert powder == pytest.approx(result.dosed_mg + again.dosed_mg, abs=0.01)


async def test_head_info_sample_data_and_target(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    assert await doser.head_info() is None  # nothing mounted
    assert await doser.sample_data() is None  # no dose yet
    info = await doser.mount(3)
    assert info.substance == "Co" and info.remaining_mg == pytest.approx(25000.0)
    assert info.dose_limit == 999 and info.dosing_counter == 0 and info.remaining_dosages == 999
    await doser.set_target(12.5)
    assert sim.state()["target_mg"] == 12.5
    await doser.mount(1)  # another head: unlock, move, lock
    assert sim.state()["mounted"] == 1
    await doser.dose(1, 10.0)
    sample = await doser.sample_data()
    assert sample is not None and sample.substance == "Fe" and sample.target_mg == 10.0
    assert sample.content_mg == pytest.approx(sim.state()["last_dose"]["actual_mg"], abs=0.001)
    assert await doser.weight_g() * 1000 == pytest.approx(sample.content_mg, abs=0.05)


async def test_door_and_sampler(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    assert await doser.door_position() == "closed"
    await doser.door(open=True)
    assert sim.state()["door"] == "open" and await doser.door_position() == "open"
    await doser.door(open=False)
    assert sim.state()["door"] == "closed"
    await doser.sampler(7)
    assert sim.state()["sampler"] == 7
    await doser.sampler(0)
    assert sim.state()["sampler"] == 0


async def test_bad_parameters_are_refused_before_sending(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    before = sim.sics.commands_seen
    bad: list[Any] = [
        doser.dose(0, 10.0), doser.dose(31, 10.0), doser.dose(1, 0.0), doser.dose(1, -5.0),
        doser.dose(1, 1500.0),  # above head 1's limit of 1000 mg
        doser.dose(2, 6000.0),  # above the cell's max_dose_mg
        doser.dose(1, 10.0, timeout=0), doser.set_target(0.05), doser.set_target(3e5),
        doser.sampler(31), doser.sampler(-1), doser.mount(0),
    ]
    for call in bad:
        with pytest.raises(InvalidParameter) as exc:
            await call
        assert "doser" in str(exc.value) and "nothing sent" in str(exc.value)
    assert sim.sics.commands_seen == before
    with pytest.raises(InvalidParameter, match=r"1500.0 mg is outside 0.1..1000 mg for head 1"):
        await doser.dose(1, 1500.0)


# -- instrument errors ---------------------------------------------------------------------------


async def test_powder_running_out_is_i7_with_the_dosed_mass(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    with pytest.raises(DoseFailed) as exc:
        await doser.dose(2, 50.0)
    err = exc.value
    assert isinstance(err, InstrumentError)
    assert err.code == 7 and "powder flow error" in str(err)
    assert err.dosed_mg == pytest.approx(30.0, abs=0.01)
    assert "dosed 30 mg of 50 mg with head 2" in str(err)
    assert sim.state()["heads"]["2"]["powder_g"] == 0.0


async def test_refused_at_once_doses_nothing(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    await doser.mount(1)
    await doser.door(open=True)
    with pytest.raises(DoseFailed) as exc:
        await doser.dose(1, 10.0)
    assert exc.value.code == 5 and "not allowed at the moment" in str(exc.value)
    assert exc.value.dosed_mg == 0.0
    assert sim.state()["heads"]["1"]["doses"] == 0


@pytest.mark.parametrize(("code", "meaning"), [(6, "weight not stable"), (3, "timeout")])
async def test_error_code_after_start(
    rig: tuple[DoserSim, Doser], code: int, meaning: str
) -> None:
    sim, doser = rig
    await doser.mount(1)
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=code, count=1))
    with pytest.raises(DoseFailed) as exc:
        await doser.dose(1, 40.0)
    assert exc.value.code == code and meaning in str(exc.value)
    assert exc.value.dosed_mg == pytest.approx(sim.state()["last_dose"]["actual_mg"], abs=0.001)
    result = await doser.dose(1, 10.0)  # the next one works
    assert result.dosed_mg == pytest.approx(10.0, rel=0.05)


async def test_door_move_error(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    await sim.set_fault(Fault(kind=FaultKind.ERROR, code=13, count=1))
    with pytest.raises(InstrumentError) as exc:
        await doser.door(open=True)
    assert exc.value.code == 13 and "QRA 60 7 3" in str(exc.value)
    assert sim.state()["door"] == "closed"


async def test_stop_ends_a_running_dose(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    task = asyncio.create_task(doser.dose(3, 100.0))
    await running(sim)
    await doser.stop()
    with pytest.raises(DoseFailed) as exc:
        await task
    assert exc.value.code == 8 and "stopped" in str(exc.value)
    assert exc.value.dosed_mg is not None and 0 < exc.value.dosed_mg < 100.0
    assert sim.state()["job"] is None


async def test_safe_state_stops_and_closes_the_door(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    await doser.door(open=True)
    await doser.safe_state()
    assert sim.state()["door"] == "closed" and sim.state()["job"] is None
    task = asyncio.create_task(doser.dose(3, 100.0))
    await running(sim)
    await doser.safe_state()
    with pytest.raises(DoseFailed):
        await task
    assert sim.state()["job"] is None and sim.state()["door"] == "closed"


# -- lost replies: never re-sent -----------------------------------------------------------------


async def test_lost_final_reply_is_investigated_not_resent(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    task = asyncio.create_task(doser.dose(1, 50.0, timeout=1.0))
    await running(sim)
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))  # "QRA 61 1 A" is lost
    with pytest.raises(DoseTimeout) as exc:
        await task
    err = exc.value
    assert isinstance(err, DeviceTimeout)
    assert err.check.started is True and err.check.running is False
    assert err.check.dosed_mg == pytest.approx(sim.state()["last_dose"]["actual_mg"], abs=0.001)
    assert "not re-sent" in str(err) and "QRA 61 1" in str(err) and "doser" in str(err)
    assert sim.state()["heads"]["1"]["doses"] == 1  # dosed once


async def test_no_reply_at_all(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    await doser.mount(1)
    await doser.set_target(10.0)
    await sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout) as exc:
        await doser.dose(1, 10.0)
    assert "doser" in str(exc.value) and "QRD 2 4 11" in str(exc.value)
    with pytest.raises(DeviceTimeout) as door:
        await doser.door(open=True, timeout=0.5)
    assert "QRA 60 7 3" in str(door.value) and "door is unknown" in str(door.value)
    sim.faults.clear()
    assert await doser.door_position() in ("open", "closed")


async def test_garbled_reply_during_a_dose(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    task = asyncio.create_task(doser.dose(1, 50.0, timeout=1.0))
    await running(sim)
    await sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))  # the final reply is garbled
    with pytest.raises(DoseGarbled) as exc:
        await task
    err = exc.value
    assert isinstance(err, ProtocolError) and err.raw
    assert err.check.started is True and err.check.dosed_mg is not None
    assert sim.state()["heads"]["1"]["doses"] == 1


async def test_garbled_query_is_protocol_error(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    await sim.set_fault(Fault(kind=FaultKind.GARBLE))
    with pytest.raises(ProtocolError) as exc:
        await doser.door_position()
    assert "QRD 2 3 7" in str(exc.value)


async def test_pulled_cable_mid_dose_and_back(rig: tuple[DoserSim, Doser]) -> None:
    sim, doser = rig
    task = asyncio.create_task(doser.dose(1, 50.0))
    await running(sim)
    await sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    with pytest.raises(DoseLinkLost) as exc:
        await task
    assert isinstance(exc.value, NotConnected)
    assert "not re-sent" in str(exc.value) and "could not ask" in str(exc.value)
    await wait_for(lambda: sim.state()["job"] is None, timeout=5)  # the dose went on
    await sim.clear_fault(FaultKind.DISCONNECT)
    await wait_for(lambda: sim.state()["connected"])
    sample = await doser.sample_data()  # the same client, no re-creation
    assert sample is not None
    assert sample.content_mg == pytest.approx(sim.state()["last_dose"]["actual_mg"], abs=0.001)
    assert sim.state()["heads"]["1"]["doses"] == 1


# -- Bluesky -------------------------------------------------------------------------------------


@pytest.fixture
def re_rig(RE: RunEngine, tmp_path: Path) -> Iterator[tuple[DoserSim, DoserDevice]]:
    ctx = new_context(tmp_path)
    sim = DoserSim("doser", doser_config(), ctx)
    in_re_loop(sim.start())
    links = Links()
    device = make_doser_device("doser", Doser("doser", settings(ctx), links))
    assert isinstance(device, DoserDevice)
    in_re_loop(device.connect())
    yield sim, device
    in_re_loop(links.close())
    in_re_loop(sim.stop())


def test_mv_doses_then_rd(
    RE: RunEngine, docs: ValidatedDocuments, re_rig: tuple[DoserSim, DoserDevice]
) -> None:
    sim, doser = re_rig

    def plan() -> Any:
        yield from bps.mv(doser, 50)
        dosed = yield from bps.rd(doser.last_dose_mg)
        yield from bps.mv(doser.head, 3)
        yield from bp.count([doser], 1)
        return dosed

    result = RE(plan())
    assert result.plan_result == pytest.approx(sim.state()["last_dose"]["actual_mg"], abs=0.001)
    assert result.plan_result == pytest.approx(50.0, rel=0.05)
    [event] = docs.of("event")
    assert event["data"]["doser-last_dose_mg"] == pytest.approx(result.plan_result)
    assert event["data"]["doser-target_mg"] == 50.0
    desc = docs.of("descriptor")[0]
    assert desc["data_keys"]["doser-last_dose_mg"]["units"] == "mg"
    assert desc["configuration"]["doser"]["data"]["doser-head"] == 3


def test_failed_dose_in_a_plan_reports_what_was_dosed(
    RE: RunEngine, re_rig: tuple[DoserSim, DoserDevice]
) -> None:
    sim, doser = re_rig

    def plan() -> Any:
        yield from bps.mv(doser.head, 2)
        yield from bps.mv(doser, 50)

    with pytest.raises(FailedStatus) as exc:
        RE(plan())
    cause = exc.value.__cause__ or exc.value.args[0].exception()
    assert isinstance(cause, DoseFailed) and cause.code == 7
    assert in_re_loop(doser.last_dose_mg.get_value()) == pytest.approx(30.0, abs=0.01)
    with pytest.raises(FailedStatus) as bad:
        RE(bps.mv(doser, 1e5))  # checked before anything is sent
    assert isinstance(bad.value.__cause__, InvalidParameter)
    # (the RunEngine stops the movables of a failed plan: QRA 61 4 is sent, nothing else)
    assert sim.state()["target_mg"] == 50.0 and sim.state()["heads"]["2"]["doses"] == 1
    in_re_loop(doser.safe_state())
    assert sim.state()["door"] == "closed"
