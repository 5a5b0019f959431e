"""Journal and hub throughput, and what they cost a running plan, in one run (prints; not a test).

    .venv/bin/python bench/bench_journal.py [--docs 100000] [--hub-docs 20000] [--events 2000]

1. documents per second into the journal (append + group commit, until durable);
2. documents per second through to MQTT (private mosquitto, every PUBACK received) and through to
   PostgreSQL (private cluster, every transaction committed), from a journal filled beforehand;
3. the per-event cost of ``bp.count`` of a soft signal: bare RunEngine (no subscriber); journal
   only; journal with both forwarders as tasks on the RunEngine's loop (the first design, kept
   for comparison); and the daemon's own set-up: the engine's RunEngine with its hooks
   (:class:`labd.engine.Engine`), the journal, and both forwarders in the daemon's forwarder
   process (:class:`labd.hubservice.HubService`). Forwarders deliver as the run
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
from labd.engine import Engine
from labd.hub import MqttForwarder, PostgresForwarder
from labd.hub.base import Forwarder
from labd.hubservice import HubService
from labd.journal import Journal
from labd.store import Store
from protocols.registry import Registry
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
    ap.add_argument("--rounds", type=int, default=9)
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

        # The four set-ups side by side, measured in interleaved rounds (bare, journal, hub on
        # the loop, hub in its process, then again): a load that comes and goes on the machine
        # (PostgreSQL's checkpoint after the throughput phase, say) falls on all of them alike.
        setups: dict[str, RunEngine] = {}
        setups["bare"] = RunEngine(context_managers=[])
        journals: dict[str, Journal] = {}
        for key in ("journal", "loop"):
            setups[key] = RunEngine(context_managers=[])
            journals[key] = Journal(work / f"run-{key}.sqlite")
            setups[key].subscribe(journals[key].subscriber)
        # As the daemon runs it: the engine's own RunEngine, with its hooks (document, state and
        # message hooks), the journal first, the forwarders in their process.
        journals["process"] = Journal(work / "run-process.sqlite")
        store = Store(work / "engine.sqlite")
        engine = Engine(store, Registry(), cell="bench-process",
                        first_subscribers=[journals["process"].subscriber])
        setups["process"] = engine.RE
        fwds: list[Forwarder] = [
            # cells of their own: one MQTT client id per cell (the broker would otherwise hand
            # the session from one forwarder to the other, back and forth)
            MqttForwarder(journals["loop"], cell="bench-loop", host=broker.host,
                          port=broker.port),
            PostgresForwarder(journals["loop"], cell="bench-loop",
                              conninfo=pg.create_database("run")),
        ]
        for f in fwds:
            call_in_bluesky_event_loop(f.start(), timeout=None)
        hub = HubService(journals["process"], HubConfig.model_validate({
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "postgres": {"enabled": True, "conninfo": pg.create_database("proc")}}),
            "bench-process")
        call_in_bluesky_event_loop(hub.start())
        assert hub.wait_delivered(0, 30)
        sigs = {}
        for key, re_ in setups.items():
            sigs[key] = soft_signal_rw(float, name="x")
            call_in_bluesky_event_loop(sigs[key].connect())
            re_(bp.count([sigs[key]], num=50))  # warm-up
        times: dict[str, list[float]] = {key: [] for key in setups}
        lags: dict[str, list[float]] = {"loop": [], "process": []}
        for _ in range(args.rounds):
            for key, re_ in setups.items():
                t0 = time.perf_counter()
                re_(bp.count([sigs[key]], num=args.events))
                times[key].append((time.perf_counter() - t0) / args.events)
                t0 = time.perf_counter()
                if key == "loop":
                    journals[key].flush()
                    for f in fwds:
                        call_in_bluesky_event_loop(
                            f.wait_delivered(journals[key].durable_seq, timeout=600),
                            timeout=None)
                elif key == "process":
                    journals[key].flush()
                    assert hub.wait_delivered(journals[key].durable_seq, 600), hub.status()
                if key in lags:
                    lags[key].append(time.perf_counter() - t0)
        for f in fwds:
            call_in_bluesky_event_loop(f.stop())
        call_in_bluesky_event_loop(hub.stop())
        for j in journals.values():
            j.close()
        store.close()
        med = {key: statistics.median(v) for key, v in times.items()}
        bare = med["bare"]
        n = args.events
        print(f"bp.count({n}), median of {args.rounds} interleaved rounds:")
        print(f"  bare RunEngine:                                 {bare * 1e3:.3f} ms/event")
        print(f"  journal only:                                   {med['journal'] * 1e3:.3f}"
              f" ms/event (ratio {med['journal'] / bare:.2f})")
        print(f"  journal + MQTT + PostgreSQL, forwarders on the RunEngine's loop (before):"
              f" {med['loop'] * 1e3:.3f} ms/event (ratio {med['loop'] / bare:.2f});"
              f" hub caught up {max(lags['loop']):.3f} s after the run returned")
        print(f"  the daemon's engine + journal + MQTT + PostgreSQL (forwarder process):"
              f" {med['process'] * 1e3:.3f} ms/event (ratio {med['process'] / bare:.2f});"
              f" hub caught up {max(lags['process']):.3f} s after the run returned")
        print(f"ratio (with hub, as the daemon runs it / bare): {med['process'] / bare:.2f}"
              "  (target <= 1.3)")
        print(f"journal rate vs target: {journal_rate / 20_000:.1f}x of 20,000 docs/s")
    finally:
        pg.cleanup()
        broker.stop()


if __name__ == "__main__":
    main()
