"""The whole simulated cell driven by one Bluesky plan through labd's devices.

The simulators run in-process (``SimCell``) on the RunEngine's loop, on their real transports
(ptys, Modbus TCP, the suite's own mosquitto); the devices are built from the cell's endpoints
exactly as the daemon builds them (:func:`drivers.cell.instruments_from_endpoints`). The plan
carries crucible C001 from the rack through doser, balance, furnace and station, and the test
checks the physical outcome on the simulators and every document against event-model's schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.run_engine import RunEngine

from drivers.cell import CellDevices, InstrumentsConfig, instruments_from_endpoints
from hardware_sims.cell import SimCell
from hardware_sims.config import validate_config
from tests.support.procs import Mosquitto
from tests.support.runengine import ValidatedDocuments, in_re_loop

TIME_SCALE = 500.0


@dataclass
class Rig:
    sim: SimCell
    cell: CellDevices
    endpoints: dict[str, Any]


def sim_config(tmp_path: Path, broker: Mosquitto) -> Any:
    return validate_config({
        "cell": "itest",
        "time_scale": TIME_SCALE,
        "run_dir": str(tmp_path / "run"),
        "mqtt": {"host": broker.host, "port": broker.port},
        "control": {"port": 0},
        "devices": {"furnace": {"tcp_port": 0}, "station": {"measure_s": 120}},
    })


@pytest.fixture
def rig(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    async def start() -> Rig:
        sim = SimCell(sim_config(tmp_path, mosquitto))
        await sim.start()
        ep = sim.endpoints()
        cfg = instruments_from_endpoints(ep, overrides={"gantry": {"open_settle_s": 0.05}})
        cell = CellDevices(cfg, client_name="itest")
        report = await cell.connect(timeout=10)
        assert report == dict.fromkeys(report), f"devices down: {report}"
        return Rig(sim, cell, ep)

    r = in_re_loop(start())
    yield r

    async def stop() -> None:
        await r.cell.close()
        await r.sim.stop()

    in_re_loop(stop())


def grip(gantry: Any, close: bool) -> Any:
    yield from bps.wait_for([lambda: gantry.grip(close)])


def test_one_crucible_through_the_whole_cell(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    d = rig.cell.devices
    gantry, doser, balance, furnace, station, probe, safety = (
        d["gantry"], d["doser"], d["balance"], d["furnace"], d["station"], d["probe"], d["safety"]
    )
    heads = {el: int(pos) for pos, el in rig.endpoints["devices"]["doser"]["heads"].items()}

    def plan() -> Any:
        yield from bps.wait_for([lambda: gantry.client.home()])
        yield from bps.mv(gantry.position, "rack/1")
        yield from grip(gantry, True)
        yield from bps.mv(gantry.position, "doser")
        yield from grip(gantry, False)
        for element, mg in (("Fe", 40.0), ("Ni", 60.0)):
            yield from bps.mv(doser.head, heads[element])
            yield from bps.mv(doser, mg)
        yield from grip(gantry, True)
        yield from bps.mv(gantry.position, "balance")
        yield from grip(gantry, False)
        yield from bp.count([balance], 1, md={"step": "weigh"})
        yield from grip(gantry, True)
        yield from bps.mv(gantry.position, "furnace/1")
        yield from grip(gantry, False)
        yield from bps.mv(furnace.setpoint, 450.0)
        yield from bp.count([furnace, safety], 2, md={"step": "anneal"})
        yield from grip(gantry, True)
        yield from bps.mv(gantry.position, "station")
        yield from grip(gantry, False)
        yield from bps.mv(station.sample_id, "S-0001")
        yield from bp.count([station, probe], 1, md={"step": "analyse"})
        yield from bps.wait_for([lambda: furnace.safe_state()])

    RE(plan())

    # The physical outcome, on the simulators.
    world = rig.sim.world
    crucible = world.crucibles["C001"]
    assert crucible.location == "station" and crucible.sample_id == "S-0001"
    assert crucible.powders_mg["Fe"] == pytest.approx(40.0, rel=0.05)
    assert crucible.powders_mg["Ni"] == pytest.approx(60.0, rel=0.05)
    # The simulated controller (PID, no cutback) overshoots a 425 °C step by some 20 °C.
    assert 445.0 <= max(t for _, t in crucible.heat_log) <= 485.0

    # What the documents say agrees with it.
    starts = {s["step"]: s["uid"] for s in docs.of("start")}
    assert set(starts) == {"weigh", "anneal", "analyse"}
    weight = docs.event_data("balance-weight")[0]
    assert weight == pytest.approx(crucible.gross_g, abs=0.002)
    temps = docs.event_data("furnace-temperature")
    assert all(abs(t - 450.0) < 5.0 for t in temps)
    assert docs.event_data("safety-o2_ppm")[0] < 5.0
    fe = docs.event_data("station-composition-Fe")[0]
    assert fe == pytest.approx(crucible.composition()["Fe"], abs=0.02)
    assert docs.event_data("station-property_value")[0] == pytest.approx(
        world.true_property(crucible).value, rel=1e-6
    )
    assert docs.event_data("probe-resistance")[0] > 0
    assert [s["exit_status"] for s in docs.of("stop")] == ["success"] * 3
    assert rig.sim.device("furnace").state()["target_sp"] <= 30.0  # safe state: heater off


async def test_instruments_config_for_a_real_cell_validates() -> None:
    """The same settings with real addresses: only the links differ from the simulated cell."""
    cfg = InstrumentsConfig.model_validate({
        "balance": {"link": {"url": "/dev/ttyUSB0"}},
        "doser": {"link": {"url": "/dev/ttyUSB1", "xonxoff": True}},
        "gantry": {"link": {"url": "/dev/ttyACM0", "baudrate": 115200}},
        "furnace": {"link": {"framing": "rtu", "url": "/dev/ttyUSB2", "unit_id": 1}},
        "probe": {"link": {"url": "rfc2217://192.0.2.10:4001"}},
        "station": {"link": {"host": "hub.lab", "topic": "lab/xrf"}, "elements": ["Fe", "Ni"]},
        "safety": {"link": {"host": "hub.lab", "topic": "lab/glovebox"}},
    })
    cell = CellDevices(cfg)
    assert set(cell.devices) == {"balance", "doser", "gantry", "furnace", "probe", "station",
                                 "safety"}
    await cell.close()
    with pytest.raises(ValueError, match=r"furnace\.link\.framing"):
        InstrumentsConfig.model_validate({"furnace": {"link": {"framing": "ascii"}}})
