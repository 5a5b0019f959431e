"""Test protocols on soft signals, for the engine and API tests: ``count`` (``bp.count`` of the
device ``sig``) and ``fail`` (raises at once). Callers add their own to the registry."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
from pydantic import BaseModel, Field

from protocols.registry import Registry, protocol


class CountParams(BaseModel):
    num: int = Field(3, ge=1, le=10000, description="events")
    delay: float = Field(0.0, ge=0, le=5, description="seconds between events")


class FailParams(BaseModel):
    message: str = "boom"


def make_registry() -> Registry:
    reg = Registry()

    @protocol("count", CountParams, title="Count", needs=("sig",), registry=reg)
    def count(devices: Any, p: CountParams) -> Any:
        return (yield from bp.count([devices["sig"]], p.num, delay=p.delay))

    @protocol("fail", FailParams, title="Fail", registry=reg)
    def fail(devices: Any, p: FailParams) -> Any:
        yield from bps.null()
        raise RuntimeError(p.message)

    return reg


def campaign_cell(rack_slots: int, per_row: int) -> dict[str, Any]:
    """A simulated cell for the campaign tests: ``rack_slots`` rack slots (``per_row`` a row)
    with an empty crucible each, and the protocols' waits kept short (30 s hold, 20 s station
    measurement)."""
    locations: dict[str, Any] = {
        f"rack/{i + 1}": {"kind": "rack", "x": 20.0 + 22.0 * (i % per_row),
                          "y": 20.0 + 20.0 * (i // per_row), "z": -40.0}
        for i in range(rack_slots)}
    locations.update({
        "doser": {"kind": "doser", "x": 250.0, "y": 40.0, "z": -35.0},
        "balance": {"kind": "balance", "x": 250.0, "y": 120.0, "z": -35.0},
        **{f"furnace/{i + 1}": {"kind": "furnace", "x": 340.0 + 20.0 * i, "y": 200.0,
                                "z": -60.0} for i in range(4)},
        "station": {"kind": "station", "x": 120.0, "y": 250.0, "z": -30.0},
        "park": {"kind": "park", "x": 0.0, "y": 0.0, "z": 0.0},
    })
    return {"world": {"locations": locations, "crucibles": rack_slots, "anneal_hold_s": 30},
            "devices": {"station": {"measure_s": 20}}}
