"""Closed-loop screening campaigns: the spec, and the state machine the daemon and bench/ share.

A :class:`Campaign` is synchronous and not thread-safe: the daemon serialises calls to it and runs
:meth:`Campaign.next_batch` (the expensive one: it may refit the optimiser) in an executor, off the
event loop. Everything it knows is in :meth:`Campaign.to_dict` (JSON-able), which the daemon stores
whenever it changes; :meth:`Campaign.from_dict` rebuilds the optimiser from the stored observations.

Conventions
    * A point is ``x = [fraction of each element in spec order..., anneal_c, anneal_h]`` (the
      process entries only when the spec has a ``process`` section). Fractions are atomic.
    * ``value`` is the measured property in its own units; the objective turns it into the utility
      the optimiser maximises (``-value`` to minimise, ``-|value - target|`` for a target).
    * The ``samples`` budget counts samples with a result. An interrupted sample is kept in the
      record with its id, is not counted as made (its composition may be suggested again, in a
      new crucible), but its powder counts against the gram budgets.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.optimizer import make_agent
from protocols.optimizer.base import Agent, SearchSpace

#: Standard atomic weights (g/mol) of elements an alloy cell is likely to dose.
ATOMIC_MASS: dict[str, float] = {
    "Li": 6.94, "Be": 9.012, "B": 10.81, "C": 12.011, "Mg": 24.305, "Al": 26.982, "Si": 28.085,
    "P": 30.974, "S": 32.06, "Ca": 40.078, "Sc": 44.956, "Ti": 47.867, "V": 50.942, "Cr": 51.996,
    "Mn": 54.938, "Fe": 55.845, "Co": 58.933, "Ni": 58.693, "Cu": 63.546, "Zn": 65.38,
    "Ga": 69.723, "Ge": 72.63, "Y": 88.906, "Zr": 91.224, "Nb": 92.906, "Mo": 95.95,
    "Ru": 101.07, "Rh": 102.91, "Pd": 106.42, "Ag": 107.87, "Sn": 118.71, "Sb": 121.76,
    "La": 138.91, "Ce": 140.12, "Nd": 144.24, "Gd": 157.25, "Hf": 178.49, "Ta": 180.95,
    "W": 183.84, "Re": 186.21, "Ir": 192.22, "Pt": 195.08, "Au": 196.97, "Bi": 208.98,
}  # fmt: skip

_EPS = 1e-9


class ElementBounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float = Field(0.0, ge=0.0, le=1.0)
    max: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _order(self) -> ElementBounds:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Range(BaseModel):
    """A process parameter swept from ``min`` to ``max`` in ``step``."""

    model_config = ConfigDict(extra="forbid")
    min: float
    max: float
    step: float = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def levels(self) -> np.ndarray:
        n = math.floor((self.max - self.min) / self.step + 1e-9)
        return self.min + self.step * np.arange(n + 1)


class Process(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anneal_c: Range = Field(description="anneal temperature, °C")
    anneal_h: Range = Field(description="anneal time, hours")

    @field_validator("anneal_c")
    @classmethod
    def _temp(cls, v: Range) -> Range:
        if v.min < 0 or v.max > 1600:
            raise ValueError(f"anneal temperature must lie in 0..1600 °C, got {v.min}..{v.max}")
        return v

    @field_validator("anneal_h")
    @classmethod
    def _time(cls, v: Range) -> Range:
        if v.min < 0 or v.max > 168:
            raise ValueError(f"anneal time must lie in 0..168 h, got {v.min}..{v.max}")
        return v


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    goal: Literal["maximize", "minimize", "target"]
    property: str = "property"
    target: float | None = Field(None, description="the value to reach when goal is 'target'")

    @model_validator(mode="after")
    def _target(self) -> Objective:
        if self.goal == "target" and self.target is None:
            raise ValueError("goal 'target' needs objective.target")
        return self

    def utility(self, value: float) -> float:
        if self.goal == "maximize":
            return value
        if self.goal == "minimize":
            return -value
        assert self.target is not None
        return -abs(value - self.target)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int | None = Field(None, ge=1)
    hours: float | None = Field(None, gt=0)
    #: Grams of each element's powder available; needs ``sample_mass_g``.
    grams: dict[str, float] | None = None
    sample_mass_g: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _mass(self) -> Budget:
        if self.grams is not None:
            if self.sample_mass_g is None:
                raise ValueError("budget.grams needs budget.sample_mass_g")
            for el, g in self.grams.items():
                if g < 0:
                    raise ValueError(f"budget.grams.{el} must be >= 0, got {g}")
        return self


class Stopping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Stop once a sample reaches this value (in the objective's direction; for 'target' goals
    #: once it is within ``target_tolerance`` of objective.target).
    target_value: float | None = None
    target_tolerance: float | None = Field(None, ge=0)
    #: Stop when the best utility has not improved for this many completed batches.
    no_improvement_batches: int | None = Field(None, ge=1)


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["gp", "random", "grid"] = "gp"
    seed: int = 0
    #: Passed to the agent's config (for gp: fields of :class:`~protocols.optimizer.gp.GPConfig`).
    options: dict[str, Any] = Field(default_factory=dict)


class CampaignSpec(BaseModel):
    """A screening campaign, as written in YAML or JSON."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    elements: dict[str, ElementBounds] = Field(min_length=2)
    composition_step: float | None = Field(None, gt=0, le=0.5)
    pool: Path | None = None
    #: At most this many elements with a non-zero fraction (None: no limit).
    max_elements: int | None = Field(None, ge=1)
    process: Process | None = None
    objective: Objective
    batch_size: int = Field(4, ge=1, le=64)
    budget: Budget
    stopping: Stopping = Field(default_factory=Stopping)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)

    @field_validator("elements")
    @classmethod
    def _symbols(cls, v: dict[str, ElementBounds]) -> dict[str, ElementBounds]:
        for el in v:
            if not (el[:1].isupper() and el[1:].islower() and 1 <= len(el) <= 2):
                raise ValueError(f"{el!r} is not an element symbol")
        if sum(b.min for b in v.values()) > 1 + _EPS:
            raise ValueError("the elements' minimum fractions add up to more than 1")
        if sum(b.max for b in v.values()) < 1 - _EPS:
            raise ValueError("the elements' maximum fractions add up to less than 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CampaignSpec:
        if (self.composition_step is None) == (self.pool is None):
            raise ValueError("give exactly one of composition_step or pool")
        if self.composition_step is not None:
            n = 1 / self.composition_step
            if abs(n - round(n)) > 1e-6:
                raise ValueError(
                    f"composition_step {self.composition_step} must divide 1 (e.g. 0.05, 0.1)"
                )
        if self.budget.grams is not None:
            unknown = set(self.budget.grams) - set(self.elements)
            if unknown:
                raise ValueError(
                    f"budget.grams names elements not in the campaign: {sorted(unknown)}"
                )
            missing = [el for el in self.elements if el not in ATOMIC_MASS]
            if missing:
                raise ValueError(f"budget.grams: no atomic mass known for {missing}")
        if self.budget.samples is None and self.budget.hours is None:
            raise ValueError("budget needs samples or hours (a campaign must end)")
        if self.stopping.target_value is not None and self.objective.goal == "target":
            raise ValueError("goal 'target' stops on stopping.target_tolerance, not target_value")
        return self

    @property
    def element_list(self) -> list[str]:
        return list(self.elements)


# --- candidates -----------------------------------------------------------------------------
def read_pool(path: Path, elements: list[str]) -> np.ndarray:
    """Compositions of a pool CSV (ground-truth format; the last, property column is ignored)."""
    try:
        with Path(path).open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except OSError as exc:
        raise ValueError(f"pool: cannot read {path}: {exc}") from exc
    if len(rows) < 2:
        raise ValueError(f"pool: {path} needs a header and at least one row")
    header = [h.strip() for h in rows[0]][:-1]
    if sorted(header) != sorted(elements):
        raise ValueError(f"pool: {path} has element columns {header}, the campaign has {elements}")
    cols = [header.index(el) for el in elements]
    try:
        data = np.array([[float(r[c]) for c in cols] for r in rows[1:]])
    except (ValueError, IndexError) as exc:
        raise ValueError(f"pool: {path}: bad row: {exc}") from exc
    sums = data.sum(1)
    bad = np.flatnonzero(np.abs(sums - 1) > 0.02)
    if bad.size:
        raise ValueError(f"pool: {path}:{bad[0] + 2}: fractions sum to {sums[bad[0]]:.3f}")
    return data / sums[:, None]


def composition_grid(spec: CampaignSpec) -> np.ndarray:
    """All compositions on the step grid within the bounds (and ``max_elements``)."""
    assert spec.composition_step is not None
    n = round(1 / spec.composition_step)
    k = len(spec.elements)
    lo = [math.ceil(b.min * n - 1e-6) for b in spec.elements.values()]
    hi = [math.floor(b.max * n + 1e-6) for b in spec.elements.values()]
    out = []
    for bars in itertools.combinations(range(n + k - 1), k - 1):
        parts = np.diff([-1, *bars, n + k - 1]) - 1
        if all(lo[i] <= parts[i] <= hi[i] for i in range(k)) and (
            spec.max_elements is None or np.count_nonzero(parts) <= spec.max_elements
        ):
            out.append(parts / n)
    if not out:
        raise ValueError("no composition on the grid satisfies the element bounds")
    return np.array(out)


def build_space(spec: CampaignSpec) -> SearchSpace:
    els = spec.element_list
    if spec.pool is not None:
        comps = read_pool(spec.pool, els)
        lo = np.array([b.min for b in spec.elements.values()])
        hi = np.array([b.max for b in spec.elements.values()])
        ok = np.all((comps >= lo - _EPS) & (comps <= hi + _EPS), axis=1)
        if spec.max_elements is not None:
            ok &= np.count_nonzero(comps > _EPS, axis=1) <= spec.max_elements
        comps = comps[ok]
        if len(comps) == 0:
            raise ValueError("pool: no composition satisfies the element bounds")
    else:
        comps = composition_grid(spec)
    names = tuple(els)
    lower = upper = np.zeros(0)
    if spec.process is not None:
        t, h = spec.process.anneal_c.levels(), spec.process.anneal_h.levels()
        proc = np.array(list(itertools.product(t, h)))
        comps = np.hstack([np.repeat(comps, len(proc), axis=0), np.tile(proc, (len(comps), 1))])
        names = (*names, "anneal_c", "anneal_h")
        lower = np.array([spec.process.anneal_c.min, spec.process.anneal_h.min])
        upper = np.array([spec.process.anneal_c.max, spec.process.anneal_h.max])
    return SearchSpace(
        names=names, n_composition=len(els), candidates=comps, lower=lower, upper=upper
    )


def powder_grams(spec: CampaignSpec, composition: Mapping[str, float]) -> dict[str, float]:
    """Grams of each element's powder for one sample of ``budget.sample_mass_g``."""
    m = spec.budget.sample_mass_g or 0.0
    w = {el: composition.get(el, 0.0) * ATOMIC_MASS[el] for el in spec.elements}
    total = sum(w.values())
    return {el: m * v / total for el, v in w.items()}


# --- the campaign ---------------------------------------------------------------------------
class Campaign:
    """State machine of one campaign (see the module docstring for the conventions)."""

    def __init__(
        self,
        spec: CampaignSpec,
        clock: Callable[[], float] = time.time,
        space: SearchSpace | None = None,
    ) -> None:
        self.spec = spec
        self.space = space if space is not None else build_space(spec)
        self.agent: Agent = make_agent(
            spec.optimizer.kind, self.space, spec.optimizer.seed, spec.optimizer.options
        )
        self._clock = clock
        self.observations: list[dict[str, Any]] = []
        self.pending: dict[str, dict[str, Any]] = {}
        self.interrupted: list[dict[str, Any]] = []
        self.batches: list[list[str]] = []
        self.best_after_batch: list[float | None] = []
        self.grams_used: dict[str, float] = dict.fromkeys(spec.elements, 0.0)
        self.seconds_used = 0.0
        self._last_tick: float | None = None
        self._next_id = 1
        self.stopped: str | None = None

    # time ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        now = self._clock()
        if self._last_tick is not None:
            self.seconds_used += max(0.0, now - self._last_tick)
        self._last_tick = now

    def pause(self) -> None:
        """Stop counting hours (the daemon calls it on pause and on shutdown)."""
        self._tick()
        self._last_tick = None

    @property
    def hours_used(self) -> float:
        self._tick()
        return self.seconds_used / 3600

    # the loop -----------------------------------------------------------------------------
    def _point(self, composition: Mapping[str, float], process: Mapping[str, float]) -> np.ndarray:
        vals = [float(composition.get(el, 0.0)) for el in self.spec.elements]
        if self.spec.process is not None:
            vals += [float(process["anneal_c"]), float(process["anneal_h"])]
        return np.array(vals)

    def _describe(self, x: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        k = len(self.spec.elements)
        comp = {el: round(float(v), 6) for el, v in zip(self.spec.elements, x[:k], strict=True)}
        proc = {}
        if self.spec.process is not None:
            proc = {"anneal_c": float(x[k]), "anneal_h": float(x[k + 1])}
        return comp, proc

    def _grams_left(self) -> dict[str, float] | None:
        g = self.spec.budget.grams
        if g is None:
            return None
        return {el: g[el] - self.grams_used[el] for el in g}

    def samples_left(self) -> int | None:
        s = self.spec.budget.samples
        return None if s is None else s - len(self.observations) - len(self.pending)

    def next_batch(self) -> list[dict[str, Any]]:
        """The next furnace load: planned samples, now pending. Empty when the campaign must stop.

        Each planned sample is ``{"sample_id", "composition": {el: fraction}, "process":
        {"anneal_c", "anneal_h"} or {}, "grams": {el: g} or None, "suggestion": {...}}``.
        Plain synchronous and possibly slow (optimiser refit): run it in an executor.
        """
        if self.should_stop() is not None:
            return []
        q = self.spec.batch_size
        left = self.samples_left()
        if left is not None:
            q = min(q, left)
        if q <= 0:
            return []
        grams_left = self._grams_left()
        planned: list[dict[str, Any]] = []
        # Ask for more when powder may rule some suggestions out; refused ones stay excluded
        # from this ask only (they are released again below).
        refused: list[np.ndarray] = []
        while len(planned) < q:
            sugg = self.agent.ask(q - len(planned))
            if not sugg:
                break
            for s in sugg:
                comp, proc = self._describe(s.x)
                grams = powder_grams(self.spec, comp) if grams_left is not None else None
                if (
                    grams is not None
                    and grams_left is not None
                    and any(grams[el] > grams_left[el] + 1e-12 for el in grams_left)
                ):
                    refused.append(s.x)
                    continue
                if grams is not None and grams_left is not None:
                    for el in grams_left:
                        grams_left[el] -= grams[el]
                sid = f"{self.spec.name}-{self._next_id:04d}"
                self._next_id += 1
                item = {
                    "sample_id": sid,
                    "composition": comp,
                    "process": proc,
                    "grams": grams,
                    "suggestion": s.doc,
                }
                self.pending[sid] = item
                planned.append(item)
        for x in refused:
            self.agent.drop_pending(x)
        if planned:
            self.batches.append([p["sample_id"] for p in planned])
        self._tick()
        return planned

    def record(
        self,
        sample_id: str,
        value: float,
        measured_composition: Mapping[str, float] | None = None,
    ) -> None:
        """A pending sample's measured property; its powder is spent."""
        item = self._take_pending(sample_id)
        if not math.isfinite(value):
            self.pending[sample_id] = item
            raise ValueError(f"record {sample_id}: value must be finite, got {value}")
        x = self._point(item["composition"], item["process"])
        obs = {**item, "value": float(value), "utility": self.spec.objective.utility(value)}
        if measured_composition is not None:
            obs["measured_composition"] = dict(measured_composition)
        self._spend(item)
        self.observations.append(obs)
        self.agent.tell(x, obs["utility"])
        self._close_batches()
        self._tick()

    def mark_interrupted(self, sample_id: str, reason: str = "interrupted") -> None:
        """A pending sample that will never be measured (e.g. the daemon died while making it)."""
        item = self._take_pending(sample_id)
        self._spend(item)
        self.interrupted.append({**item, "reason": reason})
        self.agent.drop_pending(self._point(item["composition"], item["process"]))
        self._close_batches()
        self._tick()

    def _take_pending(self, sample_id: str) -> dict[str, Any]:
        try:
            return self.pending.pop(sample_id)
        except KeyError:
            done = {o["sample_id"] for o in self.observations} | {
                o["sample_id"] for o in self.interrupted
            }
            state = "already recorded" if sample_id in done else "unknown"
            raise KeyError(f"sample {sample_id} is not pending ({state})") from None

    def _spend(self, item: Mapping[str, Any]) -> None:
        if item.get("grams"):
            for el, g in item["grams"].items():
                self.grams_used[el] += g

    def _close_batches(self) -> None:
        """After each batch whose samples are all done, note the best utility so far."""
        while len(self.best_after_batch) < len(self.batches):
            ids = self.batches[len(self.best_after_batch)]
            if any(i in self.pending for i in ids):
                return
            b = self.best()
            self.best_after_batch.append(None if b is None else b["utility"])

    # stopping -----------------------------------------------------------------------------
    def should_stop(self) -> str | None:
        """Why the campaign must not start another batch, or None."""
        if self.stopped:
            return self.stopped
        st, bud, obj = self.spec.stopping, self.spec.budget, self.spec.objective
        best = self.best()
        if best is not None:
            v = best["value"]
            if st.target_value is not None and (
                (obj.goal == "maximize" and v >= st.target_value)
                or (obj.goal == "minimize" and v <= st.target_value)
            ):
                return f"target reached: {v:g}"
            if (
                obj.goal == "target"
                and st.target_tolerance is not None
                and obj.target is not None
                and abs(v - obj.target) <= st.target_tolerance
            ):
                return f"target reached: {v:g}"
        k = st.no_improvement_batches
        hist = self.best_after_batch
        if (
            k is not None
            and len(hist) > k
            and hist[-k - 1] is not None
            and all(h is not None and h <= hist[-k - 1] for h in hist[-k:])
        ):
            return f"no improvement in {k} batches"
        if bud.samples is not None and len(self.observations) >= bud.samples:
            return f"sample budget spent: {len(self.observations)} of {bud.samples}"
        if bud.hours is not None and self.hours_used >= bud.hours:
            return f"time budget spent: {self.hours_used:.2f} h of {bud.hours:g} h"
        left = self._grams_left()
        if left is not None and not self._any_affordable(left):
            return "powder budget spent: no candidate composition fits the powder left"
        if self.agent.available().size == 0:
            return "no candidate left"
        return None

    def _any_affordable(self, left: Mapping[str, float]) -> bool:
        avail = self.agent.available()
        k = len(self.spec.elements)
        comps = self.space.candidates[avail, :k]
        masses = np.array([ATOMIC_MASS[el] for el in self.spec.elements])
        w = comps * masses
        grams = (self.spec.budget.sample_mass_g or 0.0) * w / w.sum(1, keepdims=True)
        cap = np.array([left.get(el, math.inf) for el in self.spec.elements])
        return bool(np.any(np.all(grams <= cap + 1e-12, axis=1)))

    def stop(self, reason: str = "stopped by user") -> None:
        self.stopped = reason

    def best(self) -> dict[str, Any] | None:
        if not self.observations:
            return None
        return max(self.observations, key=lambda o: o["utility"])

    def status(self) -> dict[str, Any]:
        best = self.best()
        return {
            "name": self.spec.name,
            "samples_made": len(self.observations),
            "pending": len(self.pending),
            "interrupted": len(self.interrupted),
            "samples_left": self.samples_left(),
            "hours_used": self.hours_used,
            "grams_left": self._grams_left(),
            "best": None
            if best is None
            else {k: best[k] for k in ("sample_id", "composition", "process", "value")},
            "stop_reason": self.should_stop(),
            "optimizer": self.agent.report(),
        }

    # durability ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._tick()
        return {
            "version": 1,
            "spec": self.spec.model_dump(mode="json"),
            "observations": self.observations,
            "pending": list(self.pending.values()),
            "interrupted": self.interrupted,
            "batches": self.batches,
            "best_after_batch": self.best_after_batch,
            "grams_used": self.grams_used,
            "seconds_used": self.seconds_used,
            "next_id": self._next_id,
            "stopped": self.stopped,
            "model_state": self.agent.model_state(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], clock: Callable[[], float] = time.time) -> Campaign:
        """Rebuild from :meth:`to_dict`: the optimiser is told every stored observation again."""
        if data.get("version") != 1:
            raise ValueError(f"campaign state version {data.get('version')!r} is not supported")
        c = cls(CampaignSpec.model_validate(data["spec"]), clock=clock)
        c.agent.load_model_state(data.get("model_state") or {})
        c.observations = [dict(o) for o in data["observations"]]
        c.interrupted = [dict(o) for o in data["interrupted"]]
        c.pending = {p["sample_id"]: dict(p) for p in data["pending"]}
        c.batches = [list(b) for b in data["batches"]]
        c.best_after_batch = list(data["best_after_batch"])
        c.grams_used = {el: float(data["grams_used"].get(el, 0.0)) for el in c.spec.elements}
        c.seconds_used = float(data["seconds_used"])
        c._next_id = int(data["next_id"])
        c.stopped = data.get("stopped")
        if c.observations:
            xs = [c._point(o["composition"], o["process"]) for o in c.observations]
            c.agent.tell_many(xs, [o["utility"] for o in c.observations])
        for p in c.pending.values():
            c.agent.add_pending(c._point(p["composition"], p["process"]))
        return c
