"""make_sample and make_batch through the whole simulated cell (in-process simulators on their
real transports, labd's devices, the real RunEngine, schema-validated documents)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky.run_engine import RunEngine

import protocols  # noqa: F401  (registers every protocol)
from hardware_sims.faults import Fault
from labd.samples import sample_from_event
from protocols.composition import dose_masses
from protocols.registry import REGISTRY, ProtocolError
from protocols.stubs import SampleFailed
from tests.protocols.rig import Rig, start_rig, stop_rig
from tests.support.procs import Mosquitto
from tests.support.runengine import ValidatedDocuments, in_re_loop

ELEMENTS = ["Fe", "Co", "Ni", "Cr", "Mn"]  # the simulator's default ground truth


@pytest.fixture
def rig(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = start_rig(tmp_path, mosquitto, world={"crucibles": 4})
    yield r
    stop_rig(r)


def held_s(heat_log: list[tuple[float, float]], level: float, band: float = 25.0) -> float:
    """Virtual seconds the crucible spent within ``band`` of ``level`` (or above it)."""
    return sum(t1 - t0 for (t0, temp), (t1, _) in itertools.pairwise(heat_log)
               if temp >= level - band)


def furnace_is_off(rig: Rig) -> bool:
    st = rig.sim.device("furnace").state()
    return st["instrument_mode"] == 1 and st["target_sp"] <= 30.0 and st["run_mode"] == 1


def test_make_one_sample_end_to_end(RE: RunEngine, docs: ValidatedDocuments, rig: Rig) -> None:
    target = {"Fe": 0.25, "Co": 0.25, "Ni": 0.5}
    proto = REGISTRY.get("make_sample")
    params = proto.validate({
        "sample_id": "S-0001", "composition": target, "total_mg": 120, "anneal_c": 800,
        "anneal_s": 600, "ramp_c_min": 30, "rack_slot": "rack/2", "furnace_slot": "furnace/3",
        "campaign": "c-test",
    })
    RE(proto.plan(rig.devices, params))

    # The physical outcome, on the simulators.
    world = rig.sim.world
    crucible = world.crucibles["C002"]
    assert crucible.location == "rack/2" and crucible.sample_id == "S-0001"
    for el, mg in dose_masses(target, 120.0).items():
        assert crucible.powders_mg[el] == pytest.approx(mg, rel=0.05)
    assert 780.0 <= max(t for _, t in crucible.heat_log) <= 860.0
    assert 600.0 <= held_s(crucible.heat_log, 800.0) <= 900.0  # the dwell, plus ramp overshoot
    assert furnace_is_off(rig)

    # The documents.
    (start,) = docs.of("start")
    assert start["protocol"] == "make_sample" and start["sample_id"] == "S-0001"
    assert start["campaign"] == "c-test" and start["property_name"]
    (stop,) = docs.of("stop")
    assert stop["exit_status"] == "success"
    streams = {d["uid"]: d["name"] for d in docs.of("descriptor")}
    assert {"sample", "balance", "doser", "furnace", "furnace_segment", "station"} <= set(
        streams.values())
    (event,) = [e for e in docs.of("event") if streams[e["descriptor"]] == "sample"]
    sample = event["data"]
    # The sample table reads it as the convention says (labd.samples).
    descriptor = next(d for d in docs.of("descriptor") if d["uid"] == event["descriptor"])
    row = sample_from_event(start, descriptor, event)
    assert row.sample_id == "S-0001" and row.campaign == "c-test"
    assert row.protocol == "make_sample" and row.property_unit == start["property_unit"]
    assert row.measured_composition["Ni"] == sample["measured_Ni"]
    assert row.extra["crucible"] == "C002"
    for el in ELEMENTS:
        assert sample[f"target_{el}"] == pytest.approx(target.get(el, 0.0))
        assert sample[f"measured_{el}"] == pytest.approx(target.get(el, 0.0), abs=0.02)
        assert sample[f"dosed_mg_{el}"] == pytest.approx(crucible.powders_mg.get(el, 0.0),
                                                         abs=1e-3)
    assert sample["anneal_c"] == 800.0 and sample["anneal_s"] == 600.0
    assert sample["property_value"] == pytest.approx(world.true_property(crucible).value,
                                                     rel=1e-9)
    assert sample["crucible"] == "C002" and sample["crucible_g"] == pytest.approx(12.0, abs=1e-3)
    assert sample["weighed_mg"] == pytest.approx(sum(crucible.powders_mg.values()), abs=0.5)
    # The furnace profile actually followed: up to the anneal, down to the unload temperature.
    temps = [e["data"]["furnace-temperature"] for e in docs.of("event")
             if streams[e["descriptor"]] == "furnace"]
    assert len(temps) >= 10 and 790.0 <= max(temps) <= 860.0 and temps[-1] <= 100.0


def test_a_batch_measures_while_the_gantry_works(
    RE: RunEngine, docs: ValidatedDocuments, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    rig = start_rig(tmp_path, mosquitto, devices={"station": {"measure_s": 600}})
    seen: list[tuple[str | None, str | None]] = []  # (crucible measured, crucible carried)

    async def watch() -> None:
        station, world = rig.sim.device("station"), rig.sim.world
        while True:
            cur = station.state()["current"]
            seen.append((cur["crucible"] if cur else None, world.held.id if world.held else None))
            await asyncio.sleep(0.002)

    try:
        watcher = asyncio.run_coroutine_threadsafe(watch(), RE.loop)
        comps = [{"Fe": 0.5, "Ni": 0.5}, {"Co": 0.3, "Cr": 0.7}, {"Fe": 0.2, "Mn": 0.8}]
        proto = REGISTRY.get("make_batch")
        params = proto.validate({
            "samples": [{"sample_id": f"B-{i}", "composition": c} for i, c in enumerate(comps)],
            "anneal_c": 600, "anneal_s": 600, "ramp_c_min": 60, "unload_below_c": 300,
        })
        RE(proto.plan(rig.devices, params))
        watcher.cancel()

        world = rig.sim.world
        streams = {d["uid"]: d["name"] for d in docs.of("descriptor")}
        samples = [e["data"] for e in docs.of("event") if streams[e["descriptor"]] == "sample"]
        assert [s["sample_id"] for s in samples] == ["B-0", "B-1", "B-2"]
        for i, (s, comp) in enumerate(zip(samples, comps, strict=True)):
            crucible = world.crucibles[f"C{i + 1:03d}"]
            assert s["crucible"] == crucible.id and crucible.location == f"rack/{i + 1}"
            assert s["furnace_slot"] == f"furnace/{i + 1}"
            for el in ELEMENTS:
                assert s[f"measured_{el}"] == pytest.approx(comp.get(el, 0.0), abs=0.02)
            assert s["property_value"] == pytest.approx(world.true_property(crucible).value)
            # all three were annealed together
            assert held_s(crucible.heat_log, 600.0) >= 600.0
        # The station measured crucible k while the gripper carried crucible k+1.
        overlaps = {(m, h) for m, h in seen if m is not None and h is not None and m != h}
        assert ("C001", "C002") in overlaps and ("C002", "C003") in overlaps
        assert furnace_is_off(rig)
    finally:
        stop_rig(rig)


def test_bad_parameters_are_refused_before_anything_moves(rig: Rig) -> None:
    proto = REGISTRY.get("make_sample")
    good = {"sample_id": "S-1", "composition": {"Fe": 0.5, "Ni": 0.5}}
    cases = [
        ({"composition": {"Fe": 0.5, "Ni": 0.6}}, "composition", "sum to 1.1"),
        ({"composition": {"FE": 1.0}}, "composition", "case-sensitive"),
        ({"composition": {"Fe": 1.2, "Ni": -0.2}}, "composition", "within 0..1"),
        ({"anneal_c": 2000}, "anneal_c", "less than or equal to 1100"),
        ({"total_mg": 1}, "total_mg", "greater than or equal to 10"),
        ({"sample_id": "a/b"}, "sample_id", "pattern"),
        ({"ramp": 10}, "ramp", "Extra inputs"),
    ]
    for change, field, text in cases:
        with pytest.raises(ProtocolError) as info:
            proto.validate({**good, **change})
        assert info.value.errors[0]["field"] == field, change
        assert text in str(info.value) and f"make_sample: invalid parameters: {field}" in str(
            info.value)
    # What only the cell knows is checked when the plan is made, before it runs.
    before = (rig.sim.world.state(), rig.sim.device("doser").state()["heads"])
    for change, field, text in [
        ({"composition": {"Cu": 1.0}}, "composition", "no doser head holds Cu"),
        ({"rack_slot": "rack/99"}, "rack_slot", "not a rack slot"),
        ({"furnace_slot": "rack/3"}, "furnace_slot", "not a furnace slot"),
        ({"composition": {"Fe": 0.999, "Ni": 0.001}, "total_mg": 10}, "composition",
         "Ni needs 0.0105 mg"),
    ]:
        with pytest.raises(ProtocolError) as info:
            proto.plan(rig.devices, proto.validate({**good, **change}))
        assert info.value.errors[0]["field"] == field and text in str(info.value), change
    batch = REGISTRY.get("make_batch")
    five = batch.validate({"samples": [{"sample_id": f"B{i}", "composition": {"Fe": 1.0}}
                                       for i in range(5)]})
    with pytest.raises(ProtocolError, match="make_batch: invalid parameters: samples: 5 samples, "
                                            "but the furnace has 4 slots"):
        batch.plan(rig.devices, five)
    with pytest.raises(ProtocolError, match=r"sample ids used twice in the load: \['B'\]"):
        batch.validate({"samples": [{"sample_id": "B", "composition": {"Fe": 1.0}}] * 2})
    assert (rig.sim.world.state()["crucibles"], rig.sim.device("doser").state()["heads"]) == (
        before[0]["crucibles"], before[1])


def test_an_empty_rack_slot_is_refused_before_dosing(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    proto = REGISTRY.get("make_sample")
    params = proto.validate({"sample_id": "S-E", "composition": {"Fe": 1.0},
                             "rack_slot": "rack/6"})  # the cell has crucibles in rack/1..4
    with pytest.raises(SampleFailed, match=r"rack slot rack/6 holds no crucible.*nothing was "
                                           r"dosed"):
        RE(proto.plan(rig.devices, params))
    assert all(not c.powders_mg for c in rig.sim.world.crucibles.values())
    assert all(h["doses"] == 0 for h in rig.sim.device("doser").state()["heads"].values())
    (stop,) = docs.of("stop")
    assert stop["exit_status"] == "fail" and "holds no crucible" in stop["reason"]


def test_a_head_that_runs_out_fails_the_sample_and_leaves_the_furnace_off(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    furnace = rig.cell.devices["furnace"]

    async def preheat() -> None:  # the furnace was left warming by hand
        await furnace.client.operate()
        await furnace.client.set_setpoint(300.0)

    in_re_loop(preheat())
    ni_head = rig.layout.heads["Ni"]
    in_re_loop(rig.sim.device("doser").control("set_powder", {"head": ni_head, "grams": 0.02}))
    proto = REGISTRY.get("make_sample")
    params = proto.validate({"sample_id": "S-F", "composition": {"Fe": 0.5, "Ni": 0.5}})
    with pytest.raises(SampleFailed) as info:
        RE(proto.plan(rig.devices, params))
    message = str(info.value)
    assert "S-F: dosing" in message and f"of Ni (head {ni_head}) failed" in message
    assert "powder flow error" in message and "rack/1 is at the doser holding Fe" in message
    crucible = rig.sim.world.crucibles["C001"]
    assert crucible.location == "doser" and crucible.powders_mg["Ni"] == pytest.approx(20.0)
    assert furnace_is_off(rig)
    (stop,) = docs.of("stop")
    assert stop["exit_status"] == "fail" and "powder flow error" in stop["reason"]


def test_a_furnace_alarm_during_the_anneal_turns_the_heater_off(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    sim_furnace = rig.sim.device("furnace")

    async def trip_when_hot() -> None:
        while sim_furnace.state()["pv"] < 300.0:
            await asyncio.sleep(0.005)
        await rig.sim.set_fault("furnace", Fault(kind="alarm"))

    tripper: Any = asyncio.run_coroutine_threadsafe(trip_when_hot(), RE.loop)
    proto = REGISTRY.get("make_sample")
    params = proto.validate({"sample_id": "S-A", "composition": {"Fe": 1.0}, "ramp_c_min": 60})
    with pytest.raises(SampleFailed, match=r"heat treatment failed: .*over-temperature.*heater "
                                           r"switched off"):
        RE(proto.plan(rig.devices, params))
    tripper.result(timeout=5)
    assert furnace_is_off(rig)
    assert rig.sim.world.crucibles["C001"].location == "furnace/1"
