"""``/metrics`` over HTTP, from the real engine, store, simulated cell and safety service.

The router is mounted in a FastAPI app of the test's own (the daemon's API app includes the same
router); the daemon object is the real parts assembled as :class:`labd.app.Daemon` holds them.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from hardware_sims.faults import Fault, FaultKind
from labd.engine import Control
from labd.metrics import CONTENT_TYPE, metrics_router
from labd.store import ExitStatus
from tests.safety.test_interlocks import Bench, _events_seen, _finished, bench, until

__all__ = ["bench"]

SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN)$')


def parse(text: str) -> dict[str, dict[str, float]]:
    """name -> {labels text: value}; fails on any line that is not valid exposition."""
    out: dict[str, dict[str, float]] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE line"
        out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def test_metrics_report_queue_runs_devices_transports_and_interlocks(bench: Bench) -> None:
    daemon = SimpleNamespace(engine=bench.engine, cell=bench.cell, services=[bench.service],
                             started=time.time() - 5)
    app = FastAPI()
    app.include_router(metrics_router(daemon))
    client = TestClient(app)

    ok = bench.run(num=3, delay=0.0)
    assert until(lambda: _finished(bench, ok)).status is ExitStatus.SUCCESS
    aborted = bench.run(num=4000)
    until(lambda: _events_seen(bench, aborted) >= 3)
    bench.engine.control(Control.ABORT, "by hand")
    until(lambda: _finished(bench, aborted))
    bench.action("safety", "press_estop")
    until(lambda: bench.service.active(), what="the e-stop")
    bench.fault("furnace", Fault(kind=FaultKind.NO_REPLY, count=1))  # one lost reply
    until(lambda: bench.cell.links.buses and next(iter(bench.cell.links.buses.values()))
          .stats.timeouts >= 1, what="a Modbus timeout")

    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"] == CONTENT_TYPE
    m = parse(reply.text)
    assert m["labd_uptime_seconds"][""] >= 5
    assert m["labd_queue_length"][""] == 0
    assert m["labd_engine_state"]['{state="idle"}'] == 1
    assert m["labd_engine_state"]['{state="running"}'] == 0
    assert m["labd_runs_total"]['{status="success"}'] == 1
    assert m["labd_runs_total"]['{status="aborted"}'] == 1
    assert m["labd_runs_total"]['{status="failed"}'] == 0
    assert m["labd_device_up"]['{device="furnace"}'] == 1
    assert set(m["labd_device_up"]) == {f'{{device="{n}"}}' for n in bench.cell.devices}
    assert m["labd_interlock_active"]['{interlock="e-stop",action="abort"}'] == 1
    assert m["labd_interlock_trips_total"]['{interlock="e-stop",action="abort"}'] == 1
    assert m["labd_interlock_trips_total"]['{interlock="glovebox-o2",action="suspend"}'] == 0

    modbus = [k for k in m["labd_transport_requests_total"] if 'kind="modbus"' in k]
    assert len(modbus) == 1 and m["labd_transport_requests_total"][modbus[0]] > 10
    timeouts = [v for k, v in m["labd_transport_errors_total"].items()
                if 'kind="modbus"' in k and 'error="timeouts"' in k]
    assert timeouts and timeouts[0] >= 1
    rtts = {k: v for k, v in m["labd_transport_rtt_seconds"].items() if 'kind="modbus"' in k}
    assert {re.search(r'stat="(\w+)"', k).group(1) for k in rtts} == {"last", "mean", "max"}  # type: ignore[union-attr]
    assert all(0 < v < 1.0 for v in rtts.values())
    serial = [k for k in m["labd_transport_requests_total"] if 'kind="serial"' in k]
    assert any('device="gantry"' in k for k in serial)  # the interlock polls it
    mqtt = [k for k in m["labd_transport_disconnects_total"] if 'kind="mqtt"' in k]
    assert mqtt
