"""Technician protocols: home the gantry, check the balance against a reference mass, bake out
the furnace, make a list of compositions from a CSV file, make one sample from a formula."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .batch import BatchSample, assign_slots
from .composition import check_composition, parse_formula
from .registry import Devices, Plan, ProtocolError, protocol
from .sample import (
    NEEDS,
    SAMPLE_ID_PATTERN,
    MakeSampleParams,
    ProcessParams,
    SampleSpec,
    load_plan,
    make_sample,
)
from .stubs import (
    Record,
    SampleFailed,
    anneal_program,
    call,
    devices_of,
    heat_treatment,
    layout_of,
)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@protocol("home_gantry", NoParams, title="Home the gantry", needs=("gantry",),
          tags=("technician",))
def home_gantry(devices: Devices, params: NoParams) -> Plan:
    """Run the gantry's homing cycle ($H) and record where it ends (machine zero)."""
    (gantry,) = devices_of(devices, "gantry")

    def plan() -> Plan:
        yield from call(gantry.client.home)
        yield from bps.trigger_and_read([gantry])

    return bpp.run_wrapper(plan(), md={"protocol": "home_gantry"})


# -- balance check -------------------------------------------------------------------------------
class BalanceCheckFailed(SampleFailed):
    """The balance reads the reference mass outside the tolerance."""


class CheckBalanceParams(BaseModel):
    """The technician has put the reference mass on the (otherwise empty) pan."""

    model_config = ConfigDict(extra="forbid")

    reference_g: float = Field(gt=0.0, le=200.0,
                               description="Certified value of the reference mass, g.",
                               json_schema_extra={"unit": "g"})
    tolerance_mg: float = Field(default=0.5, gt=0.0, le=1000.0,
                                description="Largest accepted deviation of the mean reading, mg.",
                                json_schema_extra={"unit": "mg"})
    readings: int = Field(default=3, ge=1, le=20,
                          description="Number of stable weighings averaged.")


@protocol("check_balance", CheckBalanceParams, title="Check the balance against a reference mass",
          needs=("balance",), tags=("technician",))
def check_balance(devices: Devices, params: CheckBalanceParams) -> Plan:
    """Weigh the reference mass ``readings`` times (stable weights) and compare the mean gross
    weight (net + the tare in effect) with the certified value. The result is the ``check``
    event; out of tolerance, the run fails with a message giving both values."""
    (balance,) = devices_of(devices, "balance")
    record = Record("check", {"reference_g": float, "mean_g": float, "deviation_mg": float,
                              "tolerance_mg": float, "passed": bool},
                    source="protocol:check_balance",
                    units={"reference_g": "g", "mean_g": "g", "deviation_mg": "mg",
                           "tolerance_mg": "mg"})

    def plan() -> Plan:
        grams: list[float] = []
        for _ in range(params.readings):
            r = yield from bps.trigger_and_read([balance])
            grams.append(float(r[balance.weight.name]["value"]))
        tare_g = float((yield from bps.rd(balance.tare_weight)))
        mean = sum(grams) / len(grams) + tare_g
        dev_mg = (mean - params.reference_g) * 1000.0
        passed = abs(dev_mg) <= params.tolerance_mg
        yield from record.emit(reference_g=params.reference_g, mean_g=mean, deviation_mg=dev_mg,
                               tolerance_mg=params.tolerance_mg, passed=passed)
        if not passed:
            raise BalanceCheckFailed(
                f"balance check failed: the balance reads {mean:.4f} g for the "
                f"{params.reference_g:g} g reference ({dev_mg:+.2f} mg, tolerance "
                f"±{params.tolerance_mg:g} mg): calibrate the balance before weighing samples")

    md = {"protocol": "check_balance", "reference_g": params.reference_g,
          "tolerance_mg": params.tolerance_mg}
    return bpp.run_wrapper(plan(), md=md)


# -- furnace bake-out ----------------------------------------------------------------------------
class BakeoutParams(BaseModel):
    """Bake the empty furnace out (drive off moisture and residues)."""

    model_config = ConfigDict(extra="forbid")

    temperature_c: float = Field(default=900.0, ge=100.0, le=1100.0,
                                 description="Bake-out temperature, degC.",
                                 json_schema_extra={"unit": "degC"})
    hold_s: float = Field(default=3600.0, ge=60.0, le=65535.0,
                          description="Time at temperature, s.", json_schema_extra={"unit": "s"})
    ramp_c_min: float = Field(default=10.0, gt=0.0, le=600.0,
                              description="Heating rate, degC/min.",
                              json_schema_extra={"unit": "degC/min"})


@protocol("furnace_bakeout", BakeoutParams, title="Furnace bake-out", needs=("furnace",),
          tags=("technician",))
def furnace_bakeout(devices: Devices, params: BakeoutParams) -> Plan:
    """Ramp the empty furnace to the bake-out temperature, hold it, and switch the heater off
    (as a furnace program, waited for on the controller's run mode). The temperature followed
    is in the ``furnace`` stream."""
    (furnace,) = devices_of(devices, "furnace")
    program = anneal_program(params.temperature_c, params.hold_s, params.ramp_c_min,
                             furnace.client.settings.safe_setpoint_c)
    md = {"protocol": "furnace_bakeout", "temperature_c": params.temperature_c,
          "hold_s": params.hold_s, "ramp_c_min": params.ramp_c_min,
          "program": program.model_dump(mode="json")}
    return bpp.run_wrapper(heat_treatment(furnace, program), md=md)


# -- one sample from a formula -------------------------------------------------------------------
class MakeByHandParams(ProcessParams):
    """One sample, composition typed as a formula (form-friendly)."""

    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN, description="Unique id of the sample.")
    formula: str = Field(min_length=1, max_length=200,
                         description="Composition as proportions: 'Fe25Co25Ni50', "
                                     "'Fe0.5 Ni0.5' or 'FeNi' (normalised to fractions).")
    rack_slot: str = Field(default="rack/1", description="Rack slot of the empty crucible.")
    furnace_slot: str = Field(default="furnace/1", description="Furnace slot to anneal in.")

    @field_validator("formula")
    @classmethod
    def _formula(cls, value: str) -> str:
        parse_formula(value)
        return value


@protocol("make_sample_by_hand", MakeByHandParams, title="Make one sample (formula)",
          needs=NEEDS, tags=("sample", "technician"))
def make_sample_by_hand(devices: Devices, params: MakeByHandParams) -> Plan:
    """``make_sample`` with the composition given as a formula (e.g. ``Fe25Co25Ni50``)."""
    data = params.model_dump(exclude={"formula"})
    data["composition"] = parse_formula(params.formula)
    return make_sample(devices, MakeSampleParams.model_validate(data))


# -- compositions from a CSV file ----------------------------------------------------------------
class MakeFromCsvParams(ProcessParams):
    """Make every composition of a CSV file: a header row of element symbols (and optionally
    ``sample_id``), one row of atomic fractions per sample."""

    csv_path: Path | None = Field(default=None, description="Path of the CSV file on the cell's "
                                                            "computer.")
    csv_text: str | None = Field(default=None, max_length=1_000_000,
                                 description="The CSV itself (instead of csv_path).")
    id_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,40}$",
                                  description="Prefix of generated sample ids for rows without "
                                              "one (default: CSV-<date-time>).")
    load_size: int = Field(default=1, ge=1, le=25,
                           description="Samples per furnace load (1: one by one).")
    rack_slots: list[str] | None = Field(default=None,
                                         description="Rack slots to use, in order (default: all, "
                                                     "from the first).")
    _rows: list[BatchSample] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _read_csv(self) -> MakeFromCsvParams:
        if (self.csv_path is None) == (self.csv_text is None):
            raise ValueError("give exactly one of csv_path and csv_text")
        if self.csv_path is not None:
            try:
                text = self.csv_path.read_text(encoding="utf-8-sig")
            except OSError as exc:
                raise ValueError(f"csv_path: cannot read {self.csv_path}: "
                                 f"{exc.strerror}") from None
        else:
            text = self.csv_text or ""
        self._rows = parse_csv(text, self.id_prefix or time.strftime("CSV-%Y%m%d-%H%M%S"))
        return self

    @property
    def rows(self) -> list[BatchSample]:
        return list(self._rows)


def parse_csv(text: str, id_prefix: str) -> list[BatchSample]:
    """Rows of the CSV as samples; ValueError naming the line and column of a bad cell."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise ValueError("the CSV is empty: the first row must name the elements")
    header = [h.strip() for h in header]
    id_col = header.index("sample_id") if "sample_id" in header else None
    elements = [(i, h) for i, h in enumerate(header) if i != id_col]
    if not elements:
        raise ValueError("the CSV header names no element")
    rows: list[BatchSample] = []
    for line, raw in enumerate(reader, start=2):
        if not any(c.strip() for c in raw):
            continue
        if len(raw) != len(header):
            raise ValueError(f"CSV line {line}: {len(raw)} cells, the header has {len(header)}")
        comp: dict[str, float] = {}
        for i, el in elements:
            cell = raw[i].strip()
            try:
                comp[el] = float(cell) if cell else 0.0
            except ValueError:
                raise ValueError(f"CSV line {line}, column {el}: {cell!r} is not a "
                                 "number") from None
            if not math.isfinite(comp[el]):
                raise ValueError(f"CSV line {line}, column {el}: {cell!r} is not finite")
        try:
            comp = check_composition(comp)
        except ValueError as exc:
            raise ValueError(f"CSV line {line}: {exc}") from None
        sid = raw[id_col].strip() if id_col is not None else ""
        try:
            rows.append(BatchSample(sample_id=sid or f"{id_prefix}-{len(rows) + 1:03d}",
                                    composition=comp))
        except ValueError as exc:
            raise ValueError(f"CSV line {line}: {exc}") from None
    if not rows:
        raise ValueError("the CSV has a header but no composition row")
    ids = [r.sample_id for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"sample ids used twice in the CSV: {dup}")
    return rows


@protocol("make_from_csv", MakeFromCsvParams, title="Make the compositions of a CSV file",
          needs=NEEDS, tags=("sample", "technician"))
def make_from_csv(devices: Devices, params: MakeFromCsvParams) -> Plan:
    """Make the samples of the CSV in order, ``load_size`` per furnace load (one run per load).
    Every load is checked before the first moves."""
    layout = layout_of(devices)
    rows = params.rows
    slots = params.rack_slots if params.rack_slots is not None else layout.rack_slots
    if len(rows) > len(slots):
        message = (f"the CSV has {len(rows)} samples but only {len(slots)} rack slots are "
                   "given (one crucible per sample)")
        raise ProtocolError(f"make_from_csv: invalid parameters: rack_slots: {message}",
                            [{"field": "rack_slots", "message": message, "input": slots}])
    samples = [r.model_copy(update={"rack_slot": slots[i]}) for i, r in enumerate(rows)]
    process = ProcessParams.model_validate(
        params.model_dump(include=set(ProcessParams.model_fields)))
    loads: list[list[SampleSpec]] = []
    for k in range(0, len(samples), params.load_size):
        loads.append(assign_slots(layout, samples[k:k + params.load_size], "make_from_csv",
                                  "load_size"))
    plans = [load_plan(devices, "make_from_csv", specs, process,
                       {"load": n + 1, "loads": len(loads),
                        **({"sample_id": specs[0].sample_id} if len(specs) == 1 else {})})
             for n, specs in enumerate(loads)]

    def plan() -> Plan:
        for p in plans:
            yield from p

    return plan()


__all__: list[Any] = [
    "BalanceCheckFailed", "check_balance", "furnace_bakeout", "home_gantry", "make_from_csv",
    "make_sample_by_hand", "parse_csv",
]
