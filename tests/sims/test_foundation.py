"""The simulators' shared machinery: virtual clock, ground truth, world model, config errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hardware_sims.clock import VirtualClock
from hardware_sims.config import ConfigError, load_config, validate_config
from hardware_sims.faults import Fault, FaultBox, FaultKind
from hardware_sims.ground_truth import (
    GroundTruthError,
    SyntheticLandscape,
    TableGroundTruth,
)
from hardware_sims.world import World, WorldConfig
from tests.conftest import OER_CSV

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.physics
async def test_time_scale_runs_virtual_time_faster() -> None:
    clock = VirtualClock(200.0)
    wall0, virt0 = time.monotonic(), clock.now()
    await clock.sleep(20.0)  # 20 virtual seconds = 0.1 s of wall time
    wall, virt = time.monotonic() - wall0, clock.now() - virt0
    assert virt >= 20.0
    assert virt / wall == pytest.approx(200.0, rel=0.05)
    assert wall < 1.0


def test_time_scale_change_keeps_virtual_time_continuous() -> None:
    clock = VirtualClock(10.0)
    before = clock.now()
    clock.set_time_scale(1000.0)
    assert clock.now() >= before
    assert clock.time_scale == 1000.0
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        clock.set_time_scale(0)


def test_oer_benchmark_loads_pool_based() -> None:
    gt = TableGroundTruth(OER_CSV, "minimize")
    assert gt.elements == ("Ni", "Fe", "Co", "Mn", "Ce", "La")
    assert len(gt) == 2121
    assert gt.property_name == "overpotential" and gt.unit == "V"
    # The first data row of the file, replayed exactly.
    v = gt.evaluate({"Ni": 0.1, "Fe": 0.2, "Co": 0.6, "Mn": 0.1}, None)
    assert v.value == pytest.approx(0.396193) and v.distance == 0.0 and v.pool_index == 0
    # A composition made with dosing error answers with the nearest pool member.
    near = gt.evaluate({"Ni": 0.105, "Fe": 0.195, "Co": 0.6, "Mn": 0.1}, None)
    assert near.pool_index == 0 and near.distance == pytest.approx(0.01)


def test_table_ground_truth_refuses_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("A,B,prop\n0.5,0.6,1.0\n")
    with pytest.raises(GroundTruthError, match=r"bad.csv:2: element fractions sum to 1.100"):
        TableGroundTruth(bad, "maximize")
    bad.write_text("A,B,prop\n0.5,x,1.0\n")
    with pytest.raises(GroundTruthError, match=r"bad.csv:2: not a number"):
        TableGroundTruth(bad, "maximize")
    with pytest.raises(GroundTruthError, match="cannot read"):
        TableGroundTruth(tmp_path / "missing.csv", "maximize")
    with pytest.raises(GroundTruthError, match="does not know"):
        TableGroundTruth(OER_CSV, "minimize").evaluate({"W": 1.0}, None)


def test_synthetic_landscape_is_reproducible_and_depends_on_anneal() -> None:
    a = SyntheticLandscape(["Fe", "Co", "Ni"], seed=3)
    b = SyntheticLandscape(["Fe", "Co", "Ni"], seed=3)
    comp = {"Fe": 0.5, "Co": 0.3, "Ni": 0.2}
    assert a.evaluate(comp, 800).value == b.evaluate(comp, 800).value
    values = {a.evaluate(comp, t).value for t in (None, 500, 800, 1100)}
    assert len(values) == 4
    lo = SyntheticLandscape(["Fe", "Co", "Ni"], seed=3, goal="minimize")
    # Minimising mirrors the landscape: the best maximise point is the best minimise point.
    grid = [
        {"Fe": x / 10, "Co": y / 10, "Ni": (10 - x - y) / 10}
        for x in range(11)
        for y in range(11 - x)
    ]
    best_max = max(grid, key=lambda c: a.evaluate(c, 800).value)
    best_min = min(grid, key=lambda c: lo.evaluate(c, 800).value)
    assert best_max == best_min


def test_world_follows_a_crucible_through_the_cell() -> None:
    clock = VirtualClock(1.0)
    world = World(WorldConfig(), clock, SyntheticLandscape(["Fe", "Ni"], seed=0))
    rack1 = world.locations["rack/1"]
    crucible = world.grip(rack1.x, rack1.y, rack1.z)
    assert crucible is not None and crucible.id == "C001" and world.held is crucible
    doser = world.locations["doser"]
    world.release(doser.x, doser.y, doser.z)
    assert world.crucible_at("doser") is crucible
    world.add_powder("doser", "Fe", 55.845)
    world.add_powder("doser", "Ni", 58.693)
    assert crucible.composition() == pytest.approx({"Fe": 0.5, "Ni": 0.5})
    assert crucible.gross_g == pytest.approx(12.0 + 0.114538)
    # Into the furnace; a 20-minute hold at 800 °C on the log counts as an anneal at 800.
    world.grip(doser.x, doser.y, doser.z)
    f1 = world.locations["furnace/1"]
    world.release(f1.x, f1.y, f1.z)
    crucible.heat_log.extend([(0.0, 800.0), (600.0, 801.0), (1200.0, 799.0)])
    assert crucible.anneal_temperature(600.0) == 800.0
    assert world.true_property(crucible).value > 0
    # Released off any location: the crucible falls.
    world.grip(f1.x, f1.y, f1.z)
    world.release(1.0, 1.0, 1.0)
    assert crucible.location == "floor"


def test_config_errors_name_key_value_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"devices": {"furnace": {"unit_id": 300}}, "tyme_scale": 5})
    text = str(err.value)
    assert "devices.furnace.unit_id: Input should be less than or equal to 247 (got 300)" in text
    assert "tyme_scale: unknown key" in text
    path = tmp_path / "cell.yaml"
    path.write_text("devices: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("devices:\n  gantry:\n    faults: [{kind: explode}]\n")
    with pytest.raises(ConfigError, match=r"devices.gantry.faults.0.kind: Input should be"):
        load_config(path)


def test_shipped_config_is_valid() -> None:
    cfg = load_config(REPO / "config" / "sim-cell.yaml")
    assert cfg.cell == "sim-cell"
    assert cfg.devices.furnace.tcp_port == 5020


@pytest.mark.faults
async def test_fault_box_counts_and_events() -> None:
    box = FaultBox("dev")
    seen: list[FaultKind] = []

    async def listener(f: Fault) -> None:
        seen.append(f.kind)

    box.on_event(listener)
    await box.set(Fault(kind=FaultKind.NO_REPLY, count=2))
    assert box.take_reply_fault() is not None
    assert box.take_reply_fault() is not None
    assert box.take_reply_fault() is None  # used up
    await box.set(Fault(kind=FaultKind.DISCONNECT, duration_s=0))
    await asyncio.sleep(0)
    assert seen == [FaultKind.DISCONNECT]
    garbled = box.garble(b"S S     100.00 g\r\n")
    assert garbled != b"S S     100.00 g\r\n" and len(garbled) == 18
