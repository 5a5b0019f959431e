"""The sample table from the journal, its filters, the exports, and what bad input gets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from event_model import compose_run

from labd.hub import PostgresForwarder
from labd.journal import Journal
from labd.samples import SampleError, SampleRow, export, sample_from_event, sample_rows


def sample_run(samples: list[dict[str, Any]], **md: Any) -> list[tuple[str, dict[str, Any]]]:
    bundle = compose_run(metadata={"plan_name": "make_samples", **md})
    keys: dict[str, Any] = {}
    for s in samples:
        for k, v in s.items():
            keys[k] = {"dtype": "string" if isinstance(v, str) else "number", "shape": [],
                       "source": "protocol"}
    if "property_value" in keys:
        keys["property_value"]["units"] = "mV"
    desc = bundle.compose_descriptor(name="sample", data_keys=keys)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, given in enumerate(samples):
        # Every event carries every data key: what a sample lacks is NaN (a batch where one
        # sample was not measured), which the table shows as empty.
        data = {k: given.get(k, math.nan) for k in keys}
        docs.append(("event", desc.compose_event(
            data=data, timestamps=dict.fromkeys(data, 0.0), seq_num=i + 1)))
    docs.append(("stop", bundle.compose_stop()))
    return docs


BATCH = [
    {"sample_id": "K-001", "target_Fe": 0.5, "target_Co": 0.5, "measured_Fe": 0.48,
     "measured_Co": 0.52, "dosed_mg_Fe": 120.5, "dosed_mg_Co": 126.0, "anneal_c": 900.0,
     "anneal_s": 3600.0, "property_value": 312.0},
    {"sample_id": "K-002", "target_Fe": 0.25, "target_Ni": 0.75, "anneal_c": 900.0,
     "anneal_s": 3600.0, "property_value": 298.5, "furnace_slot": 2},
]


def fill(journal: Journal) -> None:
    runs = [
        sample_run(BATCH, protocol="synth", campaign="K", property_name="overpotential"),
        sample_run([{"sample_id": "L-001", "target_Cr": 1.0, "property_value": 1.0}],
                   protocol="synth", campaign="L", property_name="overpotential"),
        sample_run([{"sample_id": "K-001", "target_Fe": 0.5, "target_Co": 0.5,
                     "property_value": 305.0}], protocol="remeasure", campaign="K",
                   property_name="overpotential"),
    ]
    for docs in runs:
        for n, d in docs:
            journal.append(n, d)
    journal.flush(timeout=10)


def test_sample_table_one_row_per_sample_with_filters(journal: Journal) -> None:
    fill(journal)
    rows = sample_rows(journal)
    assert [r.sample_id for r in rows] == ["K-002", "L-001", "K-001"]  # re-measured K-001 last
    k2 = rows[0]
    assert k2.target_composition == {"Fe": 0.25, "Ni": 0.75}
    assert (k2.anneal_c, k2.anneal_s, k2.property_value) == (900.0, 3600.0, 298.5)
    assert (k2.property_name, k2.property_unit, k2.campaign, k2.protocol) == (
        "overpotential", "mV", "K", "synth")
    assert k2.extra == {"furnace_slot": 2}
    assert rows[2].property_value == 305.0 and rows[2].protocol == "remeasure"
    assert [r.sample_id for r in sample_rows(journal, campaign="L")] == ["L-001"]
    assert [r.sample_id for r in sample_rows(journal, protocol="synth")] == [
        "K-001", "K-002", "L-001"]
    first = sample_rows(journal, protocol="synth", campaign="K")
    assert first[0].measured_composition == {"Fe": 0.48, "Co": 0.52}
    assert first[0].dosed_mg == {"Fe": 120.5, "Co": 126.0}
    t_last = journal.runs()[-1].start_time
    assert [r.sample_id for r in sample_rows(journal, since=t_last)] == ["K-001"]
    assert sample_rows(journal, campaign="nope") == []


def test_export_csv_parquet_jsonl_round_trip(journal: Journal, tmp_path: Path) -> None:
    fill(journal)
    rows = sample_rows(journal, protocol="synth")
    with export(rows, tmp_path / "s.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["sample_id"] for t in table] == ["K-001", "K-002", "L-001"]
    assert table[1]["target_Ni"] == "0.75" and table[1]["target_Co"] == ""
    assert table[0]["measured_Co"] == "0.52" and table[0]["property_unit"] == "mV"
    pt = pq.read_table(export(rows, tmp_path / "s.parquet", format="parquet")).to_pylist()
    assert [p["sample_id"] for p in pt] == ["K-001", "K-002", "L-001"]
    assert pt[2]["target_Cr"] == 1.0 and pt[2]["target_Fe"] is None
    assert pt[0]["dosed_mg_Fe"] == 120.5 and pt[1]["property_value"] == 298.5
    lines = export(rows, tmp_path / "s.jsonl", format="jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["target_composition"] == {"Fe": 0.5, "Co": 0.5} and len(lines) == 3
    # An empty selection still gives a file with a header a spreadsheet can open.
    assert export([], tmp_path / "e.csv").read_text().startswith("sample_id,run_uid,time")
    assert pq.read_table(export([], tmp_path / "e.parquet", format="parquet")).num_rows == 0


def test_bad_sample_events_and_formats_get_specific_messages(tmp_path: Path) -> None:
    start = {"uid": "r1"}
    desc: dict[str, Any] = {"data_keys": {}}
    with pytest.raises(SampleError, match="has no 'sample_id' data key"):
        sample_from_event(start, desc, {"uid": "e1", "time": 0.0, "data": {"target_Fe": 1.0}})
    with pytest.raises(SampleError, match="'property_value' must be a number, got 'high'"):
        sample_from_event(start, desc, {"uid": "e2", "time": 0.0,
                                        "data": {"sample_id": "S", "property_value": "high"}})
    with pytest.raises(ValueError, match="unknown export format 'xlsx'"):
        export([SampleRow("S", "r", "e", 0.0)], tmp_path / "x", format="xlsx")  # type: ignore


async def test_samples_reach_postgresql_in_typed_columns(
    journal: Journal, pg_conninfo: str
) -> None:
    fill(journal)
    fwd = PostgresForwarder(journal, cell="c1", conninfo=pg_conninfo)
    await fwd.start()
    try:
        await fwd.wait_delivered(journal.durable_seq, timeout=20)
    finally:
        await fwd.stop()
    with psycopg.connect(pg_conninfo) as c:
        rows = c.execute(
            "SELECT sample_id, campaign, protocol, (target_composition->>'Fe')::float,"
            " measured_composition, anneal_c, property_name, property_value, property_unit"
            " FROM samples ORDER BY sample_id").fetchall()
    assert rows == [
        ("K-001", "K", "remeasure", 0.5, {}, None, "overpotential", 305.0, "mV"),
        ("K-002", "K", "synth", 0.25, {}, 900.0, "overpotential", 298.5, "mV"),
        ("L-001", "L", "synth", None, {}, None, "overpotential", 1.0, "mV"),
    ]
