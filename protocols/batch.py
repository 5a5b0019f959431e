"""``make_batch``: a furnace load. Several crucibles are dosed one by one, annealed together in
one furnace program, then analysed with the station measuring one crucible while the gantry
brings the next out of the furnace (see :mod:`protocols.sample` for the procedure)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .layout import CellLayout
from .registry import Devices, Plan, ProtocolError, protocol
from .sample import (
    NEEDS,
    SAMPLE_ID_PATTERN,
    ProcessParams,
    SampleSpec,
    _composition,
    load_plan,
)
from .stubs import layout_of


class BatchSample(BaseModel):
    """One crucible of the load."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN, description="Unique id of the sample.")
    composition: dict[str, float] = Field(
        description="Target atomic fraction per element, summing to 1.",
        json_schema_extra={"unit": "at. fraction"})
    rack_slot: str | None = Field(
        default=None, description="Rack slot of its crucible (default: the first free slots).")

    _check_composition = field_validator("composition")(_composition)


class MakeBatchParams(ProcessParams):
    """A furnace load: up to one sample per furnace slot, one heat treatment for all."""

    samples: list[BatchSample] = Field(min_length=1, max_length=25,
                                       description="The samples of the load, in dosing order.")

    @model_validator(mode="after")
    def _distinct(self) -> MakeBatchParams:
        ids = [s.sample_id for s in self.samples]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"sample ids used twice in the load: {dup}")
        return self


def assign_slots(layout: CellLayout, samples: list[BatchSample], protocol_name: str,
                 field: str = "samples") -> list[SampleSpec]:
    """Rack slots (given, else the layout's first ones not given to another sample) and furnace
    slots (in order) for a load."""
    taken = {s.rack_slot for s in samples if s.rack_slot}
    free = [r for r in layout.rack_slots if r not in taken]
    furnace = layout.furnace_slots
    if len(samples) > len(furnace):
        message = f"{len(samples)} samples, but the furnace has {len(furnace)} slots"
        raise ProtocolError(f"{protocol_name}: invalid parameters: {field}: {message}",
                            [{"field": field, "message": message, "input": len(samples)}])
    specs: list[SampleSpec] = []
    for i, s in enumerate(samples):
        rack = s.rack_slot
        if rack is None:
            if not free:
                message = "more samples than rack slots"
                raise ProtocolError(f"{protocol_name}: invalid parameters: {field}: {message}",
                                    [{"field": field, "message": message, "input": None}])
            rack = free.pop(0)
        specs.append(SampleSpec(s.sample_id, dict(s.composition), rack, furnace[i]))
    return specs


@protocol("make_batch", MakeBatchParams, title="Make a furnace load of samples",
          needs=NEEDS, tags=("sample", "campaign"))
def make_batch(devices: Devices, params: MakeBatchParams) -> Plan:
    """Dose each crucible of the load, anneal them together in one furnace program, measure each
    (composition and property) with the station working in parallel with the gantry, and record
    one ``sample`` event per crucible."""
    specs = assign_slots(layout_of(devices), params.samples, "make_batch")
    process = ProcessParams.model_validate(
        params.model_dump(include=set(ProcessParams.model_fields)))
    return load_plan(devices, "make_batch", specs, process)
