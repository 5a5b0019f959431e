"""The operator's rack refill: used crucibles out (their story kept), empty ones in; through the
world and through the control channel of a running simulated cell."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hardware_sims.cell import DEVICE_CLASSES, SimCell
from hardware_sims.clock import VirtualClock
from hardware_sims.config import validate_config
from hardware_sims.control import ControlClient
from hardware_sims.ground_truth import SyntheticLandscape
from hardware_sims.world import World, WorldConfig


def used(world: World, slot: str, sample_id: str) -> str:
    """Dose a crucible in ``slot`` (as if it went round the cell and came back)."""
    crucible = world.crucible_at(slot)
    assert crucible is not None
    crucible.powders_mg["Fe"] = 50.0
    crucible.sample_id = sample_id
    return crucible.id


def test_refill_replaces_used_crucibles_and_keeps_their_story() -> None:
    world = World(WorldConfig(crucibles=3), VirtualClock(1.0),
                  SyntheticLandscape(["Fe", "Ni"], seed=0))
    c1 = used(world, "rack/1", "S-1")
    c2 = used(world, "rack/2", "S-2")
    # rack/3 holds an unused crucible; rack/4 is empty
    out = world.refill_rack(["rack/1", "rack/3", "rack/4"])
    assert out == {"refilled": {"rack/1": "C004", "rack/4": "C005"}, "removed": [c1]}
    new = world.crucible_at("rack/1")
    assert new is not None and new.id == "C004" and not new.powders_mg
    assert world.crucible_at("rack/3").id == "C003"  # type: ignore[union-attr]
    assert world.crucible_at("rack/2").id == c2  # type: ignore[union-attr]  (not asked)
    state = world.state()
    assert state["removed"][c1]["sample_id"] == "S-1"  # type: ignore[index]
    assert state["removed"][c1]["location"] == "removed"  # type: ignore[index]
    assert c1 not in state["crucibles"]  # type: ignore[operator]
    # all slots: only the used one left (rack/2) changes; ids never repeat
    out = world.refill_rack()
    assert out["removed"] == [c2] and out["refilled"] == {
        "rack/2": "C006", **{f"rack/{i}": f"C{i + 2:03d}" for i in range(5, 13)}}
    with pytest.raises(ValueError, match="not rack slots: \\['doser'\\]"):
        world.refill_rack(["doser"])


async def test_refill_over_the_control_channel(tmp_path: Path) -> None:
    cfg = validate_config({
        "cell": "refill", "run_dir": str(tmp_path / "run"), "control": {"port": 0},
        "world": {"crucibles": 2},
        "devices": {name: {"enabled": False} for name in DEVICE_CLASSES}})
    async with SimCell(cfg) as cell:
        used(cell.world, "rack/1", "S-1")
        ctl = ControlClient(cell.endpoints()["control"])
        reply = await asyncio.to_thread(ctl.call, op="refill_rack", slots=["rack/1", "rack/2"])
        assert reply["refilled"] == {"rack/1": "C003"} and reply["removed"] == ["C001"]
        world = (await asyncio.to_thread(ctl.call, op="world"))["world"]
        assert world["crucibles"]["C003"]["location"] == "rack/1"
        assert world["removed"]["C001"]["sample_id"] == "S-1"
        bad = await asyncio.to_thread(ctl.request, op="refill_rack", slots="rack/1")
        assert bad == {"ok": False, "error": "slots must be a list of rack slot names"}
        bad = await asyncio.to_thread(ctl.request, op="refill_rack", slots=["furnace/1"])
        assert not bad["ok"] and "not rack slots: ['furnace/1']" in bad["error"]


def test_clear_cell_takes_out_every_crucible_outside_the_rack() -> None:
    """After an interruption the interrupted batch's crucibles are anywhere: in the furnace, in
    the gripper, at the doser. Clearing the cell takes those out (their story kept) and leaves
    the rack alone."""
    world = World(WorldConfig(crucibles=4), VirtualClock(1.0),
                  SyntheticLandscape(["Fe", "Ni"], seed=0))
    in_furnace = world.crucible_at("rack/1")
    at_doser = world.crucible_at("rack/2")
    held = world.crucible_at("rack/3")
    assert in_furnace and at_doser and held
    in_furnace.location, in_furnace.sample_id = "furnace/1", "S-1"
    at_doser.location = "doser"
    held.location, world.held = None, held
    out = world.clear_cell()
    assert out == {"removed": {in_furnace.id: "furnace/1", at_doser.id: "doser",
                               held.id: "gripper"}}
    assert world.held is None and set(world.crucibles) == {"C004"}
    assert world.crucible_at("rack/4").id == "C004"  # type: ignore[union-attr]
    assert world.state()["removed"][in_furnace.id]["sample_id"] == "S-1"  # type: ignore[index]
    assert world.clear_cell() == {"removed": {}}  # nothing left to take


def test_labd_simctl_clears_the_cell_and_refills_the_rack(tmp_path: Path) -> None:
    """The operator's commands, as a technician types them against a running simulated cell."""
    import json
    import subprocess
    import sys
    import threading

    cfg = validate_config({
        "cell": "clear", "run_dir": str(tmp_path / "run"), "control": {"port": 0},
        "world": {"crucibles": 2},
        "devices": {name: {"enabled": False} for name in DEVICE_CLASSES}})
    simctl = str(Path(sys.executable).parent / "labd-simctl")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cell = SimCell(cfg)
    asyncio.run_coroutine_threadsafe(cell.start(), loop).result(30)
    try:
        used(cell.world, "rack/1", "S-1")
        crucible = cell.world.crucible_at("rack/2")
        assert crucible is not None
        crucible.location = "furnace/2"
        control = cell.endpoints()["control"]

        def run(*args: str) -> dict[str, object]:
            done = subprocess.run([simctl, "--control", control, *args], capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            reply: dict[str, object] = json.loads(done.stdout)
            return reply

        assert run("clear-cell") == {"removed": {"C002": "furnace/2"}}
        assert run("refill-rack") == {"refilled": {"rack/1": "C003", "rack/2": "C004",
                                                   **{f"rack/{i}": f"C{i + 2:03d}"
                                                      for i in range(3, 13)}},
                                      "removed": ["C001"]}
    finally:
        asyncio.run_coroutine_threadsafe(cell.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
