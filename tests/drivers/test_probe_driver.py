"""Keithley 2400 probe driver and ophyd-async device against the simulator on a real pty.

The async tests run the simulator and the driver on pytest-asyncio's loop; the RunEngine tests
start them on the RunEngine's loop (``in_re_loop``), as DESIGN.md fixes it.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

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
from drivers.instruments.probe import (
    Probe,
    ProbeCompliance,
    ProbeSettings,
    ScpiError,
    parse_reading,
)
from drivers.links import Links, SerialLink
from drivers.ophyd.probe import Probe as ProbeDevice
from drivers.ophyd.probe import make_probe_device
from hardware_sims.base import SimContext
from hardware_sims.faults import Fault, FaultKind
from hardware_sims.probe import ProbeConfig, ProbeSim
from tests.conftest import make_context
from tests.drivers.conftest import ValidatedDocuments, in_re_loop
from tests.support.procs import wait_for

CANTOR = {"Fe": 55.8, "Co": 58.9, "Ni": 58.7, "Cr": 52.0, "Mn": 54.9}  # ~ equimolar, mg
TIMEOUT = 0.25


@dataclass
class Rig:
    sim: ProbeSim
    ctx: SimContext
    links: Links
    probe: Probe

    def rx(self) -> int:
        """Bytes the instrument has received so far."""
        return self.sim._endpoint.rx_count


def place_sample(ctx: SimContext, powders: dict[str, float] = CANTOR) -> None:
    """Carry the crucible from rack slot 1 to the station with the gripper, then dose it."""
    world = ctx.world
    src, dst = world.locations["rack/1"], world.locations["station"]
    assert world.grip(src.x, src.y, src.z) is not None
    placed = world.release(dst.x, dst.y, dst.z)
    assert placed is not None and placed.location == "station"
    for element, mg in powders.items():
        assert world.add_powder("station", element, mg) is not None


def settings(sim: ProbeSim, **kw: object) -> ProbeSettings:
    values: dict[str, object] = {
        "link": SerialLink(url=sim.endpoint()["pty"], timeout_s=TIMEOUT),
        "terminator": sim.config.terminator,
        "measure_timeout_s": 0.5,
        "read_attempts": 2,
    }
    return ProbeSettings.model_validate(values | kw)


async def make_rig(run_dir: Path, config: ProbeConfig | None = None) -> Rig:
    ctx = make_context(run_dir, time_scale=500.0)
    sim = ProbeSim("probe", config or ProbeConfig(), ctx)
    await sim.start()
    links = Links()
    return Rig(sim, ctx, links, Probe("probe", settings(sim), links))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path)
    try:
        yield r
    finally:
        await r.links.close()
        await r.sim.stop()


# -- client against the simulator -----------------------------------------------------------


async def test_identify(rig: Rig) -> None:
    idn = await rig.probe.identify()
    assert idn.manufacturer == "KEITHLEY INSTRUMENTS INC."
    assert idn.model == "MODEL 2400"
    assert idn.serial_number == rig.sim.config.serial_number
    assert idn.firmware == rig.sim.config.firmware


async def test_four_wire_matches_model_and_two_wire_adds_leads(rig: Rig) -> None:
    place_sample(rig.ctx)
    model = rig.sim.model_resistance()
    assert model is not None and 0.1 < model < 100
    cfg = await rig.probe.configure_four_wire(1e-3, 5.0)
    assert (cfg.source_current_a, cfg.compliance_v) == (1e-3, 5.0)
    state = rig.sim.state()
    assert state["four_wire"] and state["resistance_mode"] == "MAN"
    assert state["source"] == {"function": "CURR", "current_a": 1e-3, "voltage_v": 0.0}
    assert state["compliance_v"] == 5.0 and "RES" in state["sense_functions"]
    assert state["auto_output_off"] and not state["output_on"]

    four = [await rig.probe.measure_resistance() for _ in range(5)]
    for r in four:
        assert r.four_wire and not r.compliance and not r.auto_ohms
        assert r.current_a == pytest.approx(1e-3)
        assert r.resistance_ohm == pytest.approx(model, rel=0.01)  # noise 0.2 %
        assert r.voltage_v == pytest.approx(model * 1e-3, rel=0.01)
    # The output was on only for each reading (auto output-off) and is off now.
    assert rig.sim.state()["output_on"] is False
    assert rig.sim.state()["last_reading"]["resistance"] == pytest.approx(
        four[-1].resistance_ohm, rel=1e-6
    )

    # The same sample in 2-wire mode (changed on the instrument, outside the driver): the leads
    # and tip contacts add their resistance.
    await rig.probe.port.write(":SYST:RSEN 0")
    two = [parse_reading(await rig.probe.port.query(":READ?")) for _ in range(5)]
    assert all(not r.four_wire for r in two)
    mean4 = statistics.fmean(r.resistance_ohm or 0.0 for r in four)
    mean2 = statistics.fmean(r.resistance_ohm or 0.0 for r in two)
    assert mean2 - mean4 == pytest.approx(rig.sim.config.lead_resistance_ohm, rel=0.05)
    # The driver sees from the status word that this is not a 4-wire reading and refuses it.
    with pytest.raises(InstrumentError, match="not a 4-wire"):
        await rig.probe.measure_resistance()
    assert rig.probe.configured is None
    # ... and reconfigures on the next call (the settings' current and compliance).
    again = await rig.probe.measure_resistance()
    assert again.four_wire and again.resistance_ohm == pytest.approx(model, rel=0.01)
    assert rig.sim.state()["compliance_v"] == rig.probe.settings.compliance_v


async def test_open_circuit_without_crucible(rig: Rig) -> None:
    assert rig.sim.state()["sample"]["crucible"] is None
    with pytest.raises(ProbeCompliance) as info:
        await rig.probe.measure_resistance()
    err = info.value
    assert err.code == "open_circuit" and err.device == "probe" and err.command == ":READ?"
    assert "open circuit" in str(err) and "no sample under the probe" in str(err)
    assert err.reading.compliance and err.reading.voltage_v == pytest.approx(21.0)
    assert rig.sim.state()["output_on"] is False


async def test_sample_beyond_compliance(rig: Rig) -> None:
    place_sample(rig.ctx)
    await rig.sim.control("set_sample_resistance", {"ohms": 1e5})
    await rig.probe.configure_four_wire(1e-3, 10.0)  # 100 V needed
    with pytest.raises(ProbeCompliance) as info:
        await rig.probe.measure_resistance()
    assert info.value.code == "compliance"
    assert "lower the source current or raise the compliance" in str(info.value)
    assert info.value.reading.voltage_v == pytest.approx(10.0)
    await rig.probe.configure_four_wire(1e-5, 10.0)  # 1 V: fine
    r = await rig.probe.measure_resistance()
    assert r.resistance_ohm == pytest.approx(1e5, rel=0.01)


@pytest.mark.parametrize(
    ("current", "compliance", "words"),
    [
        (2.0, 21.0, ["current_a=2 A", "1.05 A"]),
        (-1.1, 21.0, ["current_a=-1.1 A", "1.05 A"]),
        (0.0, 21.0, ["current_a=0 A", "1e-09 A"]),
        (math.nan, 21.0, ["current_a=nan", "(A)"]),
        (1e-3, 300.0, ["compliance_v=300 V", "0.2 V to 210 V"]),
        (1e-3, 0.1, ["compliance_v=0.1 V", "0.2 V to 210 V"]),
        (0.5, 100.0, ["above 21 V", "0.105 A"]),
    ],
)
async def test_bad_parameters_are_refused_before_sending(
    rig: Rig, current: float, compliance: float, words: list[str]
) -> None:
    await rig.probe.configure_four_wire(1e-3, 21.0)
    before_rx, before_req = rig.rx(), rig.probe.port.stats.requests
    state = rig.sim.state()
    with pytest.raises(InvalidParameter) as info:
        await rig.probe.configure_four_wire(current, compliance)
    assert isinstance(info.value, ValueError)
    assert info.value.device == "probe" and info.value.command == "configure_four_wire"
    for w in words:
        assert w in str(info.value)
    assert "nothing sent" in str(info.value)
    assert rig.rx() == before_rx and rig.probe.port.stats.requests == before_req
    assert rig.sim.state()["source"] == state["source"]
    assert rig.probe.configured is not None and rig.probe.configured.source_current_a == 1e-3


async def test_cell_limit_on_current(tmp_path: Path) -> None:
    r = await make_rig(tmp_path)
    try:
        limited = Probe("probe2", settings(r.sim, max_current_a=0.01), Links())
        with pytest.raises(InvalidParameter, match=r"0\.02 A .*0\.01 A"):
            await limited.configure_four_wire(0.02, 5.0)
        assert r.rx() == 0
    finally:
        await r.links.close()
        await r.sim.stop()


async def test_errors_drains_queue_and_reset(rig: Rig) -> None:
    assert await rig.probe.errors() == []
    await rig.probe.port.write("BOGUS")
    await rig.probe.port.write(":SOUR:CURR 5")
    await wait_for(lambda: len(rig.sim.state()["error_queue"]) == 2, 2.0)
    assert await rig.probe.errors() == [
        ScpiError(-113, "Undefined header"),
        ScpiError(-222, "Parameter data out of range"),
    ]
    assert rig.sim.state()["error_queue"] == []

    await rig.probe.configure_four_wire(2e-3, 5.0)
    await rig.probe.port.write("BOGUS")
    await wait_for(lambda: rig.sim.state()["error_queue"], 2.0)
    stale = await rig.probe.reset()
    assert stale == [ScpiError(-113, "Undefined header")]
    state = rig.sim.state()
    assert state["resistance_mode"] == "AUTO" and not state["four_wire"]
    assert state["error_queue"] == [] and rig.probe.configured is None


async def test_config_read_backs(rig: Rig) -> None:
    await rig.probe.configure_four_wire(-2.5e-3, 3.0)
    assert await rig.probe.source_current() == pytest.approx(-2.5e-3)
    assert await rig.probe.compliance_voltage() == pytest.approx(3.0)
    assert await rig.probe.four_wire() is True
    assert await rig.probe.output_on() is False


# -- faults, seen from the driver --------------------------------------------------------------


async def test_failed_query_reports_the_queued_scpi_error(rig: Rig) -> None:
    """:READ? with the output off (auto output-off disabled behind the driver's back): the 2400
    sends nothing and queues 803; the driver turns the timeout into that error."""
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    await rig.probe.port.write(":SOUR:CLE:AUTO OFF")
    with pytest.raises(InstrumentError) as info:
        await rig.probe.measure_resistance()
    err = info.value
    assert err.code == 803 and err.message == "Not permitted with OUTPUT off"
    assert err.command == ":READ?" and isinstance(err.__cause__, DeviceTimeout)
    assert rig.sim.state()["error_queue"] == []


async def test_instrument_error_fault_found_by_syst_err(rig: Rig) -> None:
    await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, code=-222))
    with pytest.raises(InstrumentError) as info:
        await rig.probe.output_off()
    assert info.value.code == -222 and info.value.command == ":OUTP OFF"
    assert "Parameter data out of range" in str(info.value) and "probe" in str(info.value)
    # Queries check too, and an instrument error is not retried.
    await rig.sim.set_fault(Fault(kind=FaultKind.ERROR, code=803, count=2))
    before = rig.probe.port.stats.requests
    with pytest.raises(InstrumentError) as info:
        await rig.probe.identify()
    assert info.value.code == 803 and "also queued: 803" in str(info.value)
    assert rig.probe.port.stats.requests - before == 4  # *IDN?, then SYST:ERR? x3
    assert await rig.probe.errors() == []


async def test_no_reply(rig: Rig) -> None:
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    # The :READ? reply is lost: a timeout naming device and command, output off afterwards.
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    with pytest.raises(DeviceTimeout) as info:
        await rig.probe.measure_resistance()
    assert info.value.device == "probe" and info.value.command == ":READ?"
    assert "no reply to ':READ?'" in str(info.value)
    assert rig.sim.state()["output_on"] is False
    # A read-only query whose reply is lost once is retried.
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY, count=1))
    assert (await rig.probe.identify()).model == "MODEL 2400"
    # An instrument that stays silent: DeviceTimeout after the attempts.
    await rig.sim.set_fault(Fault(kind=FaultKind.NO_REPLY))
    with pytest.raises(DeviceTimeout, match=r"probe: no reply to '\*IDN\?'"):
        await rig.probe.identify()
    with pytest.raises(DeviceTimeout, match=r"SYST:ERR\? after ':OUTP OFF'"):
        await rig.probe.output_off()
    await rig.sim.clear_fault(FaultKind.NO_REPLY)
    assert (await rig.probe.measure_resistance()).four_wire


async def test_late_reply(rig: Rig) -> None:
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    # Late but within the timeout: just slower.
    await rig.sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=0.1, count=1))
    assert (await rig.probe.measure_resistance()).four_wire
    # Later than the timeout: DeviceTimeout; the late reply is discarded, not taken as the
    # answer to a later command.
    await rig.sim.set_fault(Fault(kind=FaultKind.LATE_REPLY, delay_s=1.0, count=1))
    with pytest.raises(DeviceTimeout) as info:
        await rig.probe.measure_resistance()
    assert info.value.command == ":READ?"
    assert rig.sim.state()["output_on"] is False
    idn = await rig.probe.identify()
    assert idn.model == "MODEL 2400"
    r = await rig.probe.measure_resistance()
    assert r.four_wire and r.resistance_ohm is not None


async def test_garbled_reply(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    # Garbled once: the read-only query is retried and succeeds.
    caplog.set_level(logging.INFO, logger="drivers.errors")
    await rig.sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    assert (await rig.probe.identify()).model == "MODEL 2400"
    assert "retrying read" in caplog.text
    # Garbled until cleared: ProtocolError naming device and command, with the raw bytes.
    await rig.sim.set_fault(Fault(kind=FaultKind.GARBLE))
    with pytest.raises(ProtocolError) as info:
        await rig.probe.identify()
    assert info.value.device == "probe" and info.value.raw
    assert "*IDN?" in str(info.value.command)
    await rig.sim.clear_fault(FaultKind.GARBLE)
    # A garbled reading is refused (strict number format), not retried, and the output is off.
    await rig.sim.set_fault(Fault(kind=FaultKind.GARBLE, count=1))
    with pytest.raises(ProtocolError) as info:
        await rig.probe.measure_resistance()
    assert info.value.command == ":READ?" and info.value.raw
    assert rig.sim.state()["output_on"] is False
    assert (await rig.probe.measure_resistance()).four_wire


async def test_truncated_reply(rig: Rig) -> None:
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    await rig.sim.set_fault(Fault(kind=FaultKind.TRUNCATE, count=1))
    with pytest.raises(DeviceTimeout) as info:
        await rig.probe.measure_resistance()
    assert info.value.command == ":READ?" and "incomplete reply" in str(info.value)
    assert rig.sim.state()["output_on"] is False
    assert (await rig.probe.measure_resistance()).four_wire


async def test_disconnect_and_reconnect(rig: Rig) -> None:
    place_sample(rig.ctx)
    await rig.probe.configure_four_wire(1e-3, 5.0)
    await rig.sim.set_fault(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    with pytest.raises(NotConnected) as info:
        await rig.probe.identify()
    assert info.value.device == "probe" and info.value.command == "*IDN?"
    assert "cannot open" in str(info.value)
    await rig.sim.clear_fault(FaultKind.DISCONNECT)
    # Same client, same transport: the next command reopens the pty; settings survived.
    r = await rig.probe.measure_resistance()
    assert r.four_wire and r.resistance_ohm == pytest.approx(rig.sim.model_resistance(), rel=0.01)
    assert rig.probe.port.stats.reconnects >= 1


async def test_lf_terminator(tmp_path: Path) -> None:
    """The reply terminator is a setting: an instrument set to LF works with terminator LF."""
    r = await make_rig(tmp_path, ProbeConfig(terminator="LF"))
    try:
        assert r.probe.settings.terminator == "LF"
        assert (await r.probe.identify()).model == "MODEL 2400"
    finally:
        await r.links.close()
        await r.sim.stop()


# -- ophyd-async device in the real RunEngine ---------------------------------------------------


@dataclass
class ReRig:
    sim: ProbeSim
    ctx: SimContext
    links: Links
    client: Probe


@pytest.fixture
def re_rig(RE: RunEngine, tmp_path: Path) -> Iterator[ReRig]:
    ctx = make_context(tmp_path, time_scale=500.0)
    sim = ProbeSim("probe", ProbeConfig(), ctx)
    in_re_loop(sim.start())
    links = Links()
    client = Probe("probe", settings(sim), links)
    yield ReRig(sim, ctx, links, client)
    in_re_loop(links.close())
    in_re_loop(sim.stop())


def test_count_in_run_engine(RE: RunEngine, docs: ValidatedDocuments, re_rig: ReRig) -> None:
    place_sample(re_rig.ctx)
    model = re_rig.sim.model_resistance()
    assert model is not None

    async def connect() -> ProbeDevice:
        device = make_probe_device("probe", re_rig.client)
        await device.connect()
        return device

    probe = in_re_loop(connect())
    RE(bps.mv(probe.source_current, 2e-3))
    RE(bp.count([probe], 3))
    ohms = docs.event_data("probe-resistance")
    assert len(ohms) == 3
    for value in ohms:
        assert value == pytest.approx(model, rel=0.01)
    for v, i, r in zip(
        docs.event_data("probe-voltage"), docs.event_data("probe-current"), ohms, strict=True
    ):
        assert i == pytest.approx(2e-3) and v == pytest.approx(r * i, rel=1e-6)
    descriptor = docs.of("descriptor")[-1]
    keys = descriptor["data_keys"]
    assert keys["probe-resistance"]["units"] == "ohm"
    assert keys["probe-voltage"]["units"] == "V" and keys["probe-current"]["units"] == "A"
    assert descriptor["hints"]["probe"]["fields"] == ["probe-resistance"]
    conf = descriptor["configuration"]["probe"]["data"]
    assert conf["probe-source_current"] == pytest.approx(2e-3)
    assert conf["probe-four_wire"] is True
    assert conf["probe-compliance_voltage"] == pytest.approx(re_rig.client.settings.compliance_v)
    assert docs.of("stop")[-1]["exit_status"] == "success"
    assert re_rig.sim.state()["output_on"] is False

    value = RE(bps.rd(probe.resistance))
    assert value.plan_result == pytest.approx(model, rel=0.01)

    # safe_state: the source output is switched off even if something left it on.
    in_re_loop(re_rig.client.port.write(":OUTP ON"))
    in_re_loop(wait_for(lambda: re_rig.sim.state()["output_on"], 2.0))
    in_re_loop(probe.safe_state())
    assert re_rig.sim.state()["output_on"] is False
    # stop() (what the RunEngine calls on abort) does the same.
    in_re_loop(re_rig.client.port.write(":OUTP ON"))
    in_re_loop(wait_for(lambda: re_rig.sim.state()["output_on"], 2.0))
    in_re_loop(probe.stop())
    assert re_rig.sim.state()["output_on"] is False

    # The compliance is a configuration signal that reconfigures the probe when set.
    RE(bps.mv(probe.compliance_voltage, 2.5))
    assert re_rig.sim.state()["compliance_v"] == 2.5
    assert re_rig.client.configured is not None
    assert re_rig.client.configured.source_current_a == pytest.approx(2e-3)


def test_open_circuit_fails_the_run(
    RE: RunEngine, docs: ValidatedDocuments, re_rig: ReRig
) -> None:
    async def connect() -> ProbeDevice:
        device = make_probe_device("probe", re_rig.client)
        await device.connect()
        return device

    probe = in_re_loop(connect())
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([probe], 1))
    cause = info.value.__cause__
    assert isinstance(cause, ProbeCompliance) and cause.code == "open_circuit"
    assert docs.of("stop")[-1]["exit_status"] == "fail"
    assert docs.of("event") == []
    assert re_rig.sim.state()["output_on"] is False
