"""Interlocks tripped through the simulators' physical actions and fault channel.

The simulated cell runs in-process (``SimCell``) on the engine's RunEngine loop, on its real
transports (ptys, Modbus TCP, the suite's mosquitto); the devices are built from its endpoints as
the daemon builds them; the engine (real RunEngine, real SQLite store, worker thread) runs test
protocols; :class:`labd.safety.SafetyService` watches the default interlocks. Each test checks the
run's fate in the history, what was pushed on the event bus and recorded in SQLite, and the safe
state *as the simulators see it*.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from ophyd_async.core import soft_signal_rw
from pydantic import BaseModel, Field, ValidationError

from drivers.cell import CellDevices, instruments_from_endpoints
from hardware_sims.cell import SimCell
from hardware_sims.config import validate_config
from hardware_sims.faults import Fault, FaultKind
from labd.config import ConfigError
from labd.config import validate_config as validate_daemon_config
from labd.engine import Engine
from labd.main import JsonFormatter
from labd.safety import (
    InterlockConfig,
    InterlockError,
    InterlocksConfig,
    SafetyService,
    default_rules,
)
from labd.store import ExitStatus, QueueItem, Store, StoreError
from protocols.registry import Registry, protocol
from tests.support.procs import Mosquitto, wait_until

T = TypeVar("T")
TIME_SCALE = 100.0


class SoakParams(BaseModel):
    num: int = Field(400, ge=1)
    delay: float = Field(0.02, ge=0)
    heat_c: float | None = None
    #: Home, then a slow straight move to this X (mm) started before the count (not awaited).
    slow_move_x: float | None = None


def make_registry() -> Registry:
    reg = Registry()

    @protocol("soak", SoakParams, title="Soak", needs=("sig", "furnace", "gantry"), registry=reg)
    def soak(devices: Any, p: SoakParams) -> Any:
        furnace, gantry = devices["furnace"], devices["gantry"]
        if p.heat_c is not None:
            yield from bps.abs_set(furnace.setpoint, p.heat_c)  # heating while we count
        if p.slow_move_x is not None:
            yield from bps.wait_for([lambda: gantry.client.home()])
            move = gantry.client.move_to(p.slow_move_x, 250.0, 0.0, feed=30.0)
            yield from bps.wait_for([lambda: _background(move)])
        return (yield from bp.count([devices["sig"]], p.num, delay=p.delay))

    return reg


async def _background(coro: Awaitable[Any]) -> None:
    """Start ``coro`` as a task of its own (the plan goes on while it runs)."""
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Future[Any]] = set()


@dataclass
class Bench:
    engine: Engine
    store: Store
    sim: SimCell
    cell: CellDevices
    service: SafetyService
    events: list[dict[str, Any]]
    db: Path

    def call(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.engine.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def action(self, device: str, action: str, **args: Any) -> None:
        self.call(self._action(device, action, args))

    async def _action(self, device: str, action: str, args: dict[str, Any]) -> None:
        await self.sim.device(device).control(action, args)

    def fault(self, device: str, fault: Fault) -> None:
        self.call(self.sim.set_fault(device, fault))

    def clear(self, device: str) -> None:
        self.call(self.sim.clear_fault(device))

    def run(self, **params: Any) -> str:
        item = QueueItem("soak", params, user="tech1", source="test")
        self.store.add(item)
        self.engine.start_queue()
        return item.item_uid

    def interlock_events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "interlock" and e["name"] == name]


until = wait_until  # the name these tests read best with


@pytest.fixture
def bench(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Bench]:
    store = Store(tmp_path / "labd.sqlite")
    sig = soft_signal_rw(float, 0.0, name="sig")
    engine = Engine(store, make_registry(), cell="itest")
    rules = [r.model_copy(update={"resume_after_s": 0.3}) if r.action == "suspend" else r
             for r in default_rules()]
    config = InterlocksConfig(poll_period_s=0.1, poll_timeout_s=1.0, rules=rules)
    events: list[dict[str, Any]] = []

    async def start() -> Bench:
        sim = SimCell(validate_config({
            "cell": "safety-test", "time_scale": TIME_SCALE, "run_dir": str(tmp_path / "run"),
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port}, "control": {"port": 0},
            "devices": {"furnace": {"tcp_port": 0}, "safety": {"period_s": 0.2}},
        }))
        await sim.start()
        cfg = instruments_from_endpoints(sim.endpoints(), overrides={
            "furnace": {"link": {**_furnace_link(sim), "timeout_s": 0.3}},
            "safety": {"max_age_s": 2.0}})
        cell = CellDevices(cfg, client_name="safety-test")
        report = await cell.connect(timeout=10)
        assert report == dict.fromkeys(report), f"devices down: {report}"
        await sig.connect()
        await cell.clients["safety"].wait_ready(5)
        engine.devices = {**cell.available(), "sig": sig}
        service = SafetyService(engine, cell, config, tmp_path / "labd.sqlite")
        await service.start()
        return Bench(engine, store, sim, cell, service, events, tmp_path / "labd.sqlite")

    collecting = threading.Event()

    async def collect() -> None:
        async with engine.events.subscribe() as q:
            collecting.set()
            while True:
                events.append(await q.get())

    collector = asyncio.run_coroutine_threadsafe(collect(), engine.loop)
    collecting.wait(5)
    b = asyncio.run_coroutine_threadsafe(start(), engine.loop).result(60)
    worker = threading.Thread(target=engine.worker, name="worker", daemon=True)
    worker.start()
    yield b

    engine.stop_queue()
    if engine.current is not None:
        from labd.engine import Control

        engine.control(Control.ABORT, "test teardown")
    until(lambda: engine.current is None, 20, "the run to end")
    engine.shutdown()
    worker.join(10)

    async def stop() -> None:
        await b.service.stop()
        await b.cell.close()
        await b.sim.stop()
        for t in list(_BACKGROUND):
            t.cancel()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    collector.cancel()
    b.call(stop(), 30)
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    store.close()


def _furnace_link(sim: SimCell) -> dict[str, Any]:
    d = sim.endpoints()["devices"]["furnace"]
    return {"framing": "tcp", "host": d["tcp_host"], "port": d["tcp_port"]}


def _events_seen(b: Bench, item_uid: str) -> int:
    cur = b.engine.current
    if cur is None or cur.entry.item_uid != item_uid:
        return 0
    return int(cur.progress.get("events", 0))


def _finished(b: Bench, item_uid: str) -> Any:
    try:
        entry = b.store.history_entry(item_uid)
    except StoreError:  # still queued
        return None
    return entry if entry.status is not ExitStatus.RUNNING else None


def _recorded(db: Path) -> list[tuple[str, str, dict[str, Any]]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT name, event, detail FROM interlock_events ORDER BY id")
        return [(n, e, json.loads(d)) for n, e, d in rows.fetchall()]


def _furnace_safe(b: Bench) -> bool:
    st = b.sim.device("furnace").state()
    return bool(st["target_sp"] <= 30.0 and st["instrument_mode"] == 1 and not st["heater_on"])


# -- transient: suspend and resume -----------------------------------------------------------------


def test_glovebox_oxygen_suspends_the_run_and_it_resumes_by_itself(bench: Bench) -> None:
    uid = bench.run(num=150, delay=0.02)
    until(lambda: _events_seen(bench, uid) >= 10, what="the run to count")
    bench.action("safety", "set_o2", ppm=25.0)
    tripped = until(lambda: bench.interlock_events("glovebox-o2"), what="O2 trip")[0]
    assert tripped["event"] == "tripped" and tripped["action"] == "suspend"
    assert "safety.o2_ppm" in tripped["reason"] and tripped["item_uid"] == uid
    # Suspended: the run is still on, and no event comes while O2 is high.
    time.sleep(0.1)  # let an event already in flight land
    frozen = _events_seen(bench, uid)
    time.sleep(0.6)  # a suspended run must stay put for this long (that is what is tested)
    assert _events_seen(bench, uid) == frozen
    assert bench.engine.RE.state == "running" and bench.engine.current is not None
    assert bench.service._start_guard("soak") is None  # a transient interlock blocks nothing

    bench.action("safety", "set_o2", ppm=0.5)
    until(lambda: len(bench.interlock_events("glovebox-o2")) >= 2, what="O2 clear")
    cleared = bench.interlock_events("glovebox-o2")[1]
    assert cleared["event"] == "cleared" and cleared["resume_after_s"] == 0.3
    entry = until(lambda: _finished(bench, uid), 20, "the run to finish")
    assert entry.status is ExitStatus.SUCCESS
    assert [e for e in bench.events if e["type"] == "run_stopped"][-1]["exit_status"] == "success"
    assert [(n, e) for n, e, _ in _recorded(bench.db)] == [
        ("glovebox-o2", "tripped"), ("glovebox-o2", "cleared")]


# -- hard: abort and safe state --------------------------------------------------------------------


def test_estop_aborts_the_run_makes_the_cell_safe_and_blocks_new_items(bench: Bench) -> None:
    uid = bench.run(heat_c=300.0, num=2000)
    until(lambda: bench.sim.device("furnace").state()["target_sp"] >= 299.0, what="heating")
    until(lambda: _events_seen(bench, uid) >= 5)
    bench.action("safety", "press_estop")

    entry = until(lambda: _finished(bench, uid), 10, "the abort")
    assert entry.status is ExitStatus.ABORTED
    assert entry.error is not None and entry.error.startswith("interlock e-stop: safety.estop")
    handled = until(lambda: [e for e in bench.interlock_events("e-stop")
                             if e["event"] == "handled"], what="safe state")[0]
    assert handled["aborted_item"] == uid
    assert all(v == "ok" for v in handled["safe_state"].values()), handled
    assert _furnace_safe(bench)  # heater off, as the simulated controller sees it
    assert not bench.sim.device("gantry").state()["moving"]
    assert bench.sim.device("doser").state()["job"] in (None, "")

    # A new item is refused while the e-stop is pressed ...
    second = bench.run(num=3, delay=0.0)
    blocked = until(lambda: [e for e in bench.events if e["type"] == "queue_blocked"])[0]
    assert blocked["item_uid"] == second and "interlock e-stop is active" in blocked["reason"]
    assert [q.item_uid for q in bench.store.queue()] == [second]
    # ... it cannot be acknowledged while pressed ...
    with pytest.raises(InterlockError, match="its condition still holds"):
        bench.call(bench.service.acknowledge("e-stop", "tech1", "test"))
    # ... and released, it stays latched: still refused, until a technician acknowledges it.
    bench.action("safety", "release_estop")
    until(lambda: not bench.service.active(), what="the e-stop to clear")
    (il,) = [i for i in bench.service.status() if i["name"] == "e-stop"]
    assert il["latched"] and not il["active"] and il["reason"].startswith("safety.estop")
    cleared = until(lambda: [e for e in bench.interlock_events("e-stop")
                             if e["event"] == "cleared"], what="the clear event")
    assert cleared[0]["latched"] is True
    bench.engine.start_queue()
    refused = until(lambda: [e for e in bench.events if e["type"] == "queue_blocked"][1:])[0]
    assert "interlock e-stop tripped (safety.estop" in refused["reason"]
    assert "is latched" in refused["reason"] and "labctl interlocks ack e-stop" in refused["reason"]
    assert [q.item_uid for q in bench.store.queue()] == [second]
    ack = bench.call(bench.service.acknowledge("e-stop", "tech1", "labctl@127.0.0.1"))
    assert ack["latched"] is False
    acked = until(lambda: [e for e in bench.interlock_events("e-stop")
                           if e["event"] == "acknowledged"])[0]
    assert acked["user"] == "tech1" and acked["source"] == "labctl@127.0.0.1"
    with pytest.raises(InterlockError, match="not latched"):
        bench.call(bench.service.acknowledge("e-stop", "tech1", "test"))
    with pytest.raises(KeyError, match="no interlock named 'nope'"):
        bench.call(bench.service.acknowledge("nope", "tech1", "test"))
    bench.engine.start_queue()
    assert until(lambda: _finished(bench, second), 10).status is ExitStatus.SUCCESS
    assert [(n, e) for n, e, _ in _recorded(bench.db)] == [
        ("e-stop", "tripped"), ("e-stop", "handled"), ("e-stop", "cleared"),
        ("e-stop", "acknowledged")]


def test_a_latched_interlock_survives_a_restart_of_the_daemon(bench: Bench) -> None:
    """The latch is rebuilt from the durable event log: a restart (a SIGKILL, a reboot) does not
    clear it. A restart is a new safety service on the same SQLite file."""
    bench.action("safety", "press_estop")
    until(lambda: [e for e in bench.interlock_events("e-stop") if e["event"] == "handled"],
          what="the trip")
    bench.action("safety", "release_estop")
    until(lambda: not bench.service.active(), what="the e-stop to clear")
    bench.call(bench.service.stop())
    again = SafetyService(bench.engine, bench.cell, bench.service.config, bench.db)
    bench.call(again.start())
    bench.service = again  # the fixture stops this one
    (il,) = [i for i in again.status() if i["name"] == "e-stop"]
    assert il["latched"] and not il["active"] and "safety.estop" in il["reason"]
    assert il["trips"] == 1
    refusal = again._start_guard("soak")
    assert refusal is not None and "interlock e-stop tripped" in refusal
    bench.call(again.acknowledge("e-stop", "tech1", "test"))
    assert again._start_guard("soak") is None
    bench.call(again.stop())
    third = SafetyService(bench.engine, bench.cell, bench.service.config, bench.db)
    bench.call(third.start())
    bench.service = third
    assert not any(i["latched"] for i in third.status())  # the acknowledgement is durable too


def test_furnace_over_temperature_alarm_aborts_and_makes_safe(bench: Bench) -> None:
    # Holding a setpoint (no move in progress: a move would fail the plan itself, with the
    # driver's FurnaceAlarm, before the interlock could abort it).
    bench.call(bench.cell.clients["furnace"].set_setpoint(200.0))
    uid = bench.run(num=2000)
    until(lambda: _events_seen(bench, uid) >= 5)
    bench.fault("furnace", Fault(kind=FaultKind.ALARM))
    entry = until(lambda: _finished(bench, uid), 10, "the abort")
    assert entry.status is ExitStatus.ABORTED
    assert entry.error and "interlock furnace-over-temperature" in entry.error
    until(lambda: [e for e in bench.interlock_events("furnace-over-temperature")
                   if e["event"] == "handled"], what="safe state")
    assert _furnace_safe(bench)
    assert bench.sim.device("furnace").state()["alarms"]["overtemp_latched"]


def test_door_opened_while_the_gantry_moves_aborts(bench: Bench) -> None:
    bench.action("safety", "open_door")  # open while idle and still: no interlock
    time.sleep(0.3)  # several poll periods with the door open and the gantry still
    assert not bench.interlock_events("door-open-while-moving")
    bench.action("safety", "close_door")
    bench.sim.clock.set_time_scale(3000.0)  # homing, quickly
    uid = bench.run(slow_move_x=400.0, num=4000)
    until(lambda: bench.sim.device("gantry").state()["homed"], 20, "homing")
    bench.sim.clock.set_time_scale(TIME_SCALE)  # the slow move: some 8 s of wall time
    until(lambda: bench.sim.device("gantry").state()["moving"], 20, "the slow move")
    bench.action("safety", "open_door")
    entry = until(lambda: _finished(bench, uid), 10, "the abort")
    assert entry.status is ExitStatus.ABORTED
    assert entry.error and "gantry.moving and safety.door_open" in entry.error
    until(lambda: [e for e in bench.interlock_events("door-open-while-moving")
                   if e["event"] == "handled"], what="safe state")
    gantry = bench.sim.device("gantry").state()
    assert not gantry["moving"] and gantry["planner_blocks"] == 0
    assert gantry["position"][0] < 390.0  # stopped on the way, not at the target


def test_a_furnace_that_stops_answering_during_a_run_aborts_it(bench: Bench) -> None:
    bench.fault("furnace", Fault(kind=FaultKind.NO_REPLY))  # idle: not armed (during_run)
    # Not armed while idle, but nothing new may start.
    refusal = until(lambda: bench.service._start_guard("soak"), what="the polls to fail")
    assert "device-not-answering" in refusal and "furnace is not answering" in refusal
    assert not bench.interlock_events("device-not-answering")
    bench.clear("furnace")
    until(lambda: not bench.service._start_guard("soak"), what="the furnace to answer")

    uid = bench.run(num=4000)
    until(lambda: _events_seen(bench, uid) >= 5)
    bench.fault("furnace", Fault(kind=FaultKind.NO_REPLY))
    entry = until(lambda: _finished(bench, uid), 15, "the abort")
    assert entry.status is ExitStatus.ABORTED
    assert entry.error and "furnace is not answering" in entry.error
    handled = until(lambda: [e for e in bench.interlock_events("device-not-answering")
                             if e["event"] == "handled"], 15, "safe state")[0]
    assert handled["safe_state"]["furnace"] != "ok"  # it cannot be reached: said so
    assert handled["safe_state"]["gantry"] == "ok"
    bench.clear("furnace")
    until(lambda: not bench.service.active(), what="the interlock to clear")


# -- configuration and logs ------------------------------------------------------------------------


def test_interlock_config_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError) as e:
        validate_daemon_config({"interlocks": {"rules": [
            {"name": "o2", "when": "safety.o2 > 10", "action": "suspend"}]}})
    assert "unknown value 'safety.o2'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_daemon_config({"interlocks": {"rules": [
            {"name": "x", "when": "safety.estop > 1", "action": "abort"}]}})
    assert "safety.estop is true/false, compared with 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_daemon_config({"interlocks": {"rules": [
            {"name": "x", "device_down": "balance", "action": "abort"}]}})
    assert "device_down cannot watch ['balance']" in str(e.value)
    with pytest.raises(ValidationError, match="exactly one of 'when' or 'device_down'"):
        InterlockConfig(name="x", action="abort")
    with pytest.raises(ValidationError, match="latch is for abort interlocks"):
        InterlockConfig(name="x", when="safety.o2_ppm > 10", action="suspend", latch=True)
    assert InterlockConfig(name="x", when="safety.estop", action="abort").latch is True
    unlatched = InterlockConfig(name="x", when="safety.estop", action="abort", latch=False)
    assert unlatched.latch is False
    with pytest.raises(ConfigError, match="action"):
        validate_daemon_config({"interlocks": {"rules": [
            {"name": "x", "when": "safety.estop", "action": "explode"}]}})
    cfg = validate_daemon_config({"interlocks": {"rules": [
        {"name": "hot", "when": "(furnace.temperature >= 900 or furnace.sensor_break) "
                                "and not safety.door_open == true", "action": "abort"}]}})
    assert cfg.interlocks.rules is not None and cfg.interlocks.rules[0].devices() == {
        "furnace", "safety"}


def test_interlock_events_log_their_fields_as_json(bench: Bench,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="labd.safety"):
        bench.action("safety", "press_estop")
        until(lambda: [r for r in caplog.records if "handled" in r.getMessage()])
    tripped = next(r for r in caplog.records if "tripped" in r.getMessage())
    out = json.loads(JsonFormatter().format(tripped))
    assert out["interlock"] == "e-stop" and out["action"] == "abort"
    assert out["event"] == "tripped" and "safety.estop" in out["reason"]
    assert out["level"] == "WARNING"


def test_the_example_real_cell_config_loads() -> None:
    from labd.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "labd-example.yaml")
    assert not cfg.simulator.enabled and cfg.interlocks.rules is not None
    names = {r.name: r for r in cfg.interlocks.rules}
    assert names["glovebox-o2"].action == "suspend"
    assert names["device-not-answering"].during_run is True
    assert cfg.instruments_config().furnace is not None
