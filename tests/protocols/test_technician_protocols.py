"""Technician protocols on the simulated cell: homing, balance check, furnace bake-out,
compositions from a CSV file, one sample from a formula."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bluesky.run_engine import RunEngine

import protocols  # noqa: F401  (registers every protocol)
from protocols.registry import REGISTRY, ProtocolError
from protocols.technician import BalanceCheckFailed
from tests.protocols.rig import Rig, start_rig, stop_rig
from tests.support.procs import Mosquitto
from tests.support.runengine import ValidatedDocuments, in_re_loop


@pytest.fixture
def rig(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = start_rig(tmp_path, mosquitto)
    yield r
    stop_rig(r)


def stream_data(docs: ValidatedDocuments, stream: str) -> list[dict]:
    names = {d["uid"]: d["name"] for d in docs.of("descriptor")}
    return [e["data"] for e in docs.of("event") if names[e["descriptor"]] == stream]


def test_every_protocol_declares_units_and_ranges() -> None:
    for name in ("make_sample", "make_batch", "make_sample_by_hand", "make_from_csv",
                 "check_balance", "furnace_bakeout", "home_gantry"):
        schema = REGISTRY.get(name).describe()["parameters"]
        for field, prop in schema.get("properties", {}).items():
            if field in ("anneal_c", "anneal_s", "total_mg", "reference_g", "temperature_c",
                         "hold_s", "ramp_c_min"):
                assert prop.get("unit"), (name, field)
                assert prop.get("description"), (name, field)


def test_home_gantry(RE: RunEngine, docs: ValidatedDocuments, rig: Rig) -> None:
    gantry = rig.cell.devices["gantry"]

    async def somewhere() -> None:  # the controller powers up in Alarm, position unknown
        await gantry.client.unlock()
        await gantry.client.move_to(100.0, 50.0, -10.0)

    in_re_loop(somewhere())
    proto = REGISTRY.get("home_gantry")
    RE(proto.plan(rig.devices, proto.validate({})))
    (event,) = stream_data(docs, "primary")
    assert (event["gantry-x"], event["gantry-y"], event["gantry-z"]) == (0.0, 0.0, 0.0)
    st = rig.sim.device("gantry").state()
    assert st["homed"] is True and st["position"] == [0.0, 0.0, 0.0]
    with pytest.raises(ProtocolError, match="home_gantry: invalid parameters: speed"):
        proto.validate({"speed": 3})


def test_check_balance_passes_and_fails_with_the_reading(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    in_re_loop(rig.sim.device("balance").control("place_mass", {"grams": 100.0, "name": "E2"}))
    proto = REGISTRY.get("check_balance")
    RE(proto.plan(rig.devices, proto.validate({"reference_g": 100.0, "tolerance_mg": 0.5})))
    (check,) = stream_data(docs, "check")
    assert check["passed"] is True and abs(check["deviation_mg"]) <= 0.5
    assert len(stream_data(docs, "primary")) == 3
    assert check["mean_g"] == pytest.approx(100.0, abs=5e-4)

    # A reference that the balance does not read within the tolerance: a clear failure.
    params = proto.validate({"reference_g": 100.002, "tolerance_mg": 0.5, "readings": 2})
    with pytest.raises(BalanceCheckFailed, match=r"reads 100\.00\d\d g for the 100\.002 g "
                                                  r"reference \(-[12]\.\d\d mg, tolerance ±0\.5"):
        RE(proto.plan(rig.devices, params))
    failed = stream_data(docs, "check")[-1]
    assert failed["passed"] is False and failed["reference_g"] == 100.002
    assert docs.of("stop")[-1]["exit_status"] == "fail"
    with pytest.raises(ProtocolError, match="reference_g: Input should be greater than 0"):
        proto.validate({"reference_g": 0})


def test_furnace_bakeout_runs_a_program_and_ends_with_the_heater_off(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    proto = REGISTRY.get("furnace_bakeout")
    RE(proto.plan(rig.devices, proto.validate(
        {"temperature_c": 500, "hold_s": 600, "ramp_c_min": 60})))
    temps = [d["furnace-temperature"] for d in stream_data(docs, "furnace")]
    assert 495.0 <= max(temps) <= 580.0
    segments = [d["furnace-programmer-segment"] for d in stream_data(docs, "furnace_segment")]
    assert {1, 2} <= set(segments)  # ramp, dwell
    st = rig.sim.device("furnace").state()
    assert st["instrument_mode"] == 1 and st["target_sp"] <= 30.0  # standby: heater off
    assert docs.of("start")[0]["program"]["segments"][1] == {"kind": "dwell", "duration_s": 600}
    with pytest.raises(ProtocolError, match="temperature_c: Input should be less than or equal"):
        proto.validate({"temperature_c": 1500})


def test_make_from_csv_in_one_furnace_load(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, tmp_path: Path
) -> None:
    csv_file = tmp_path / "plate.csv"
    csv_file.write_text("sample_id,Fe,Ni,Co\nP-1,0.5,0.5,0\n,0.2,,0.8\n")
    proto = REGISTRY.get("make_from_csv")
    params = proto.validate({"csv_path": str(csv_file), "id_prefix": "PL", "load_size": 2,
                             "rack_slots": ["rack/7", "rack/8"], "anneal_c": 500,
                             "anneal_s": 600, "ramp_c_min": 60, "unload_below_c": 300})
    RE(proto.plan(rig.devices, params))
    samples = stream_data(docs, "sample")
    assert [s["sample_id"] for s in samples] == ["P-1", "PL-002"]
    assert [s["crucible"] for s in samples] == ["C007", "C008"]
    assert samples[1]["measured_Co"] == pytest.approx(0.8, abs=0.02)
    assert len(docs.of("start")) == 1 and docs.of("start")[0]["load"] == 1
    world = rig.sim.world
    assert world.crucibles["C008"].sample_id == "PL-002"
    assert world.crucibles["C008"].location == "rack/8"


def test_make_from_csv_refuses_a_bad_file_naming_the_line() -> None:
    proto = REGISTRY.get("make_from_csv")
    cases = [
        ("Fe,Ni\n0.5,0.5\n0.5,0.6\n", "CSV line 3: atomic fractions sum to 1.1"),
        ("Fe,Ni\n0.5,abc\n", "CSV line 2, column Ni: 'abc' is not a number"),
        ("Fe,Xx\n0.5,0.5\n", "unknown element symbol(s) ['Xx']"),
        ("Fe,Ni\n", "no composition row"),
        ("sample_id,Fe\nA,1\nA,1\n", "sample ids used twice in the CSV: ['A']"),
    ]
    for text, message in cases:
        with pytest.raises(ProtocolError) as info:
            proto.validate({"csv_text": text})
        assert message in str(info.value), text
    with pytest.raises(ProtocolError, match="give exactly one of csv_path and csv_text"):
        proto.validate({})
    with pytest.raises(ProtocolError, match=r"cannot read /nonexistent\.csv"):
        proto.validate({"csv_path": "/nonexistent.csv"})


def test_make_sample_by_hand_takes_a_formula(rig: Rig) -> None:
    proto = REGISTRY.get("make_sample_by_hand")
    params = proto.validate({"sample_id": "H-1", "formula": "Fe25 Co25 Ni50",
                             "rack_slot": "rack/3"})
    open_run = next(proto.plan(rig.devices, params))  # the plan's first message: the start md
    assert open_run.command == "open_run"
    assert open_run.kwargs["sample_id"] == "H-1" and open_run.kwargs["protocol"] == "make_sample"
    for bad, message in [("Fe25Qq75", "unknown element symbol 'Qq'"),
                         ("Fe 25 % Ni", "cannot read '%'"), ("Fe2Fe3", "Fe appears twice")]:
        with pytest.raises(ProtocolError, match="formula: Value error") as info:
            proto.validate({"sample_id": "H-2", "formula": bad})
        assert message in str(info.value)
    with pytest.raises(ProtocolError, match="no doser head holds Cu"):
        proto.plan(rig.devices, proto.validate({"sample_id": "H-3", "formula": "CuNi"}))
