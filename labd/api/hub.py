"""API routes of the journal and the hub: runs, samples, the sample export, forwarder status.

The journal is the cell's own store of results; these routes read it (through a thread: SQLite
reads never run on the daemon's loop). Every route needs a viewer token.

* ``GET /api/v1/runs?campaign=&protocol=&plan_name=&since=&until=&limit=``: run summaries, oldest
  first (``since``/``until``: ISO 8601 or Unix time, on the run's start).
* ``GET /api/v1/runs/{uid}``: one run's summary and the count of its documents by name;
  ``?documents=true`` adds every document, in order.
* ``GET /api/v1/samples?campaign=&protocol=&since=&until=``: the sample table
  (:mod:`labd.samples`, one row a sample, nested compositions).
* ``GET /api/v1/samples/export?format=csv|parquet|jsonl`` (same filters): the table as a file.
* ``GET /api/v1/samples/{sample_id}``: one sample's row (its latest, as in the table) and
  ``furnace``: the temperatures the furnace followed in the sample's run (``{data_key, units,
  time: [...], value: [...]}`` from the run's ``furnace`` stream, thinned to at most
  :data:`PROFILE_POINTS` points; null when the run has no such stream).
* ``GET /api/v1/hub``: the journal and every forwarder (target, connected, cursor, backlog, last
  error), see :meth:`labd.hubservice.HubService.status`.
"""

from __future__ import annotations

import asyncio
import collections
import math
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response

from ..samples import SAMPLE_STREAM, SampleRow, export, sample_from_event, sample_rows
from .auth import Principal, require
from .tokens import Role

if TYPE_CHECKING:
    from ..app import Daemon
    from ..journal import Journal

Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Since = Annotated[datetime | None, Query(description="ISO 8601 or Unix time (run start >=)")]
Until = Annotated[datetime | None, Query(description="ISO 8601 or Unix time (run start <)")]
PROFILE_POINTS = 2000
FURNACE_STREAM = "furnace"
MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet",
         "jsonl": "application/x-ndjson"}


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until.timestamp() <= since.timestamp():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {
            "message": "invalid request: until must be after since",
            "errors": [{"field": "until", "message": "must be after since",
                        "input": until.isoformat()}]})


def find_sample(journal: Journal, sample_id: str) -> SampleRow | None:
    """The latest row of ``sample_id``: the newest run that made it, its last event of it."""
    for run in reversed(journal.runs()):
        if run.sample_id not in (None, sample_id):
            continue  # a one-sample run of another sample
        recs = journal.documents(run.uid, ("descriptor", "event"), stream=SAMPLE_STREAM)
        events = [r.doc for r in recs if r.name == "event"
                  and r.doc.get("data", {}).get("sample_id") == sample_id]
        if events:
            start = journal.documents(run.uid, ("start",))[0].doc
            descriptors = {r.doc["uid"]: r.doc for r in recs if r.name == "descriptor"}
            return sample_from_event(start, descriptors[events[-1]["descriptor"]], events[-1])
    return None


def furnace_profile(journal: Journal, run_uid: str) -> dict[str, Any] | None:
    """The temperatures of the run's ``furnace`` stream (see the module docstring)."""
    recs = journal.documents(run_uid, ("descriptor", "event"), stream=FURNACE_STREAM)
    descriptors = [r.doc for r in recs if r.name == "descriptor"]
    events = [r.doc for r in recs if r.name == "event"]
    if not descriptors or not events:
        return None
    keys: dict[str, Any] = descriptors[0].get("data_keys", {})
    key = next(iter(keys))  # a monitor's stream: the one signal
    points = [(float(e["time"]), e["data"].get(key)) for e in events]
    points = [(t, float(v)) for t, v in points
              if isinstance(v, int | float) and math.isfinite(v)]
    step = max(1, -(-len(points) // PROFILE_POINTS))
    kept = points[::step]
    if kept and kept[-1] != points[-1]:
        kept[-1] = points[-1]  # the last reading (cooled) is kept
    return {"data_key": key, "units": keys[key].get("units"), "points_total": len(points),
            "time": [t for t, _ in kept], "value": [v for _, v in kept]}


def hub_router(daemon: Daemon) -> APIRouter:
    """The routes above for ``daemon`` (its ``journal`` and ``hub`` service)."""
    api = APIRouter(prefix="/api/v1")
    journal = daemon.journal

    @api.get("/runs", summary="Runs in the journal, oldest first, with filters (viewer)")
    async def get_runs(
        principal: Viewer,
        campaign: str | None = None,
        protocol: str | None = None,
        plan_name: str | None = None,
        since: Since = None,
        until: Until = None,
        limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    ) -> list[dict[str, Any]]:
        _check_range(since, until)
        runs = await asyncio.to_thread(journal.runs, campaign=campaign, protocol=protocol,
                                       plan_name=plan_name, since=_ts(since), until=_ts(until),
                                       limit=limit)
        return [r.__dict__ for r in runs]

    @api.get("/runs/{uid}", summary="One run: summary, document counts, documents (viewer)")
    async def get_run(uid: str, principal: Viewer, documents: bool = False) -> dict[str, Any]:
        run = await asyncio.to_thread(journal.run, uid)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run {uid!r} in the journal")
        recs = await asyncio.to_thread(journal.run_documents, uid)
        out: dict[str, Any] = {"run": run.__dict__,
                               "counts": dict(collections.Counter(r.name for r in recs))}
        if documents:
            out["documents"] = [{"seq": r.seq, "name": r.name, "doc": r.doc} for r in recs]
        return out

    @api.get("/samples", summary="The sample table, one row a sample, with filters (viewer)")
    async def get_samples(
        principal: Viewer,
        campaign: str | None = None,
        protocol: str | None = None,
        since: Since = None,
        until: Until = None,
    ) -> list[dict[str, Any]]:
        _check_range(since, until)
        rows = await asyncio.to_thread(sample_rows, journal, campaign=campaign,
                                       protocol=protocol, since=_ts(since), until=_ts(until))
        return [r.as_dict() for r in rows]

    @api.get("/samples/export", summary="The sample table as CSV, Parquet or JSON Lines (viewer)")
    async def get_samples_export(
        principal: Viewer,
        format: Literal["csv", "parquet", "jsonl"] = "csv",
        campaign: str | None = None,
        protocol: str | None = None,
        since: Since = None,
        until: Until = None,
    ) -> Response:
        _check_range(since, until)

        def build() -> bytes:
            rows = sample_rows(journal, campaign=campaign, protocol=protocol,
                               since=_ts(since), until=_ts(until))
            with tempfile.TemporaryDirectory(prefix="labd-export-") as tmp:
                return export(rows, Path(tmp) / f"samples.{format}", format).read_bytes()

        body = await asyncio.to_thread(build)
        return Response(body, media_type=MEDIA[format], headers={
            "Content-Disposition": f'attachment; filename="samples.{format}"'})

    @api.get("/samples/{sample_id}",
             summary="One sample: its row and the furnace profile of its run (viewer)")
    async def get_sample(sample_id: str, principal: Viewer) -> dict[str, Any]:
        def build() -> dict[str, Any] | None:
            row = find_sample(journal, sample_id)
            if row is None:
                return None
            return {**row.as_dict(), "furnace": furnace_profile(journal, row.run_uid)}

        out = await asyncio.to_thread(build)
        if out is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no sample {sample_id!r} in the journal")
        return out

    @api.get("/hub", summary="The journal and the hub forwarders: status and backlog (viewer)")
    async def get_hub(principal: Viewer) -> dict[str, Any]:
        hub = daemon.hub
        if hub is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the hub is not started")
        return await asyncio.to_thread(hub.status)

    return api
