"""The sample table: one row per sample made in the cell, from the journal, and its export.

The sample convention
---------------------

Every protocol that makes samples follows it; the journal, the MQTT and PostgreSQL forwarders and
``labctl samples`` rely on it.

* The run's **start document** carries ``protocol`` (the protocol's registered name), and may carry
  ``campaign``, ``sample_id`` (a run that makes one sample), ``property_name`` (e.g.
  ``"hardness"``) and ``property_unit`` (e.g. ``"HV"``).
* The run emits **one event per sample** in a stream named ``sample`` (a furnace batch of eight
  samples: eight events). Its data keys:

  ===================== ===================================================================
  ``sample_id``          string, unique in the cell (required)
  ``target_<El>``        targeted atomic fraction of element ``El`` (``target_Fe``: 0.25)
  ``measured_<El>``      measured atomic fraction (XRF), if measured
  ``dosed_mg_<El>``      mass of element ``El``'s powder dosed, in mg
  ``anneal_c``           annealing temperature, degC
  ``anneal_s``           annealing time at temperature, s
  ``property_value``     the screened property, a float
  ``property_name``      optional here: overrides the start document's
  ``property_unit``      optional here: overrides the start document's
  ===================== ===================================================================

  The unit of ``property_value`` may also be given as the descriptor's ``units`` of that data
  key. Element symbols are case-sensitive (``Fe``, not ``FE``). Any other data key is kept in the
  row's ``extra`` mapping. Event data keys are the same for every event of a stream, so a value a
  sample does not have (an element not in it, a measurement not made) is NaN: it is left out of
  the row (empty in CSV, null in Parquet and JSON).

A row (:class:`SampleRow`, or :meth:`SampleRow.as_flat_dict` for tables) holds the sample id,
run uid, protocol, campaign, time, the three compositions as ``{element: value}`` mappings, the
anneal, and the property. For CSV and Parquet the mappings are flattened into one column per
element present in any row (``target_Fe``, ``measured_Fe``, ``dosed_mg_Fe``, ...), which is what
a technician puts in a spreadsheet; JSON Lines keeps both the nested mappings.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from labd.journal import Journal

SAMPLE_STREAM = "sample"
_PREFIXES = {"target_": "target_composition", "measured_": "measured_composition",
             "dosed_mg_": "dosed_mg"}
_FIXED = {"sample_id", "anneal_c", "anneal_s", "property_value", "property_name",
          "property_unit"}
ExportFormat = Literal["csv", "parquet", "jsonl"]


class SampleError(ValueError):
    """A sample event that does not follow the convention (the message says which key)."""


@dataclass
class SampleRow:
    sample_id: str
    run_uid: str
    event_uid: str
    time: float
    protocol: str | None = None
    campaign: str | None = None
    target_composition: dict[str, float] = field(default_factory=dict)
    measured_composition: dict[str, float] = field(default_factory=dict)
    dosed_mg: dict[str, float] = field(default_factory=dict)
    anneal_c: float | None = None
    anneal_s: float | None = None
    property_name: str | None = None
    property_value: float | None = None
    property_unit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Nested (JSON Lines, MQTT, PostgreSQL)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def as_flat_dict(self, elements: Sequence[str] | None = None) -> dict[str, Any]:
        """One column per element (CSV, Parquet); ``elements`` fixes the element columns."""
        els = list(elements) if elements is not None else sorted(self.elements())
        out: dict[str, Any] = {
            "sample_id": self.sample_id, "run_uid": self.run_uid, "time": self.time,
            "protocol": self.protocol, "campaign": self.campaign,
        }
        for prefix, attr in _PREFIXES.items():
            comp: dict[str, float] = getattr(self, attr)
            for el in els:
                out[prefix + el] = comp.get(el)
        out.update(anneal_c=self.anneal_c, anneal_s=self.anneal_s,
                   property_name=self.property_name, property_value=self.property_value,
                   property_unit=self.property_unit)
        return out

    def elements(self) -> set[str]:
        return set(self.target_composition) | set(self.measured_composition) | set(self.dosed_mg)


def _float(key: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SampleError(f"sample data key {key!r} must be a number, got {value!r}") from None
    return None if math.isnan(out) else out


def sample_from_event(
    start: Mapping[str, Any], descriptor: Mapping[str, Any], event: Mapping[str, Any]
) -> SampleRow:
    """Build the row of one ``sample``-stream event (see the module docstring)."""
    data: Mapping[str, Any] = event["data"]
    sid = data.get("sample_id")
    if sid in (None, ""):
        raise SampleError(f"sample event {event.get('uid')} has no 'sample_id' data key")
    keys: Mapping[str, Any] = descriptor.get("data_keys", {})
    row = SampleRow(
        sample_id=str(sid), run_uid=str(start["uid"]), event_uid=str(event["uid"]),
        time=float(event["time"]), protocol=start.get("protocol"), campaign=start.get("campaign"),
        property_name=data.get("property_name") or start.get("property_name"),
        property_unit=(data.get("property_unit") or keys.get("property_value", {}).get("units")
                       or start.get("property_unit")),
        anneal_c=_float("anneal_c", data.get("anneal_c")),
        anneal_s=_float("anneal_s", data.get("anneal_s")),
        property_value=_float("property_value", data.get("property_value")),
    )
    for key, value in data.items():
        if key in _FIXED:
            continue
        for prefix, attr in _PREFIXES.items():
            if key.startswith(prefix) and len(key) > len(prefix):
                v = _float(key, value)
                if v is not None:
                    getattr(row, attr)[key[len(prefix):]] = v
                break
        else:
            if not (isinstance(value, float) and math.isnan(value)):
                row.extra[key] = value
    return row


def sample_rows(
    journal: Journal,
    *,
    campaign: str | None = None,
    protocol: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[SampleRow]:
    """The sample table from the journal, one row per sample (the latest row wins when a
    sample id appears again, e.g. re-measured), ordered by time; runs filtered by ``campaign``,
    ``protocol`` and start time in [since, until)."""
    rows: dict[str, SampleRow] = {}
    for run in journal.runs(campaign=campaign, protocol=protocol, since=since, until=until):
        recs = journal.documents(run.uid, ("descriptor", "event"), stream=SAMPLE_STREAM)
        if not recs:
            continue
        start = journal.documents(run.uid, ("start",))[0].doc
        descriptors: dict[str, dict[str, Any]] = {}
        for rec in recs:
            doc = rec.doc
            if rec.name == "descriptor":
                descriptors[doc["uid"]] = doc
            else:
                row = sample_from_event(start, descriptors[doc["descriptor"]], doc)
                rows[row.sample_id] = row
    return sorted(rows.values(), key=lambda r: r.time)


def export(rows: Iterable[SampleRow], path: str | Path, format: ExportFormat = "csv") -> Path:
    """Write the sample table to ``path`` as CSV, Parquet or JSON Lines; returns the path.

    Blocking file I/O: on the daemon's loop, call it through ``asyncio.to_thread``."""
    rows = list(rows)
    path = Path(path)
    if format == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r.as_dict(), separators=(",", ":")) + "\n")
        return path
    elements = sorted(set().union(*(r.elements() for r in rows))) if rows else []
    flat = [r.as_flat_dict(elements) for r in rows]
    columns = list(SampleRow("", "", "", 0.0).as_flat_dict(elements))
    if format == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(flat)
        return path
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {c: pa.string() for c in ("sample_id", "run_uid", "protocol", "campaign",
                                          "property_name", "property_unit")}
        schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
        table = pa.Table.from_pylist(flat, schema=schema)
        pq.write_table(table, path)
        return path
    raise ValueError(f"unknown export format {format!r}: expected 'csv', 'parquet' or 'jsonl'")
