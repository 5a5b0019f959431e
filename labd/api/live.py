"""Live state for clients: device values, run progress, and their push onto the event bus.

* :class:`DeviceReader` reads every device's ``read()`` (and, once, ``describe()`` for units and
  limits) on the daemon's loop, concurrently, each with a short timeout; a device that is down,
  slow or raising is reported with its error, and the others are still read.
* :class:`ProgressTracker` subscribes to the RunEngine's documents and publishes ``run_progress``
  events (at most ``max_rate`` per second, and always the last event of a run) with the number of
  events, the expected total (``num_points`` of the start document, when the plan says it) and
  the fraction done.
* :class:`DeviceMonitor` reads the devices every ``interval_s`` while at least one WebSocket client
  is connected, and publishes a ``device_values`` event for each device whose values or state
  changed: clients never poll, and nothing polls the instruments when nobody is watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..events import EventBus


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of a reading value (numpy scalars and arrays, enums, NaN)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


_META_KEYS = ("units", "precision", "limits", "dtype", "shape", "choices")


def _signal_order(device: Any) -> Callable[[tuple[str, Any]], tuple[int, str]]:
    """A stable order for a device's readings: its hinted fields first (the values that matter,
    in the device's order), then the rest by name. ophyd-async merges a device's readings in no
    fixed order, and a dashboard whose rows move around between refreshes is hard to read."""
    hints = getattr(device, "hints", None)
    fields = list(hints.get("fields", [])) if isinstance(hints, dict) else []

    def key(item: tuple[str, Any]) -> tuple[int, str]:
        name = item[0]
        return (fields.index(name), "") if name in fields else (len(fields), name)

    return key


class DeviceReader:
    """Reads the cell's devices. ``devices`` returns ``{name: device}``; ``down`` returns
    ``{name: reason}`` for the devices known to be disconnected (not read)."""

    def __init__(
        self,
        devices: Callable[[], Mapping[str, Any]],
        down: Callable[[], Mapping[str, str]],
        timeout_s: float = 2.0,
    ) -> None:
        self._devices = devices
        self._down = down
        self.timeout_s = timeout_s
        self._meta: dict[str, dict[str, dict[str, Any]]] = {}

    async def _describe(self, name: str, device: Any) -> dict[str, dict[str, Any]]:
        if name not in self._meta:
            desc = await device.describe()
            self._meta[name] = {
                key: {k: jsonable(v) for k, v in d.items() if k in _META_KEYS}
                for key, d in desc.items()
            }
        return self._meta[name]

    async def read_one(self, name: str, device: Any) -> dict[str, Any]:
        reason = self._down().get(name)
        if reason is not None:
            return {"connected": False, "error": reason, "values": {}}
        try:
            async with asyncio.timeout(self.timeout_s):
                reading, meta = await asyncio.gather(device.read(), self._describe(name, device))
        except TimeoutError:
            return {"connected": True, "error": f"read timed out after {self.timeout_s:g} s",
                    "values": {}}
        except Exception as exc:
            text = str(exc).strip().replace("\n", " ") or type(exc).__name__
            return {"connected": True, "error": f"{type(exc).__name__}: {text}", "values": {}}
        values = {
            key: {"value": jsonable(r.get("value")), "timestamp": r.get("timestamp"),
                  **meta.get(key, {}),
                  **({"alarm_severity": r["alarm_severity"]} if r.get("alarm_severity") else {})}
            for key, r in sorted(reading.items(), key=_signal_order(device))
        }
        return {"connected": True, "error": None, "values": values}

    async def read_all(self) -> dict[str, dict[str, Any]]:
        """``{name: {connected, error, values: {signal: {value, timestamp, units, ...}}}}``."""
        devices = {n: d for n, d in self._devices().items() if callable(getattr(d, "read", None))}
        for name in self._down():
            devices.setdefault(name, None)
        names = sorted(devices)
        results = await asyncio.gather(*(self.read_one(n, devices[n]) for n in names))
        return dict(zip(names, results, strict=True))


class ProgressTracker:
    """Run progress from the RunEngine's documents, published as ``run_progress`` events.

    Called in the RunEngine's loop thread (document callbacks); :meth:`progress` may be read from
    any thread."""

    def __init__(self, bus: EventBus, item_uid: Callable[[], str | None],
                 max_rate: float = 10.0) -> None:
        self.bus = bus
        self._item_uid = item_uid
        self._min_interval = 1.0 / max_rate
        self._lock = threading.Lock()
        self._run: dict[str, Any] | None = None
        self._last_publish = 0.0
        self._published = -1

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "start":
            total = doc.get("num_points")
            with self._lock:
                self._run = {"run_uid": doc["uid"], "item_uid": self._item_uid(), "events": 0,
                             "total": int(total) if isinstance(total, int | float) else None,
                             "plan_name": doc.get("plan_name")}
            self._publish(force=True)
        elif name == "event":
            with self._lock:
                if self._run is None:
                    return
                self._run["events"] += 1
                last = self._run["total"] is not None and self._run["events"] >= self._run["total"]
            self._publish(force=last)
        elif name == "stop":  # what the throttle held back (no total, or the run ended early)
            with self._lock:
                pending = self._run is not None and self._run["events"] != self._published
            if pending:
                self._publish(force=True)

    def progress(self) -> dict[str, Any] | None:
        with self._lock:
            if self._run is None:
                return None
            run = dict(self._run)
        total = run["total"]
        run["fraction"] = min(1.0, run["events"] / total) if total else None
        return run

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_publish < self._min_interval:
            return
        self._last_publish = now
        progress = self.progress()
        if progress is not None:
            self._published = progress["events"]
            self.bus.publish("run_progress", **progress)


class DeviceMonitor:
    """Pushes device values while someone watches (see the module's docstring)."""

    def __init__(self, reader: DeviceReader, bus: EventBus, interval_s: float = 2.0) -> None:
        self.reader = reader
        self.bus = bus
        self.interval_s = interval_s
        self.watchers = 0
        self._watched = asyncio.Event()
        self._last: dict[str, Any] = {}

    @contextlib.contextmanager
    def watching(self) -> Any:
        self.watchers += 1
        self._watched.set()
        try:
            yield
        finally:
            self.watchers -= 1
            if self.watchers == 0:
                self._watched.clear()

    async def run(self) -> None:
        while True:
            await self._watched.wait()
            values = await self.reader.read_all()
            for name, state in values.items():
                comparable = {
                    "connected": state["connected"], "error": state["error"],
                    "values": {k: v["value"] for k, v in state["values"].items()},
                }
                if self._last.get(name) != comparable:
                    self._last[name] = comparable
                    self.bus.publish("device_values", name=name, **state)
            await asyncio.sleep(self.interval_s)
