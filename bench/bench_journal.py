"""Journal and hub throughput, and what they cost a running plan, in one run (prints; not a test).

    .venv/bin/python bench/bench_journal.py [--docs 100000] [--hub-docs 20000] [--events 2000]

1. documents per second into the journal (append + group commit, until durable);
2. documents per second through to MQTT (private mosquitto, every PUBACK received) and through to
   PostgreSQL (private cluster, every transaction committed), from a journal filled beforehand;
3. the per-event cost of ``bp.count`` of a soft signal: bare RunEngine (no subscriber); journal
   only; journal with both forwarders as tasks on the RunEngine's loop (the first design, kept
   for comparison); and journal with both forwarders in the daemon's forwarder process
   (:class:`labd.hubservice.HubService`, as the daemon runs them). Forwarders deliver as the run
   goes; the time is measured until the RunEngine returns, and how long the hub then takes to
   catch up is printed too.

Targets (issue 6): journal >= 20,000 documents/s; ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bluesky import plans as bp
from bluesky.run_engine import RunEngine, call_in_bluesky_event_loop
from ophyd_async.core import soft_signal_rw

from labd.config import HubConfig
from labd.hub import MqttForwarder, PostgresForwarder
from labd.hub.base import Forwarder
from labd.hubservice import HubService
from labd.journal import Journal
from tests.hub.conftest import synthetic_run
from tests.support.postgres import PostgresServer
from tests.support.procs import Mosquitto


def bench_journal(workdir: Path, n: int) -> float:
    docs = synthetic_run(n - 3)
    j = Journal(workdir / "journal-bench.sqlite")
    t0 = time.perf_counter()
    for name, doc in docs:
        j.append(name, doc)
    j.flush()
    dt = time.perf_counter() - t0
    print(f"journal: {len(docs)} documents in {dt:.3f} s = {len(docs) / dt:,.0f} docs/s"
          f" ({j.batches} commits, synchronous=FULL)")
    j.close()
    return len(docs) / dt


def filled_journal(path: Path, n: int) -> Journal:
    j = Journal(path)
    for name, doc in synthetic_run(n - 3):
        j.append(name, doc)
    j.flush()
    return j


async def through(fwd: Forwarder, n: int) -> float:
    t0 = time.perf_counter()
    await fwd.start()
    await fwd.wait_delivered(n, timeout=600)
    dt = time.perf_counter() - t0
    await fwd.stop()
    return n / dt


def per_event(RE: RunEngine, n: int, repeats: int = 3) -> float:
    sig = soft_signal_rw(float, name="x")
    call_in_bluesky_event_loop(sig.connect())
    RE(bp.count([sig], num=50))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        RE(bp.count([sig], num=n))
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--hub-docs", type=int, default=20_000)
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labd-bench-"))
    broker = Mosquitto(work).start()
    pg = PostgresServer().init()
    try:
        journal_rate = bench_journal(work, args.docs)
        j = filled_journal(work / "hub.sqlite", args.hub_docs)
        n = j.durable_seq
        mqtt_rate = asyncio.run(through(
            MqttForwarder(j, cell="bench", host=broker.host, port=broker.port), n))
        conninfo = pg.create_database("bench")
        pg_rate = asyncio.run(through(
            PostgresForwarder(j, cell="bench", conninfo=conninfo), n))
        j.close()
        print(f"through to MQTT (QoS 1, PUBACKs in): {mqtt_rate:,.0f} docs/s")
        print(f"through to PostgreSQL (committed):    {pg_rate:,.0f} docs/s")

        bare_re = RunEngine(context_managers=[])
        bare = per_event(bare_re, args.events)
        RE_j = RunEngine(context_managers=[])
        jj = Journal(work / "run-journal-only.sqlite")
        RE_j.subscribe(jj.subscriber)
        journal_only = per_event(RE_j, args.events)
        jj.close()
        RE = RunEngine(context_managers=[])
        jr = Journal(work / "run.sqlite")
        RE.subscribe(jr.subscriber)
        fwds: list[Forwarder] = [
            MqttForwarder(jr, cell="bench", host=broker.host, port=broker.port),
            PostgresForwarder(jr, cell="bench", conninfo=pg.create_database("run")),
        ]
        for f in fwds:
            call_in_bluesky_event_loop(f.start())
        loaded = per_event(RE, args.events)
        jr.flush()
        t0 = time.perf_counter()
        for f in fwds:
            call_in_bluesky_event_loop(f.wait_delivered(jr.durable_seq, timeout=600), timeout=None)
        lag = time.perf_counter() - t0
        for f in fwds:
            call_in_bluesky_event_loop(f.stop())
        jr.close()

        RE_h = RunEngine(context_managers=[])
        jh = Journal(work / "run-hub-process.sqlite")
        RE_h.subscribe(jh.subscriber)
        hub = HubService(jh, HubConfig.model_validate({
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "postgres": {"enabled": True, "conninfo": pg.create_database("proc")}}), "bench")
        call_in_bluesky_event_loop(hub.start())
        assert hub.wait_delivered(0, 30)
        in_process = per_event(RE_h, args.events)
        jh.flush()
        t0 = time.perf_counter()
        caught_up = hub.wait_delivered(jh.durable_seq, 600)
        lag_p = time.perf_counter() - t0
        call_in_bluesky_event_loop(hub.stop())
        jh.close()
        assert caught_up, hub.status()
        print(f"bp.count({args.events}) bare RunEngine:              {bare * 1e3:.3f} ms/event")
        print(f"bp.count({args.events}) journal only:               {journal_only * 1e3:.3f}"
              f" ms/event (ratio {journal_only / bare:.2f})")
        print(f"bp.count({args.events}) journal + MQTT + PostgreSQL, forwarders on the RunEngine's"
              f" loop: {loaded * 1e3:.3f} ms/event (ratio {loaded / bare:.2f});"
              f" hub caught up {lag:.3f} s after the last run returned")
        print(f"bp.count({args.events}) journal + MQTT + PostgreSQL, forwarder process (daemon):"
              f" {in_process * 1e3:.3f} ms/event (ratio {in_process / bare:.2f});"
              f" hub caught up {lag_p:.3f} s after the last run returned")
        print(f"ratio (with hub, as the daemon runs it / bare): {in_process / bare:.2f}"
              "  (target <= 1.3)")
        print(f"journal rate vs target: {journal_rate / 20_000:.1f}x of 20,000 docs/s")
    finally:
        pg.cleanup()
        broker.stop()


if __name__ == "__main__":
    main()
