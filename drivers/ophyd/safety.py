"""ophyd-async device of the cell safety sensors, on pushed MQTT telemetry.

Each sensor is a read-only signal on a :class:`~drivers.ophyd.backends.PushSignalBackend`, updated
by the protocol client's events (no polling: the gateway pushes)::

    safety = make_safety_device("safety", client)
    await safety.connect()          # subscribes; waits for the first (retained) values
    RE(bp.count([safety], 3))

A reading the client no longer trusts keeps its last value with ``alarm_severity`` INVALID
(``mark_stale``): when the gateway's last will fires (``offline``), when a sensor reports an
error (its value is null), and when a reading is older than the client's ``max_age_s``. The next
good reading clears it. Reading timestamps are local arrival times (see
:mod:`drivers.instruments.safety` for why not the gateway's clock).

Sensors have nothing to stop or make safe: :meth:`SafetySensors.safe_state` is a no-op that
exists so the daemon's safety layer can treat every device alike.
"""

from __future__ import annotations

from collections.abc import Callable

from ophyd_async.core import SignalR, StandardReadable, StandardReadableFormat

from ..instruments.safety import KEYS, Key, SafetyEvent
from ..instruments.safety import SafetySensors as SafetyClient
from .backends import PushSignalBackend


class SafetySensors(StandardReadable):
    """``o2_ppm``, ``h2o_ppm`` (ppm), ``door_open``, ``estop`` (bool), pushed from telemetry."""

    def __init__(self, client: SafetyClient, name: str = "") -> None:
        self._client = client
        src = f"mqtt://{client.conn.host}:{client.conn.port}/{client.root}/telemetry"
        self._backends: dict[Key, PushSignalBackend] = {
            "o2_ppm": PushSignalBackend(
                float, f"{src}/o2_ppm", units="ppm", precision=2, on_connect=self._start
            ),
            "h2o_ppm": PushSignalBackend(
                float, f"{src}/h2o_ppm", units="ppm", precision=2, on_connect=self._start
            ),
            "door_open": PushSignalBackend(bool, f"{src}/door_open", on_connect=self._start),
            "estop": PushSignalBackend(bool, f"{src}/estop", on_connect=self._start),
        }
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.o2_ppm = SignalR(self._backends["o2_ppm"])
            self.h2o_ppm = SignalR(self._backends["h2o_ppm"])
        with self.add_children_as_readables(StandardReadableFormat.UNCACHED_SIGNAL):
            self.door_open = SignalR(self._backends["door_open"])
            self.estop = SignalR(self._backends["estop"])
        self._remove: Callable[[], None] | None = None
        super().__init__(name=name)

    @property
    def client(self) -> SafetyClient:
        return self._client

    async def _start(self) -> None:
        if self._remove is None:
            self._remove = self._client.on_change(self._on_event)
        await self._client.start()
        for key in KEYS:  # values that arrived before this device listened
            r = self._client.reading(key)
            if r is not None and r.ok:
                self._backends[key].update(r.value, r.received_at)

    def _on_event(self, ev: SafetyEvent) -> None:
        if ev.kind == "status":
            if ev.state == "offline":
                self.mark_stale()
            return
        if ev.key is None:
            return
        backend = self._backends[ev.key]
        if ev.kind == "reading" and ev.reading is not None and ev.reading.ok:
            backend.update(ev.reading.value, ev.reading.received_at)
        else:  # stale, or the sensor reports an error (null value)
            backend.mark_stale()

    def mark_stale(self) -> None:
        """Flag every reading INVALID (the gateway is gone)."""
        for backend in self._backends.values():
            backend.mark_stale()

    async def safe_state(self) -> None:
        """Sensors only: nothing to switch off."""

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


def make_safety_device(name: str, client: SafetyClient) -> SafetySensors:
    return SafetySensors(client, name=name)
