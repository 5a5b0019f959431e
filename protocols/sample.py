"""Make samples: the ``make_sample`` protocol and the furnace-load procedure it shares with
``make_batch``.

One crucible's path through the cell::

    rack slot -> balance (tare: the empty crucible; a slot without one is refused here, before
    any powder moves) -> doser (one dose per element, each checked against the doser's own
    report) -> balance (net weight = powder total, checked against the sum of the doses)
    -> furnace slot

then, for the whole load, one furnace program (ramp at the rate, dwell, step down), waited for on
the controller's run mode, and cooling to ``unload_below_c`` (waited for on the PV), then per
crucible::

    furnace slot -> balance (post-anneal weight) -> station (XRF + property) -> its rack slot

Why the dose check is the doser's report plus one total weighing, not a weighing per dose: the
Quantos doses onto its own load cell and reports each delivered mass (that is the per-element
check, with the ``dose_tolerance_pct``); the separate balance then weighs the total once and must
agree with the sum within ``weigh_tolerance_mg``. A spill or a mis-reported dose shows up there
before the furnace. Weighing after every dose would cost two gantry trips per element and add
nothing the doser's load cell does not already measure.

Why the crucible is unloaded cold: the anneal is defined by the program; a crucible taken out at
800 °C is quenched in the glovebox atmosphere (a different heat treatment, and too hot for the
gripper, the balance and the XRF window). The program steps the setpoint down after the dwell,
the furnace cools freely, and the crucibles come out below ``unload_below_c`` (default 100 °C;
set it high to unload hot on purpose). The heater is switched off (standby) at the end of every
heat treatment, and on any failure.

Parallelism (one gantry, one gripper): while the station measures crucible *k*, the gantry takes
crucible *k+1* from the furnace to the balance and weighs it; only then does the plan wait for
the measurement of *k*, put *k* back in its rack slot and bring *k+1* to the station.

The record follows :mod:`labd.samples`: the start document carries ``protocol``, ``campaign``,
``sample_id`` (one-sample runs), ``property_name`` and ``property_unit``; each crucible gives one
event in stream ``sample`` with ``sample_id``, ``target_<El>``, ``measured_<El>``,
``dosed_mg_<El>``, ``anneal_c``, ``anneal_s``, ``property_value`` and, as extras,
``crucible_g`` (empty crucible), ``weighed_mg`` (powder on the balance), ``post_anneal_g``,
``rack_slot``, ``furnace_slot`` and ``crucible`` (the station's crucible id). Device readings go
to their own streams: ``balance``, ``doser``, ``furnace`` (PV during the program and cooling),
``furnace_segment``, ``station``.

Pause, suspend, resume: the run is not rewindable, every world-changing step runs to its end
whatever interrupts the plan, and a deferred pause lands at the safe points: after a crucible
is placed, after each dose is recorded and checked, after the weighings, during the furnace
waits and after each sample event (see :mod:`protocols.stubs` for the RunEngine's semantics and
what each step does on a deferred pause, an immediate pause and a suspension).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import bluesky.preprocessors as bpp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .composition import check_composition, dose_masses
from .layout import CellLayout
from .registry import Devices, Plan, ProtocolError, protocol
from .stubs import (
    Record,
    SampleFailed,
    anneal_program,
    call,
    devices_of,
    dose,
    ensure_homed,
    heat_treatment,
    layout_of,
    move_crucible,
    reading,
    safe_point,
    step,
    tare,
    weigh,
    why,
)

SAMPLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
log = logging.getLogger(__name__)
NEEDS = ("gantry", "doser", "balance", "furnace", "station")


def _unit(unit: str, **extra: Any) -> dict[str, Any]:
    return {"unit": unit, **extra}


class ProcessParams(BaseModel):
    """Parameters of the process: powder mass, dosing checks, heat treatment."""

    model_config = ConfigDict(extra="forbid")

    total_mg: float | None = Field(
        default=None, ge=10.0, le=5000.0,
        description="Total powder mass of a sample, mg (default: the cell's).",
        json_schema_extra=_unit("mg"))
    anneal_c: float = Field(
        default=800.0, ge=100.0, le=1100.0,
        description="Annealing temperature, degC.", json_schema_extra=_unit("degC"))
    anneal_s: float = Field(
        default=3600.0, ge=60.0, le=65535.0,
        description="Time at the annealing temperature (the program's dwell), s.",
        json_schema_extra=_unit("s"))
    ramp_c_min: float = Field(
        default=10.0, gt=0.0, le=600.0,
        description="Heating rate to the annealing temperature, degC/min.",
        json_schema_extra=_unit("degC/min"))
    unload_below_c: float = Field(
        default=100.0, ge=40.0, le=1100.0,
        description="The crucibles leave the furnace when it has cooled below this, degC.",
        json_schema_extra=_unit("degC"))
    dose_tolerance_pct: float = Field(
        default=5.0, gt=0.0, le=50.0,
        description="Largest deviation of a dose from its target, % of the target.",
        json_schema_extra=_unit("%"))
    weigh_tolerance_mg: float = Field(
        default=2.0, gt=0.0, le=100.0,
        description="Largest difference between the balance's powder weight and the sum of the "
                    "doses, mg.", json_schema_extra=_unit("mg"))
    campaign: str | None = Field(default=None, max_length=128,
                                 description="Campaign this run belongs to (recorded).")


def _composition(value: Mapping[str, float]) -> dict[str, float]:
    return check_composition({str(k): float(v) for k, v in value.items()})


class MakeSampleParams(ProcessParams):
    """Make one sample of a given composition."""

    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN,
                           description="Unique id of the sample (letters, digits, . _ : -).")
    composition: dict[str, float] = Field(
        description="Target composition: atomic fraction per element (e.g. {'Fe': 0.5, "
                    "'Ni': 0.5}), each 0..1, summing to 1.",
        json_schema_extra=_unit("at. fraction"))
    rack_slot: str = Field(default="rack/1", description="Rack slot of the empty crucible.")
    furnace_slot: str = Field(default="furnace/1", description="Furnace slot to anneal in.")

    _check_composition = field_validator("composition")(_composition)


@dataclass(frozen=True)
class SampleSpec:
    """One crucible of a furnace load."""

    sample_id: str
    composition: dict[str, float]
    rack_slot: str
    furnace_slot: str


def _field_error(protocol_name: str, field: str, message: str) -> ProtocolError:
    return ProtocolError(f"{protocol_name}: invalid parameters: {field}: {message}",
                         [{"field": field, "message": message, "input": None}])


def check_load(protocol_name: str, layout: CellLayout, specs: Sequence[SampleSpec],
               total_mg: float, doser: Any, prefix: str = "") -> dict[str, dict[str, float]]:
    """What the parameter models cannot know: elements with a head, slots of this cell, distinct
    crucibles, doses the doser can do. Returns the target doses (mg) per sample id.
    Raises :class:`ProtocolError` naming the field, before anything moves."""
    if len(specs) > len(layout.furnace_slots):
        raise _field_error(protocol_name, f"{prefix}samples",
                           f"{len(specs)} samples, but the furnace has "
                           f"{len(layout.furnace_slots)} slots")
    seen: dict[str, set[str]] = {"sample_id": set(), "rack_slot": set(), "furnace_slot": set()}
    doses: dict[str, dict[str, float]] = {}
    max_mg = getattr(getattr(doser, "client", None), "settings", None)
    max_dose = float(getattr(max_mg, "max_dose_mg", math.inf))
    for i, spec in enumerate(specs):
        where = f"{prefix}samples.{i}." if len(specs) > 1 or prefix else ""
        for key in seen:
            value = getattr(spec, key)
            if value in seen[key]:
                raise _field_error(protocol_name, where + key, f"{value!r} is used twice")
            seen[key].add(value)
        for key, kind in (("rack_slot", "rack"), ("furnace_slot", "furnace")):
            try:
                layout.check_slot(getattr(spec, key), kind)  # type: ignore[arg-type]
            except ValueError as exc:
                raise _field_error(protocol_name, where + key, str(exc)) from None
        no_head = [el for el, x in spec.composition.items() if x > 0 and el not in layout.heads]
        if no_head:
            raise _field_error(protocol_name, where + "composition",
                               f"no doser head holds {', '.join(no_head)} (this cell doses "
                               f"{', '.join(layout.elements)})")
        masses = dose_masses(spec.composition, total_mg)
        for el, mg in masses.items():
            if 0 < mg < layout.min_dose_mg or mg > max_dose:
                raise _field_error(protocol_name, where + "composition",
                                   f"{el} needs {mg:.3g} mg, outside the doser's "
                                   f"{layout.min_dose_mg:g}..{max_dose:g} mg per dose "
                                   f"(change the fraction or total_mg)")
        doses[spec.sample_id] = {el: mg for el, mg in masses.items() if mg > 0}
    return doses


@dataclass
class _Made:
    spec: SampleSpec
    crucible_g: float
    dosed_mg: dict[str, float]
    weighed_mg: float
    post_anneal_g: float = math.nan


def load_plan(devices: Devices, protocol_name: str, specs: Sequence[SampleSpec],
              process: ProcessParams, md: Mapping[str, Any] | None = None,
              prefix: str = "") -> Plan:
    """One run that makes a furnace load of ``specs`` (see the module docstring).

    Checks everything it can before returning the plan: a :class:`ProtocolError` here means
    nothing moved."""
    gantry, doser, balance, furnace, station = devices_of(devices, *NEEDS)
    layout = layout_of(devices)
    total_mg = process.total_mg or layout.default_total_mg
    doses = check_load(protocol_name, layout, specs, total_mg, doser, prefix)
    elements = layout.elements
    measured_els = [el for el, _ in station.composition.children()]
    keys: dict[str, type] = {"sample_id": str}
    units: dict[str, str | None] = {}
    for el in elements:
        keys[f"target_{el}"] = float
        units[f"target_{el}"] = "at. fraction"
    for el in measured_els:
        keys[f"measured_{el}"] = float
        units[f"measured_{el}"] = "at. fraction"
    for el in elements:
        keys[f"dosed_mg_{el}"] = float
        units[f"dosed_mg_{el}"] = "mg"
    keys.update(anneal_c=float, anneal_s=float, property_value=float, crucible_g=float,
                weighed_mg=float, post_anneal_g=float, rack_slot=str, furnace_slot=str,
                crucible=str)
    units.update(anneal_c="degC", anneal_s="s", property_value=layout.property_unit,
                 crucible_g="g", weighed_mg="mg", post_anneal_g="g")
    record = Record("sample", keys, source=f"protocol:{protocol_name}", units=units)
    program = anneal_program(process.anneal_c, process.anneal_s, process.ramp_c_min,
                             furnace.client.settings.safe_setpoint_c)
    tol = process.dose_tolerance_pct / 100.0

    start_md: dict[str, Any] = {
        "protocol": protocol_name,
        "samples": [s.sample_id for s in specs],
        "anneal_c": process.anneal_c, "anneal_s": process.anneal_s,
        "ramp_c_min": process.ramp_c_min, "total_mg": total_mg,
        "program": program.model_dump(mode="json"),
    }
    if process.campaign:
        start_md["campaign"] = process.campaign
    if layout.property_name:
        start_md["property_name"] = layout.property_name
    if layout.property_unit:
        start_md["property_unit"] = layout.property_unit
    start_md.update(md or {})

    def prepare(spec: SampleSpec) -> Plan:
        sid = spec.sample_id
        yield from move_crucible(gantry, layout, spec.rack_slot, layout.balance)
        crucible_g = yield from tare(balance)
        if crucible_g < layout.min_crucible_g:
            raise SampleFailed(
                f"{sid}: rack slot {spec.rack_slot} holds no crucible: the balance reads "
                f"{crucible_g:.4f} g for what the gripper brought (an empty crucible weighs at "
                f"least {layout.min_crucible_g:g} g); nothing was dosed")
        yield from move_crucible(gantry, layout, layout.balance, layout.doser)
        yield from safe_point()  # the empty crucible weighed, at the doser
        dosed: dict[str, float] = dict.fromkeys(elements, 0.0)
        for el, mg in doses[sid].items():
            head = layout.heads[el]
            try:
                got = yield from dose(doser, head, mg, element=el)
            except SampleFailed:
                raise  # a wrong head: nothing dosed with it
            except Exception as exc:
                so_far = _holding(dosed)
                raise SampleFailed(
                    f"{sid}: dosing {mg:.2f} mg of {el} (head {head}) failed: {why(exc)}. "
                    f"The crucible from {spec.rack_slot} is at the doser holding {so_far} "
                    f"before this dose: discard it or dose it by hand") from exc
            dosed[el] = got
            if abs(got - mg) > tol * mg:
                raise SampleFailed(
                    f"{sid}: the doser delivered {got:.3f} mg of {el} for a target of "
                    f"{mg:.3f} mg (more than {process.dose_tolerance_pct:g} % off). The "
                    f"crucible from {spec.rack_slot} is at the doser")
            yield from safe_point()  # this dose is done, recorded and checked
        yield from move_crucible(gantry, layout, layout.doser, layout.balance)
        weighed_mg = (yield from weigh(balance)) * 1000.0
        total = sum(dosed.values())
        if abs(weighed_mg - total) > process.weigh_tolerance_mg:
            raise SampleFailed(
                f"{sid}: the balance weighs {weighed_mg:.2f} mg of powder but the doser "
                f"reports {total:.2f} mg dosed (tolerance {process.weigh_tolerance_mg:g} mg): "
                f"powder spilled or a dose was mis-reported. The crucible is on the balance")
        yield from safe_point()
        yield from move_crucible(gantry, layout, layout.balance, spec.furnace_slot)
        return _Made(spec, crucible_g, dosed, weighed_mg)

    def emit(made: _Made, reading: Mapping[str, Any]) -> Plan:
        spec = made.spec
        values: dict[str, Any] = {"sample_id": spec.sample_id}
        for el in elements:
            values[f"target_{el}"] = spec.composition.get(el, 0.0)
            values[f"dosed_mg_{el}"] = made.dosed_mg.get(el, 0.0)
        for el, sig in station.composition.children():
            values[f"measured_{el}"] = reading[sig.name]["value"]
        values.update(
            anneal_c=process.anneal_c, anneal_s=process.anneal_s,
            property_value=reading[station.property_value.name]["value"],
            crucible_g=made.crucible_g, weighed_mg=made.weighed_mg,
            post_anneal_g=made.post_anneal_g, rack_slot=spec.rack_slot,
            furnace_slot=spec.furnace_slot, crucible=reading[station.crucible.name]["value"])
        yield from record.emit(**values)

    def analyse(made: list[_Made]) -> Plan:
        # The pan is empty now: a zero tare makes the post-anneal weights gross weights.
        yield from tare(balance)
        pending: tuple[_Made, asyncio.Future[None]] | None = None

        def finish(item: _Made, measuring: asyncio.Future[None]) -> Plan:
            try:
                yield from step(lambda: measuring)  # started once, awaited across a pause
            except Exception as exc:
                raise SampleFailed(f"{item.spec.sample_id}: the station measurement failed: "
                                   f"{why(exc)}. The crucible is at the station") from exc
            values = yield from reading(station, "station", trigger=False)
            yield from emit(item, values)
            yield from safe_point()
            yield from move_crucible(gantry, layout, layout.station, item.spec.rack_slot)

        async def measure(sample_id: str) -> asyncio.Future[None]:
            """Start the station's measurement; the plan awaits it later (see finish)."""
            await station.sample_id.set(sample_id)
            return asyncio.ensure_future(_awaited(station.trigger()))

        for item in made:
            yield from move_crucible(gantry, layout, item.spec.furnace_slot, layout.balance)
            item.post_anneal_g = yield from weigh(balance)
            yield from safe_point()
            if pending is not None:  # the station measured it meanwhile
                yield from finish(*pending)
            yield from move_crucible(gantry, layout, layout.balance, layout.station)
            sid = item.spec.sample_id
            measuring = yield from step(lambda sid=sid: measure(sid), f"starting {sid}'s "
                                        "measurement")
            pending = (item, measuring)
        if pending is not None:
            yield from finish(*pending)

    def body() -> Plan:
        yield from ensure_homed(gantry)
        made: list[_Made] = []
        for spec in specs:
            made.append((yield from prepare(spec)))
        yield from heat_treatment(furnace, program, unload_below_c=process.unload_below_c)
        yield from analyse(made)

    def on_failure(exc: BaseException) -> Plan:
        # The furnace is off already if the heat treatment failed (its finaliser); make sure of
        # it whatever failed, and stop the doser. The gantry is left where it stopped: a reset
        # would drop a carried crucible (the RunEngine has stopped its motion).
        for dev in (furnace, doser):
            try:
                yield from call(dev.safe_state)
            except Exception as safe_exc:  # report the original failure, log this one
                log.error("%s: safe state failed: %s", dev.name,
                                                  safe_exc)

    plan = bpp.contingency_wrapper(body(), except_plan=on_failure)
    # Not rewindable: a resume goes on from where the plan was, never replays (module docstring).
    return bpp.run_wrapper(bpp.rewindable_wrapper(plan, False), md=start_md)


async def _awaited(status: Any) -> None:
    await status


def _holding(dosed: Mapping[str, float]) -> str:
    parts = [f"{el} {mg:.2f} mg" for el, mg in dosed.items() if mg > 0]
    return ", ".join(parts) if parts else "nothing"


@protocol("make_sample", MakeSampleParams, title="Make one sample",
          needs=NEEDS, tags=("sample", "technician", "campaign"))
def make_sample(devices: Devices, params: MakeSampleParams) -> Plan:
    """Dose a crucible to a target composition, anneal it with a furnace program, measure its
    composition (XRF) and property, and record it (one ``sample`` event)."""
    spec = SampleSpec(params.sample_id, dict(params.composition), params.rack_slot,
                      params.furnace_slot)
    process = ProcessParams.model_validate(
        params.model_dump(include=set(ProcessParams.model_fields)))
    return load_plan(devices, "make_sample", [spec], process, {"sample_id": params.sample_id})
