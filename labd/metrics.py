"""Prometheus metrics at ``/metrics`` (text exposition format 0.0.4), without a dependency.

Everything is read at scrape time from the daemon's own state, so there is nothing to keep in
step: the engine (state, queue), the history in SQLite (runs by exit status, read through a
read-only connection of its own), the devices (up/down), the transports' ``stats`` (requests,
errors by kind, round-trip times, disconnects) and the safety service (interlocks active, trips
by name, counted from the durable record so they survive a restart).

The API mounts :func:`metrics_router` (``app.include_router(metrics_router(daemon))``). It is
meant for a Prometheus scraper on the host; it carries counts and states, no sample data.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_STATES = ("idle", "running", "paused", "stopping")
RUN_STATUSES = ("success", "failed", "aborted", "stopped", "halted", "interrupted")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Exposition:
    """Builds the text: one HELP/TYPE block per metric family, samples under it."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self._lines.append(f"# HELP {name} {help_}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{lab}}} {_number(value)}" if lab
                               else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def runs_by_status(db_path: Any) -> dict[str, int]:
    """Finished runs in the history by exit status (a read-only connection of our own)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2.0)
    try:
        rows = con.execute("SELECT status, COUNT(*) FROM history GROUP BY status").fetchall()
    finally:
        con.close()
    return {str(s): int(n) for s, n in rows}


def _transports(cell: Any) -> list[tuple[dict[str, str], Any]]:
    out: list[tuple[dict[str, str], Any]] = []
    if cell is None:
        return out
    links = cell.links
    for url, port in links.serial.items():
        out.append(({"kind": "serial", "link": url, "device": str(port.device)}, port.stats))
    for key, bus in links.buses.items():
        out.append(({"kind": "modbus", "link": key, "device": ""}, bus.stats))
    for key, conn in links.brokers.items():
        out.append(({"kind": "mqtt", "link": key, "device": ""}, conn.stats))
    return out


def render(daemon: Any) -> str:
    """The metrics of ``daemon`` (a :class:`labd.app.Daemon`) as Prometheus text."""
    e = Exposition()
    engine = daemon.engine
    e.family("labd_uptime_seconds", "gauge", "Seconds since the daemon started.",
             [({}, time.time() - daemon.started)])
    e.family("labd_queue_length", "gauge", "Items waiting in the queue.",
             [({}, len(engine.store.queue()))])
    e.family("labd_queue_running", "gauge", "1 while the queue takes items.",
             [({}, 1 if engine.queue_running else 0)])
    state = str(engine.state)
    e.family("labd_engine_state", "gauge", "1 for the engine's current state.",
             [({"state": s}, 1 if s == state else 0) for s in ENGINE_STATES])
    counts = runs_by_status(engine.store.path)
    statuses = list(RUN_STATUSES) + sorted(set(counts) - set(RUN_STATUSES) - {"running"})
    e.family("labd_runs_total", "counter", "Finished runs in the history by exit status.",
             [({"status": s}, counts.get(s, 0)) for s in statuses])
    cell = daemon.cell
    if cell is not None:
        e.family("labd_device_up", "gauge", "1 if the device answered (connected), else 0.",
                 [({"device": n}, 0 if n in cell.down else 1) for n in cell.devices])
    links = _transports(cell)
    e.family("labd_transport_requests_total", "counter", "Request/reply exchanges attempted.",
             [(lab, st.requests) for lab, st in links])
    e.family("labd_transport_replies_total", "counter", "Exchanges answered.",
             [(lab, st.ok) for lab, st in links])
    e.family("labd_transport_errors_total", "counter", "Failed exchanges by kind.",
             [({**lab, "error": kind}, getattr(st, kind)) for lab, st in links
              for kind in ("timeouts", "protocol_errors", "instrument_errors", "not_connected")])
    e.family("labd_transport_disconnects_total", "counter", "Links lost.",
             [(lab, st.disconnects) for lab, st in links])
    e.family("labd_transport_reconnects_total", "counter", "Links re-established.",
             [(lab, st.reconnects) for lab, st in links])
    rtt: list[tuple[dict[str, str], float]] = []
    for lab, st in links:
        for stat, value in (("last", st.last_rtt_s), ("mean", st.mean_rtt_s),
                            ("max", st.max_rtt_s if st.ok else None)):
            if value is not None:
                rtt.append(({**lab, "stat": stat}, value))
    e.family("labd_transport_rtt_seconds", "gauge", "Round-trip time of answered exchanges.",
             rtt)
    safety = next((s for s in daemon.services if getattr(s, "name", "") == "safety"), None)
    interlocks = list(getattr(safety, "interlocks", {}).values())
    e.family("labd_interlock_active", "gauge", "1 while the interlock is tripped.",
             [({"interlock": il.name, "action": il.config.action}, 1 if il.active else 0)
              for il in interlocks])
    e.family("labd_interlock_trips_total", "counter", "Times the interlock tripped (durable).",
             [({"interlock": il.name, "action": il.config.action}, il.trips)
              for il in interlocks])
    _hub(e, getattr(daemon, "hub", None))
    return e.text()


def _hub(e: Exposition, hub: Any) -> None:
    """The journal and the hub forwarders (:meth:`labd.hubservice.HubService.status`)."""
    if hub is None:
        return
    st = hub.status()
    fwds = st["forwarders"]
    e.family("labd_journal_documents", "gauge", "Documents committed to the journal.",
             [({}, st["journal"]["documents"])])
    e.family("labd_hub_connected", "gauge", "1 while the forwarder is connected to its target.",
             [({"forwarder": f["name"], "target": f["target"]}, 1 if f["connected"] else 0)
              for f in fwds])
    e.family("labd_hub_backlog_documents", "gauge",
             "Journaled documents the forwarder has not delivered yet.",
             [({"forwarder": f["name"]}, f["backlog"]) for f in fwds])
    e.family("labd_hub_cursor", "gauge", "Last journal sequence number delivered.",
             [({"forwarder": f["name"]}, f["cursor"]) for f in fwds])
    e.family("labd_hub_delivered_total", "counter",
             "Documents delivered by the current forwarder process.",
             [({"forwarder": f["name"]}, f["delivered"]) for f in fwds])
    e.family("labd_hub_error", "gauge", "1 while the forwarder's last attempt failed.",
             [({"forwarder": f["name"]}, 1 if f["last_error"] else 0) for f in fwds])


def metrics_router(daemon: Any) -> APIRouter:
    """``GET /metrics`` for ``daemon``; the API app includes it."""
    router = APIRouter()

    @router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def metrics() -> PlainTextResponse:  # sync: FastAPI runs it in its thread pool
        return PlainTextResponse(render(daemon), media_type=CONTENT_TYPE)

    return router
