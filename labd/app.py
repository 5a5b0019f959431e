"""The daemon: wires the store, the engine, the devices, the services, and runs until SIGTERM.

Start-up order: durable state first (the store recovers what a killed daemon left running), then
the RunEngine (its loop is the daemon's loop), the simulated cell if configured (or re-attached
if a killed predecessor left it running), the devices (one that does not answer is reported down
and retried in the background; the others work), the services (API, safety, hub) on the loop, and
last the worker thread that runs protocols. Then ``READY=1``.

Shutdown (SIGTERM, SIGINT): stop taking work, abort what runs, bring every device to its safe state,
stop the services, finish writing, exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from drivers.cell import CellDevices, InstrumentsConfig, instruments_from_endpoints
from protocols.registry import REGISTRY, Registry

from . import systemd
from .config import DaemonConfig
from .engine import Control, Engine, EngineState
from .hubservice import HubService
from .journal import Journal
from .simulator import SimulatorProcess
from .store import Store

log = logging.getLogger("labd")

T = TypeVar("T")


class Service(Protocol):
    """Something that runs on the daemon's loop for the daemon's lifetime."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    def __init__(self, config: DaemonConfig, registry: Registry = REGISTRY) -> None:
        self.config = config
        self.registry = registry
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.data_dir / "labd.sqlite")
        # The document journal is the RunEngine's first subscriber: every document is journaled
        # before the engine, a service or a forwarder sees it.
        self.journal = Journal(config.data_dir / "journal.sqlite",
                               synchronous=config.hub.journal.synchronous)
        self.engine = Engine(self.store, registry, cell=config.cell,
                             first_subscribers=[self.journal.subscriber])
        self.hub: HubService | None = None
        self.loop = self.engine.loop
        self.events = self.engine.events
        self.sim: SimulatorProcess | None = None
        self.endpoints: dict[str, Any] = {}
        self.cell: CellDevices | None = None
        self.layout: Any = None
        self.services: list[Service] = []
        self.started = time.time()
        self.stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._ready = threading.Event()

    # -- helpers -----------------------------------------------------------------------------------
    def call(self, coro: Awaitable[T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` on the daemon's loop from another thread and wait for it."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` on the daemon's loop for the daemon's lifetime."""
        self._tasks.append(asyncio.run_coroutine_threadsafe(coro, self.loop))  # type: ignore[arg-type]

    def status(self) -> dict[str, Any]:
        cell = self.cell
        return {
            **self.engine.status(),
            "uptime_s": time.time() - self.started,
            "simulated": self.sim is not None,
            "devices": {
                name: {"connected": name not in cell.down, "error": cell.down.get(name)}
                for name in cell.devices
            } if cell else {},
            "services": [s.name for s in self.services],
            "hub": self.hub.status() if self.hub is not None else None,
            "interlocks": next((s.status() for s in self.services if s.name == "safety"), []),
        }

    # -- start-up ----------------------------------------------------------------------------------
    def instruments(self) -> InstrumentsConfig:
        if self.config.simulator.enabled:
            return instruments_from_endpoints(self.endpoints, self.config.instruments)
        return self.config.instruments_config()

    def build_layout(self) -> Any:
        if self.config.layout is None and not self.endpoints:
            return None
        from protocols.layout import CellLayout, layout_from_endpoints

        if self.config.layout is not None:
            return CellLayout.model_validate(self.config.layout)
        return layout_from_endpoints(self.endpoints)

    def make_services(self) -> list[Service]:
        """The services of this daemon (API, safety, hub). Each is started on the loop in order
        and stopped in reverse order."""
        from .api.campaigns import campaigns_router
        from .api.hub import hub_router
        from .api.server import ApiService
        from .campaigns import CampaignService
        from .safety import SafetyService
        from .web import configure as dashboard

        assert self.cell is not None
        campaigns = CampaignService(self)
        self.hub = HubService(self.journal, self.config.hub, self.config.cell)
        return [SafetyService(self.engine, self.cell, self.config.interlocks, self.store.path),
                self.hub, campaigns,
                ApiService(self, extra_routers=[campaigns_router(campaigns), hub_router(self)],
                           configure=[dashboard])]

    def start(self) -> None:
        cfg = self.config
        systemd.notify("STATUS=recovering state")
        interrupted = self.store.recover()
        for entry in interrupted:
            log.warning("%s (%s) was running when the daemon stopped: recorded as interrupted",
                        entry.protocol, entry.item_uid)
            self.events.publish("item_interrupted", item=entry.to_dict())
        if not cfg.queue.autostart:
            self.store.set_value("queue_running", False)
        if cfg.simulator.enabled:
            systemd.notify("STATUS=starting the simulated cell")
            self.sim = SimulatorProcess(cfg.simulator, cfg.data_dir, cfg.cell)
            self.endpoints = self.sim.start()
        systemd.notify("STATUS=connecting devices")
        instruments = self.instruments()

        async def make_cell() -> CellDevices:  # transports bind to the loop they are made on
            return CellDevices(instruments, client_name=f"labd-{cfg.cell}",
                               status_topic=f"labd/{cfg.cell}/status")

        self.cell = self.call(make_cell())
        report = self.call(self.cell.connect(cfg.device_timeout_s),
                           timeout=cfg.device_timeout_s + 30)
        for name, reason in report.items():
            self.events.publish("device", name=name, connected=reason is None, error=reason)
        if interrupted:
            self._make_safe("a run was interrupted when the daemon stopped", logging.WARNING)
        self.layout = self.build_layout()
        self._refresh_devices()
        self.spawn(self._retry_devices())
        for service in self.make_services():
            systemd.notify(f"STATUS=starting {service.name}")
            self.call(service.start())
            self.services.append(service)
        interval = systemd.watchdog_interval()
        if interval:
            self.spawn(systemd.watchdog(lambda: not self.stopping.is_set(), interval))
        self._worker = threading.Thread(target=self.engine.worker, name="labd-worker",
                                        daemon=True)
        self._worker.start()
        down = [n for n, r in report.items() if r]
        systemd.notify("READY=1", f"STATUS=ready; devices down: {', '.join(down) or 'none'}")
        self._ready.set()

    def _make_safe(self, why: str, level: int) -> None:
        """Drive every device to its safe state (heaters off, motion stopped, dosing stopped).

        At start-up after an interrupted run too: the devices kept the state that run left
        them in (a re-attached simulated cell, or real hardware, does not reset with the
        daemon): a furnace still heating its program, a gripper still closed."""
        assert self.cell is not None
        try:
            failures = self.call(self.cell.safe_state(), timeout=40)
        except Exception as exc:
            log.error("safe state (%s) failed: %s", why, exc)
            return
        for name, err in failures.items():
            if err:
                log.error("%s may not be safe: %s", name, err)
        log.log(level, "every device driven to its safe state: %s", why)
        self.events.publish("safe_state", reason=why,
                            devices={d: (e or "ok") for d, e in failures.items()})

    def _refresh_devices(self) -> None:
        assert self.cell is not None
        devices: dict[str, Any] = dict(self.cell.available())
        if self.layout is not None:
            devices["layout"] = self.layout
        self.engine.devices = devices

    async def _retry_devices(self) -> None:
        assert self.cell is not None
        while not self.stopping.is_set():
            await asyncio.sleep(self.config.device_retry_s)
            if not self.cell.down:
                continue
            changed = await self.cell.retry_down(self.config.device_timeout_s)
            if changed:
                self._refresh_devices()
                for name in changed:
                    self.events.publish("device", name=name, connected=True, error=None)

    # -- run and stop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, then wait (in the main thread) for SIGTERM/SIGINT, then shut down cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        while not self.stopping.wait(0.5):
            pass
        log.info("stopping")
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        systemd.notify("STOPPING=1", "STATUS=stopping: bringing the cell to its safe state")
        self.stopping.set()
        engine = self.engine
        engine.queue_running = False  # stop taking work (the stored flag is kept for autostart)
        if engine.state in (EngineState.RUNNING, EngineState.PAUSED):
            try:
                engine.control(Control.ABORT, "labd is shutting down")
            except Exception as exc:
                log.error("could not abort the running protocol: %s", exc)
            deadline = time.monotonic() + 30
            while engine.state is not EngineState.IDLE and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.cell is not None:
            self._make_safe("labd is stopping", logging.INFO)
        for service in reversed(self.services):
            try:
                self.call(service.stop(), timeout=15)
            except Exception as exc:
                log.error("stopping %s: %s", service.name, exc)
        self.services.clear()
        for task in self._tasks:
            task.cancel()
        engine.shutdown()
        if self._worker is not None:
            self._worker.join(30)
        if self.cell is not None:
            try:
                self.call(self.cell.close(), timeout=15)
            except Exception as exc:
                log.error("closing devices: %s", exc)
        if self.sim is not None:
            self.sim.stop()
        self.journal.close()
        self.store.close()
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(cancel_rest(), timeout=10)
        except Exception as exc:
            log.debug("cancelling leftover tasks: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)


