"""Cell safety sensors behind an MQTT gateway: glovebox O2 and H2O (ppm), door switch, e-stop.

The gateway only publishes (it takes no commands), retained and at QoS 1 (``R`` = the link's
``topic``): ``R/status`` ``{"state": "online"|"offline"}`` with a last will of ``offline``;
``R/telemetry/o2_ppm`` and ``R/telemetry/h2o_ppm`` ``{"value": 0.61, "unit": "ppm", "ts"}``;
``R/telemetry/door_open`` and ``R/telemetry/estop`` ``{"value": false, "ts"}``. A sensor in fault
publishes ``{"value": null, "error": {"code", "message"}}``.

::

    safety = SafetySensors("safety", SafetySettings(link=MqttLink(topic=root)), links)
    await safety.start()
    await safety.wait_ready(5.0)           # online and all four readings received
    safety.oxygen_ppm                      # fresh value, or a DriverError that says why not
    async with safety.changes() as events: # for the daemon's interlocks
        async for ev in events: ...        # SafetyEvent: reading / status / stale
    remove = safety.on_change(callback)

Fail closed. The value properties (:attr:`SafetySensors.oxygen_ppm`, ...) never hand out a value
that cannot be trusted: they raise :class:`~drivers.errors.NotConnected` when the gateway is
offline (its last will fired) or nothing was received yet, :class:`~drivers.errors.InstrumentError`
with the sensor's code when it reports a fault, and :class:`~drivers.errors.DeviceTimeout` when
the last reading is older than ``max_age_s`` (a hung gateway keeps its retained status online but
stops publishing; the broker link may also be down). An interlock that catches
:class:`~drivers.errors.DriverError` therefore treats "unknown" like "unsafe".

Staleness is measured on the local clock (when the reading *arrived*), not on the gateway's
``ts``: the gateway's clock is not ours (the simulator's runs at the virtual time scale), and an
age computed across two clocks is meaningless. ``ts`` is kept on each reading for the record.

Events (:meth:`SafetySensors.changes`, :meth:`SafetySensors.on_change`) are emitted when a
reading's value or error changes, when a stale reading becomes fresh again, when a reading goes
stale (a watchdog checks every ``max_age_s / 4``; after ``offline`` every reading counts as
stale until it arrives again), and on every status change (``offline`` is the
last will). A payload that cannot be read is logged and dropped: the previous reading ages and goes
stale, which is what the interlocks see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import DeviceTimeout, InstrumentError, NotConnected, ProtocolError
from ..links import Links, MqttLink
from ..transports.mqtt import MqttMessage, Subscription
from .mqtt_presence import Presence, State

log = logging.getLogger(__name__)

Key = Literal["o2_ppm", "h2o_ppm", "door_open", "estop"]
KEYS: tuple[Key, ...] = ("o2_ppm", "h2o_ppm", "door_open", "estop")
PPM_KEYS: tuple[Key, ...] = ("o2_ppm", "h2o_ppm")


class SafetySettings(BaseModel):
    """Where the gateway is, and how old a reading may be before it is not trusted."""

    model_config = ConfigDict(extra="forbid")

    link: MqttLink
    #: A reading older than this (local seconds since it arrived) is stale. The gateway
    #: publishes every second or so; a few periods tolerate jitter, not a hung gateway.
    max_age_s: float = Field(default=5.0, gt=0)
    #: Seconds :meth:`SafetySensors.wait_ready` waits by default.
    ready_timeout_s: float = Field(default=5.0, gt=0)


@dataclass(frozen=True)
class SafetyReading:
    """One sensor reading as published (``value`` None when the sensor reports an error)."""

    key: Key
    value: float | bool | None
    unit: str | None
    #: The gateway's timestamp (its own clock).
    ts: float | None
    #: Local ``time.time()`` when it arrived (what staleness is measured on).
    received_at: float
    error_code: int | str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None and self.error_code is None and self.error_message is None

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.received_at


@dataclass(frozen=True)
class SafetyEvent:
    """A change the interlocks may care about.

    ``kind``: ``reading`` (new value/error, or fresh again after stale; ``reading`` set),
    ``stale`` (``key``'s reading is older than ``max_age_s``), ``status`` (``state`` changed).
    """

    device: str
    kind: Literal["reading", "stale", "status"]
    state: State
    key: Key | None = None
    reading: SafetyReading | None = None


EventListener = Callable[[SafetyEvent], None]


class SafetySensors:
    """Protocol client of the safety gateway (see the module docstring)."""

    def __init__(self, name: str, settings: SafetySettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self.conn = links.mqtt(settings.link)
        self.root = settings.link.topic.rstrip("/")
        self.presence = Presence(name, self.conn, self.root)
        self._readings: dict[Key, SafetyReading] = {}
        self._stale: set[Key] = set()
        self._listeners: list[EventListener] = []
        self._sub: Subscription | None = None
        self._remove_presence: Callable[[], None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        #: Telemetry payloads that could not be read (dropped).
        self.unreadable = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe (retained values arrive at once; restored after a broker restart), start
        the staleness watchdog and the broker connection. Idempotent."""
        if self._remove_presence is None:
            self._remove_presence = self.presence.on_change(self._on_presence)
        await self.presence.start()
        if self._sub is None:
            self._sub = await self.conn.subscribe(f"{self.root}/telemetry/+", self._on_telemetry)
            for key in KEYS:  # retained values another client on this connection received
                msg = self.conn.latest(f"{self.root}/telemetry/{key}")
                if msg is not None and key not in self._readings:
                    self._on_telemetry(msg)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name=f"{self.name}-stale-watch")
        await self.conn.start()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        if self._remove_presence is not None:
            self._remove_presence()
            self._remove_presence = None
        await self.presence.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return when the gateway is online and every reading has arrived."""
        t = self.settings.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + t
        await self.presence.wait_online(t, "wait ready")
        while any(k not in self._readings for k in KEYS):
            if time.monotonic() > deadline:
                missing = [k for k in KEYS if k not in self._readings]
                raise NotConnected(self.name, "wait ready", f"no reading of {missing} in {t:g} s")
            await asyncio.sleep(0.01)

    # -- state --------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.presence.online

    @property
    def state(self) -> State:
        return self.presence.state

    def reading(self, key: Key) -> SafetyReading | None:
        """The latest reading of ``key`` as received (no freshness check)."""
        return self._readings.get(key)

    def is_stale(self, key: Key, now: float | None = None) -> bool:
        r = self._readings.get(key)
        return r is None or r.age(now) > self.settings.max_age_s

    @property
    def oxygen_ppm(self) -> float:
        """Glovebox O2 in ppm (fresh, or a DriverError: see the module docstring)."""
        return float(self._fresh("o2_ppm"))

    @property
    def water_ppm(self) -> float:
        """Glovebox H2O in ppm."""
        return float(self._fresh("h2o_ppm"))

    @property
    def door_open(self) -> bool:
        return bool(self._fresh("door_open"))

    @property
    def estop(self) -> bool:
        """True while the emergency stop is pressed."""
        return bool(self._fresh("estop"))

    def _fresh(self, key: Key) -> float | bool:
        command = f"read {key}"
        if self.presence.state == "offline":
            raise NotConnected(self.name, command, "the safety gateway is offline (last will)")
        r = self._readings.get(key)
        if r is None:
            raise NotConnected(self.name, command, f"no {key} reading received yet")
        if not r.ok:
            if r.error_code is not None or r.error_message is not None:
                raise InstrumentError(self.name, command, r.error_code, r.error_message or "")
            raise ProtocolError(self.name, command, "reading has no value")
        age = r.age()
        if age > self.settings.max_age_s:
            raise DeviceTimeout(
                self.name, command, self.settings.max_age_s,
                f"the last {key} reading is {age:.1f} s old (max {self.settings.max_age_s:g} s)",
            )
        assert r.value is not None
        return r.value

    # -- events -------------------------------------------------------------------------------
    def on_change(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` for every :class:`SafetyEvent`; returns a remover."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    @contextlib.asynccontextmanager
    async def changes(self, maxsize: int = 1000) -> AsyncIterator[AsyncIterator[SafetyEvent]]:
        """``async with safety.changes() as events: async for ev in events: ...``"""
        queue: asyncio.Queue[SafetyEvent] = asyncio.Queue(maxsize)

        def put(ev: SafetyEvent) -> None:
            if queue.full():  # a slow consumer loses the oldest, never blocks the transport
                queue.get_nowait()
            queue.put_nowait(ev)

        async def iterate() -> AsyncIterator[SafetyEvent]:
            while True:
                yield await queue.get()

        remove = self.on_change(put)
        try:
            yield iterate()
        finally:
            remove()

    def _emit(self, ev: SafetyEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:
                log.exception("%s: safety listener failed", self.name)

    def _on_presence(self, state: State) -> None:
        if state == "offline":  # nothing it said is trusted now: the next readings are news
            self._stale.update(self._readings)
        self._emit(SafetyEvent(self.name, "status", state))

    def _on_telemetry(self, msg: MqttMessage) -> None:
        key = msg.topic.rsplit("/", 1)[-1]
        if key not in KEYS:
            return
        if not msg.payload:  # retained value cleared
            return
        reading = self._parse(key, msg)  # type: ignore[arg-type]
        if reading is None:
            self.unreadable += 1
            return
        old = self._readings.get(reading.key)
        self._readings[reading.key] = reading
        was_stale = reading.key in self._stale
        self._stale.discard(reading.key)
        if (
            old is None
            or was_stale
            or old.value != reading.value
            or old.error_code != reading.error_code
        ):
            self._emit(SafetyEvent(self.name, "reading", self.presence.state, reading.key, reading))

    def _parse(self, key: Key, msg: MqttMessage) -> SafetyReading | None:
        try:
            body = msg.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "value" not in body:
            log.warning("%s: unreadable telemetry on %s: %r", self.name, msg.topic, msg.payload)
            return None
        value: Any = body["value"]
        err = body.get("error")
        code: int | str | None = None
        message: str | None = None
        if isinstance(err, dict):
            code = err.get("code")
            message = str(err.get("message", ""))
        elif err is not None:
            message = str(err)
        ts = body.get("ts")
        ts = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None
        if value is not None:
            if key in PPM_KEYS:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                ):
                    log.warning("%s: %s is not a number: %r", self.name, key, value)
                    return None
                value = float(value)
            elif not isinstance(value, bool):
                log.warning("%s: %s is not a boolean: %r", self.name, key, value)
                return None
        unit = body.get("unit") if isinstance(body.get("unit"), str) else None
        return SafetyReading(key, value, unit, ts, msg.received_at, code, message)

    async def _watch(self) -> None:
        """Emit ``stale`` once per reading that stops arriving (hung gateway, broker down)."""
        period = self.settings.max_age_s / 4
        while True:
            await asyncio.sleep(period)
            now = time.time()
            for key, r in list(self._readings.items()):
                if key not in self._stale and r.age(now) > self.settings.max_age_s:
                    self._stale.add(key)
                    log.warning("%s: %s reading is stale (%.1f s old)", self.name, key, r.age(now))
                    self._emit(SafetyEvent(self.name, "stale", self.presence.state, key, r))
