"""Whether an MQTT instrument is there: its retained ``<root>/status`` and its last will.

An MQTT device announces itself with a retained ``{"state": "online", ...}`` on ``<root>/status``
and leaves a last will of ``{"state": "offline"}`` with the broker, so when it vanishes (power
loss, crash, network gone for 1.5 x keepalive) the broker tells every subscriber at once. This
is the only way a subscriber learns that a device is *gone*, rather than merely quiet, so the
protocol clients (station, safety sensors) share this one tracker of it::

    presence = Presence("station", conn, "labd-sim/cell1/station")
    await presence.start()                 # subscribes (retained status arrives on subscribe)
    await presence.wait_online(5.0)        # NotConnected if it is not online in time
    presence.state                         # "unknown" | "online" | "offline"
    remove = presence.on_change(lambda state: ...)

States: ``unknown`` until the first status arrives (or when the retained status is cleared, an
empty payload), then whatever the device last said. A status payload that is not JSON, or has no
``state`` of ``online``/``offline``, is logged and leaves the state ``unknown``: a device whose
presence cannot be read is not trusted to be there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from ..errors import NotConnected
from ..transports.mqtt import MqttConnection, MqttMessage, Subscription

log = logging.getLogger(__name__)

State = Literal["unknown", "online", "offline"]
StateListener = Callable[[State], None]


class Presence:
    """Tracks one device's retained status topic (``<root>/status``)."""

    def __init__(self, device: str, conn: MqttConnection, root: str) -> None:
        self.device = device
        self.conn = conn
        self.topic = f"{root}/status"
        self.state: State = "unknown"
        #: The rest of the last online status (``model``, ``serial``, ``ts``...).
        self.info: dict[str, Any] = {}
        #: Local time (``time.time()``) of the last state change.
        self.changed_at: float | None = None
        #: How many times the device was seen going offline (its will, or a clean stop).
        self.offline_count = 0
        self._online = asyncio.Event()
        self._offline = asyncio.Event()
        self._listeners: list[StateListener] = []
        self._sub: Subscription | None = None

    @property
    def online(self) -> bool:
        """True when the broker link is up and the device's last word was ``online``."""
        return self.conn.connected and self.state == "online"

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.conn.subscribe(self.topic, self._on_status)
            # The broker sends a retained status once per broker subscription: if another
            # client on this connection already subscribed, it arrived before us.
            latest = self.conn.latest(self.topic)
            if latest is not None and self.state == "unknown":
                self._on_status(latest)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    def on_change(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(state)`` on every state change; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def wait_online(self, timeout: float, command: str | None = None) -> None:
        """Return when the device is online; :class:`NotConnected` after ``timeout`` seconds."""
        if self.online:
            return
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self.conn.connected_event.wait()
                await self._online.wait()
        except TimeoutError:
            why = (
                f"broker {self.conn.host}:{self.conn.port} not connected"
                if not self.conn.connected
                else f"device status is {self.state!r} on {self.topic}"
            )
            raise NotConnected(
                self.device, command, f"not online within {timeout:g} s ({why})"
            ) from None
        if not self.online and time.monotonic() < deadline:  # pragma: no cover - a race
            await self.wait_online(deadline - time.monotonic(), command)

    async def wait_offline(self) -> None:
        """Return when the device goes (or is) offline."""
        await self._offline.wait()

    def _on_status(self, msg: MqttMessage) -> None:
        state: State = "unknown"
        info: dict[str, Any] = {}
        if msg.payload:
            try:
                body = msg.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("state") in ("online", "offline"):
                state = body["state"]
                info = {k: v for k, v in body.items() if k != "state"}
            else:
                log.warning("%s: unreadable status on %s: %r", self.device, msg.topic, msg.payload)
        self._set(state, info)

    def _set(self, state: State, info: dict[str, Any]) -> None:
        if state == "online":
            self.info = info
        if state == self.state:
            return
        log.info("%s: status %s -> %s", self.device, self.state, state)
        self.state = state
        self.changed_at = time.time()
        if state == "online":
            self._offline.clear()
            self._online.set()
        else:
            self._online.clear()
            if state == "offline":
                self.offline_count += 1
                self._offline.set()
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("%s: presence listener failed", self.device)
