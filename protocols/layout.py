"""The cell's layout: where things are for the protocols, and which powder is in which head.

A real cell writes it in YAML (under ``layout:`` in the daemon's config)::

    locations:
      rack/1:    {kind: rack, x: 20, y: 20, z: -40}
      doser:     {kind: doser, x: 250, y: 40, z: -35}
      balance:   {kind: balance, x: 250, y: 120, z: -35}
      furnace/1: {kind: furnace, x: 340, y: 200, z: -60}
      station:   {kind: station, x: 120, y: 250, z: -30}
    heads: {Fe: 1, Co: 2, Ni: 3}
    safe_z: -5

and :func:`layout_from_endpoints` builds it for the simulated cell from ``labd-sim``'s endpoints.
The daemon passes it to every protocol as ``devices["layout"]``.

Coordinates are gantry work coordinates in mm (Z homes up at 0, so locations are below it). A
carried crucible travels at ``safe_z``: up from where the head is, across, then down, so it
never sweeps across the rack or a furnace door at working height.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LocationKind = Literal["rack", "doser", "balance", "furnace", "station", "park"]


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: LocationKind
    x: float
    y: float
    z: float

    @property
    def xyz(self) -> tuple[float, float, float]:
        return (self.x, self.y, self.z)


class CellLayout(BaseModel):
    """Named locations, the powder in each doser head, travel height and sample defaults."""

    model_config = ConfigDict(extra="forbid")

    locations: dict[str, Location]
    #: Element -> sampler position of the doser head holding its powder.
    heads: dict[str, int] = Field(min_length=1)
    #: Height (mm, work coordinates) at which the gantry travels with or without a crucible;
    #: None: straight moves between locations (a cell without obstacles).
    safe_z: float | None = -5.0
    #: Total powder mass of a sample when a protocol does not say, mg.
    default_total_mg: float = Field(default=100.0, gt=0)
    #: Smallest dose the doser is trusted with, mg (smaller ones are refused up front).
    min_dose_mg: float = Field(default=0.5, gt=0)
    #: Lightest empty crucible, g: a balance reading below it means the slot was empty.
    min_crucible_g: float = Field(default=1.0, gt=0)
    #: The screened property (start documents carry them; see labd.samples).
    property_name: str | None = None
    property_unit: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> CellLayout:
        for kind in ("rack", "doser", "balance", "furnace", "station"):
            if not self.slots(kind):  # type: ignore[arg-type]
                raise ValueError(f"the layout has no location of kind {kind!r}")
        for kind in ("doser", "balance", "station"):
            if len(self.slots(kind)) != 1:  # type: ignore[arg-type]
                raise ValueError(f"the layout needs exactly one {kind!r} location")
        for el, pos in self.heads.items():
            if not 1 <= pos <= 30:
                raise ValueError(f"head position of {el} is {pos}: the sampler has 1..30")
        return self

    def slots(self, kind: LocationKind) -> list[str]:
        """Names of the locations of ``kind``, in the layout's order."""
        return [n for n, loc in self.locations.items() if loc.kind == kind]

    @property
    def elements(self) -> list[str]:
        return list(self.heads)

    @property
    def rack_slots(self) -> list[str]:
        return self.slots("rack")

    @property
    def furnace_slots(self) -> list[str]:
        return self.slots("furnace")

    @property
    def doser(self) -> str:
        return self.slots("doser")[0]

    @property
    def balance(self) -> str:
        return self.slots("balance")[0]

    @property
    def station(self) -> str:
        return self.slots("station")[0]

    def check_slot(self, name: str, kind: LocationKind) -> str:
        """``name`` if it is a location of ``kind``; ValueError listing the valid ones."""
        loc = self.locations.get(name)
        if loc is None or loc.kind != kind:
            raise ValueError(f"{name!r} is not a {kind} slot of this cell "
                             f"(its {kind} slots: {', '.join(self.slots(kind))})")
        return name


def layout_from_endpoints(endpoints: Mapping[str, Any], **overrides: Any) -> CellLayout:
    """The layout of a running ``labd-sim`` cell, from its ``--endpoints`` JSON: locations with
    their kind, doser heads (``devices.doser.heads``: ``{"1": "Fe", ...}``) and the ground
    truth's property name and unit. ``overrides`` replace fields (e.g. ``safe_z``)."""
    locations = {
        name: Location(kind=v["kind"], x=v["x"], y=v["y"], z=v["z"])
        for name, v in endpoints.get("locations", {}).items()
    }
    heads_ep = endpoints.get("devices", {}).get("doser", {}).get("heads", {})
    heads = {str(el): int(pos) for pos, el in heads_ep.items()}
    gt = endpoints.get("ground_truth", {}) or {}
    data: dict[str, Any] = {
        "locations": locations, "heads": heads,
        "property_name": gt.get("property") or None, "property_unit": gt.get("unit") or None,
    }
    data.update(overrides)
    return CellLayout.model_validate(data)
