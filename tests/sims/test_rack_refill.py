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
