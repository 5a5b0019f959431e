"""The physical cell that the simulators share: places, crucibles and what happens to them.

A sample is a crucible that travels: it is taken from the rack by the gantry's gripper, dosed with
powders at the doser, weighed on the balance, heat-treated in a furnace slot, and measured at the
characterisation station. Each simulator acts on this model through the wire protocol it serves, so
the station reports the composition that was actually dosed and the property that the ground truth
gives for it and for the heat treatment the crucible actually received.

Coordinates are gantry machine coordinates in mm. The gripper is worked by GRBL's coolant outputs
(``M8`` closes it, ``M9`` opens it), as is usual for GRBL-driven pick-and-place heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .clock import VirtualClock
from .ground_truth import GroundTruth, PropertyValue

LocationKind = Literal["rack", "doser", "balance", "furnace", "station", "park"]

#: Standard atomic weights (g/mol) of the elements a screening cell is likely to dose.
ATOMIC_MASS: dict[str, float] = {
    "Li": 6.94,
    "B": 10.81,
    "C": 12.011,
    "Mg": 24.305,
    "Al": 26.982,
    "Si": 28.085,
    "P": 30.974,
    "Ti": 47.867,
    "V": 50.942,
    "Cr": 51.996,
    "Mn": 54.938,
    "Fe": 55.845,
    "Co": 58.933,
    "Ni": 58.693,
    "Cu": 63.546,
    "Zn": 65.38,
    "Ga": 69.723,
    "Ge": 72.630,
    "Y": 88.906,
    "Zr": 91.224,
    "Nb": 92.906,
    "Mo": 95.95,
    "Ru": 101.07,
    "Rh": 102.91,
    "Pd": 106.42,
    "Ag": 107.87,
    "Sn": 118.71,
    "La": 138.91,
    "Ce": 140.12,
    "Nd": 144.24,
    "Gd": 157.25,
    "Hf": 178.49,
    "Ta": 180.95,
    "W": 183.84,
    "Re": 186.21,
    "Ir": 192.22,
    "Pt": 195.08,
    "Au": 196.97,
    "Bi": 208.98,
}


class LocationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: LocationKind
    x: float
    y: float
    z: float


def _default_locations() -> dict[str, LocationConfig]:
    locs: dict[str, LocationConfig] = {}
    for i in range(12):
        locs[f"rack/{i + 1}"] = LocationConfig(
            kind="rack", x=20.0 + 25.0 * (i % 6), y=20.0 + 25.0 * (i // 6), z=-40.0
        )
    locs["doser"] = LocationConfig(kind="doser", x=250.0, y=40.0, z=-35.0)
    locs["balance"] = LocationConfig(kind="balance", x=250.0, y=120.0, z=-35.0)
    for i in range(4):
        locs[f"furnace/{i + 1}"] = LocationConfig(
            kind="furnace", x=340.0 + 20.0 * i, y=200.0, z=-60.0
        )
    locs["station"] = LocationConfig(kind="station", x=120.0, y=250.0, z=-30.0)
    locs["park"] = LocationConfig(kind="park", x=0.0, y=0.0, z=0.0)
    return locs


class WorldConfig(BaseModel):
    """Where things are, and what the cell starts with."""

    model_config = ConfigDict(extra="forbid")

    locations: dict[str, LocationConfig] = Field(default_factory=_default_locations)
    crucible_tare_g: float = Field(default=12.0, gt=0)
    #: Crucibles placed in rack slots at start, named C001... in slot order.
    crucibles: int = Field(default=12, ge=0)
    #: How close (mm) the gripper must be to a location to pick or place there.
    position_tolerance_mm: float = Field(default=0.5, gt=0)
    #: A crucible counts as annealed at T when it spent at least this long within 25 °C of T.
    anneal_hold_s: float = Field(default=600.0, gt=0)


class WorldError(RuntimeError):
    """A physically impossible action (gripping nothing, placing onto an occupied slot, ...)."""


@dataclass
class Crucible:
    id: str
    tare_g: float
    location: str | None  # None while held by the gripper
    powders_mg: dict[str, float] = field(default_factory=dict)
    #: (virtual time s, temperature °C) while in a furnace slot; appended by the furnace model.
    heat_log: list[tuple[float, float]] = field(default_factory=list)
    sample_id: str | None = None

    @property
    def gross_g(self) -> float:
        return self.tare_g + sum(self.powders_mg.values()) / 1000.0

    def composition(self) -> dict[str, float]:
        """Atomic fractions of what was dosed (empty when nothing was)."""
        moles = {
            el: mg / ATOMIC_MASS.get(el, 100.0) for el, mg in self.powders_mg.items() if mg > 0
        }
        total = sum(moles.values())
        return {el: n / total for el, n in moles.items()} if total > 0 else {}

    def anneal_temperature(self, hold_s: float) -> float | None:
        """Highest temperature held (within 25 °C) for at least ``hold_s``; None if never."""
        if len(self.heat_log) < 2:
            return None
        best: float | None = None
        temps = sorted({round(t / 25.0) * 25.0 for _, t in self.heat_log}, reverse=True)
        for level in temps:
            held = 0.0
            for (t0, temp0), (t1, _) in zip(self.heat_log, self.heat_log[1:], strict=False):
                if temp0 >= level - 25.0:
                    held += t1 - t0
            if held >= hold_s:
                best = level
                break
        return best

    def state(self, hold_s: float) -> dict[str, object]:
        return {
            "id": self.id,
            "location": self.location,
            "sample_id": self.sample_id,
            "tare_g": self.tare_g,
            "powders_mg": dict(self.powders_mg),
            "composition": self.composition(),
            "peak_c": max((t for _, t in self.heat_log), default=None),
            "anneal_c": self.anneal_temperature(hold_s),
        }


class World:
    """Shared state of the simulated cell. Single-threaded: used from the simulators' event loop."""

    def __init__(self, config: WorldConfig, clock: VirtualClock, truth: GroundTruth) -> None:
        self.config = config
        self.clock = clock
        self.truth = truth
        self.locations = dict(config.locations)
        self.crucibles: dict[str, Crucible] = {}
        #: Crucibles the operator took out of the cell (they hold samples), by id.
        self.removed: dict[str, Crucible] = {}
        self.held: Crucible | None = None
        racks = [name for name, loc in self.locations.items() if loc.kind == "rack"]
        if config.crucibles > len(racks):
            raise ValueError(f"{config.crucibles} crucibles but only {len(racks)} rack slots")
        for i, slot in enumerate(racks[: config.crucibles]):
            cid = f"C{i + 1:03d}"
            self.crucibles[cid] = Crucible(cid, config.crucible_tare_g, slot)

    # -- places --------------------------------------------------------------------------------
    def location_at(self, x: float, y: float, z: float) -> str | None:
        tol = self.config.position_tolerance_mm
        for name, loc in self.locations.items():
            if math.dist((x, y, z), (loc.x, loc.y, loc.z)) <= tol:
                return name
        return None

    def crucible_at(self, location: str) -> Crucible | None:
        for c in self.crucibles.values():
            if c.location == location:
                return c
        return None

    def crucibles_of_kind(self, kind: LocationKind) -> list[Crucible]:
        return [
            c
            for c in self.crucibles.values()
            if c.location is not None and self.locations[c.location].kind == kind
        ]

    # -- gripper -------------------------------------------------------------------------------
    def grip(self, x: float, y: float, z: float) -> Crucible | None:
        """Close the gripper at (x, y, z): picks the crucible there, if any."""
        if self.held is not None:
            return self.held
        where = self.location_at(x, y, z)
        crucible = self.crucible_at(where) if where else None
        if crucible is not None:
            crucible.location = None
            self.held = crucible
        return crucible

    def release(self, x: float, y: float, z: float) -> Crucible | None:
        """Open the gripper at (x, y, z). A crucible released off a location falls and is lost."""
        crucible, self.held = self.held, None
        if crucible is None:
            return None
        where = self.location_at(x, y, z)
        if where is None or self.crucible_at(where) is not None:
            crucible.location = "floor"
            self.locations.setdefault("floor", LocationConfig(kind="park", x=-1e6, y=-1e6, z=-1e6))
        else:
            crucible.location = where
        return crucible

    # -- the operator --------------------------------------------------------------------------
    def refill_rack(self, slots: list[str] | None = None) -> dict[str, object]:
        """The operator replaces used crucibles in rack slots with empty ones.

        In each of ``slots`` (default: every rack slot) a crucible that holds powder is taken out
        of the cell (kept in :attr:`removed` with its story) and an empty crucible is put in its
        place; an empty slot gets an empty crucible; an unused crucible stays. New crucibles are
        named on from the highest id so far. Returns the slots refilled (slot -> new crucible id)
        and the ids taken out.
        """
        racks = [name for name, loc in self.locations.items() if loc.kind == "rack"]
        chosen = racks if slots is None else list(slots)
        bad = [s for s in chosen if s not in racks]
        if bad:
            raise ValueError(f"not rack slots: {bad} (rack slots: {', '.join(racks)})")
        placed: dict[str, str] = {}
        taken: list[str] = []
        for slot in chosen:
            old = self.crucible_at(slot)
            if old is not None and not old.powders_mg:
                continue
            if old is not None:
                del self.crucibles[old.id]
                old.location = "removed"
                self.removed[old.id] = old
                taken.append(old.id)
            n = len(self.crucibles) + len(self.removed) + 1
            while f"C{n:03d}" in self.crucibles or f"C{n:03d}" in self.removed:
                n += 1
            cid = f"C{n:03d}"
            self.crucibles[cid] = Crucible(cid, self.config.crucible_tare_g, slot)
            placed[slot] = cid
        return {"refilled": placed, "removed": taken}

    def clear_cell(self) -> dict[str, object]:
        """The operator clears the cell after an interruption: every crucible that is not in a
        rack slot (in the gripper, in the furnace, on the balance, at the doser or the station)
        is taken out of the cell (kept in :attr:`removed` with its story). Rack slots are left
        as they are (:meth:`refill_rack` is the other half of the job). Returns the ids taken
        out and where each was."""
        taken: dict[str, str] = {}
        if self.held is not None:
            taken[self.held.id] = "gripper"
            self.held.location = None
        for crucible in list(self.crucibles.values()):
            where = crucible.location
            loc = self.locations.get(where) if where is not None else None
            if loc is not None and loc.kind == "rack":
                continue
            taken.setdefault(crucible.id, where or "gripper")
            del self.crucibles[crucible.id]
            crucible.location = "removed"
            self.removed[crucible.id] = crucible
        self.held = None
        return {"removed": taken}

    # -- processes -----------------------------------------------------------------------------
    def add_powder(self, location: str, element: str, mg: float) -> Crucible | None:
        """Powder dosed at ``location``; returns the crucible that received it (None: spilled)."""
        crucible = self.crucible_at(location)
        if crucible is not None and mg > 0:
            crucible.powders_mg[element] = crucible.powders_mg.get(element, 0.0) + mg
        return crucible

    def furnace_temperature(self, temperature_c: float) -> None:
        """The furnace model reports its chamber temperature; crucibles inside log it."""
        now = self.clock.now()
        for c in self.crucibles_of_kind("furnace"):
            if (
                not c.heat_log
                or now - c.heat_log[-1][0] >= 10.0
                or abs(c.heat_log[-1][1] - temperature_c) >= 2.0
            ):
                c.heat_log.append((now, temperature_c))

    def true_property(self, crucible: Crucible) -> PropertyValue:
        comp = crucible.composition()
        if not comp:
            raise WorldError(f"crucible {crucible.id} is empty")
        return self.truth.evaluate(comp, crucible.anneal_temperature(self.config.anneal_hold_s))

    def powder_fractions(self, composition: Mapping[str, float]) -> dict[str, float]:
        """Mass fractions for atomic ``composition`` (for tests and for the doser's own checks)."""
        grams = {el: x * ATOMIC_MASS.get(el, 100.0) for el, x in composition.items()}
        total = sum(grams.values())
        return {el: g / total for el, g in grams.items()}

    def state(self) -> dict[str, object]:
        hold = self.config.anneal_hold_s
        return {
            "virtual_time_s": self.clock.now(),
            "held": self.held.id if self.held else None,
            "crucibles": {cid: c.state(hold) for cid, c in self.crucibles.items()},
            "removed": {cid: c.state(hold) for cid, c in self.removed.items()},
        }
