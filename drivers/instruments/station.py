"""Characterisation station (XRF composition + the screened property) behind an MQTT gateway.

Topics (``R`` = the link's ``topic``, e.g. ``labd-sim/cell1/station``; everything QoS 1):

``R/status`` retained ``{"state": "online"|"offline", ...}`` with a last will of ``offline``;
``R/telemetry/busy`` and ``R/telemetry/measurements`` retained ``{"value": ..., "ts": ...}``;
``R/cmd/measure`` ``{"id", "sample_id", "measure"?}`` answered on ``R/ack/<id>`` with
``{"id", "accepted": true, "eta_s"}`` or ``{"accepted": false, "error": {"code", "message"}}``
(400 malformed, 404 unknown command, 409 busy, 412 no crucible, 422 empty crucible, 500 fault),
then the measurement on ``R/result/<id>``; ``R/cmd/status`` answered on ``R/ack/<id>``.

::

    station = Station("station", StationSettings(link=MqttLink(topic=root)), links)
    await station.start()                    # subscribes status + telemetry, starts the link
    await station.wait_online(5.0)
    result = await station.measure("S-0042")  # StationResult: composition, property, crucible
    state = await station.status()            # StationStatus: busy, measuring, crucible, count

Why a measurement is never started twice
    A measurement is not a read: it takes minutes of instrument time and records the sample id on
    the crucible. The command is published once, with an id the driver makes up (a uuid). If the
    ack does not come (lost on the way there or back, or the station was slow), the driver asks
    **once more with the same id**. That is safe, and provably so, because the station is
    idempotent by id: a command whose id it has already seen starts nothing; it re-publishes the
    original ack (and the result if it is already out). So the second publication either starts
    the one measurement (the first never arrived) or repeats the answer to the first — never a
    second measurement. A *new* id would be a new measurement, so the driver never makes one on
    its own. If the result does not come within its timeout, the same re-ask (if not used yet)
    recovers a result that was published but lost. Each :meth:`Station.measure` publishes its
    command at most twice, both times with the same id; after that it raises
    :class:`~drivers.errors.DeviceTimeout` and the caller must find out (:meth:`Station.status`
    says whether the station is still measuring that id) before deciding anything.

The station going away
    If the station's last will fires (``offline``) while a measurement is awaited, the wait ends
    at once with :class:`~drivers.errors.NotConnected`: a station that lost power has lost the
    measurement and its id memory, so no result will ever come. A measure is not sent while the
    station is known offline (it waits up to ``online_timeout_s`` for it to come back).

Errors: a refused ack -> :class:`~drivers.errors.InstrumentError` with the station's code and
message (a result carrying ``error`` likewise, e.g. 412 when the crucible left mid-measurement);
no ack -> :class:`~drivers.errors.DeviceTimeout`; a payload that is not JSON or lacks a field ->
:class:`~drivers.errors.ProtocolError`; bad arguments -> :class:`~drivers.errors.InvalidParameter`
before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import (
    DeviceTimeout,
    DriverError,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
    retry_read,
)
from ..links import Links, MqttLink
from ..transports.mqtt import Command, MqttMessage, Subscription
from .mqtt_presence import Presence, State

log = logging.getLogger(__name__)

Measurable = Literal["composition", "property"]
MEASURABLE: tuple[Measurable, ...] = ("composition", "property")
#: What the station accepts as a sample id (its command ids share the same rule).
SAMPLE_ID_MAX = 128
_FORBIDDEN = set("/+#\x00")


class StationSettings(BaseModel):
    """Where the station is and how long to wait for it."""

    model_config = ConfigDict(extra="forbid")

    link: MqttLink
    #: Seconds to wait for the ack of a command (the station answers at once).
    ack_timeout_s: float = Field(default=5.0, gt=0)
    #: Seconds to wait for a measurement's result after its ack; None: from the ack's ``eta_s``
    #: (``eta_s * result_eta_factor + result_grace_s``).
    result_timeout_s: float | None = Field(default=None, gt=0)
    result_eta_factor: float = Field(default=1.5, ge=1)
    result_grace_s: float = Field(default=60.0, ge=0)
    #: Seconds a measure waits for a station that is not (yet) online before refusing.
    online_timeout_s: float = Field(default=5.0, gt=0)
    #: The elements the cell works with (the ophyd device reads one signal per element).
    elements: list[str] = Field(default_factory=list)
    #: The screened property's unit; when set, a result in another unit is a ProtocolError.
    property_unit: str | None = None


def _ignore(_msg: object) -> None:
    """Replies are taken by the command that expects them; the standing subscription only keeps
    the broker sending them."""


@dataclass(frozen=True)
class PropertyValue:
    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class StationResult:
    """One measurement as the station reported it."""

    id: str
    sample_id: str
    crucible: str | None
    #: Atomic fractions from XRF (empty if only the property was measured).
    composition: dict[str, float]
    property: PropertyValue | None
    #: Anneal temperature the crucible received (None: never annealed).
    anneal_c: float | None
    #: The station's own clock (Unix seconds; in the simulator it runs at the virtual time scale).
    ts: float | None
    #: Local time the result arrived.
    received_at: float = field(default_factory=time.time)
    #: How many times the command was published (2 after a same-id re-ask).
    attempts: int = 1


@dataclass(frozen=True)
class StationStatus:
    busy: bool
    measuring: str | None
    sample_id: str | None
    crucible: str | None
    measurements: int


# -- wire models (extra fields ignored: a newer firmware may add some) ---------------------------
class _Error(BaseModel):
    code: int | str | None = None
    message: str = ""


class _Ack(BaseModel):
    id: str
    accepted: bool
    eta_s: float | None = Field(default=None, ge=0)
    error: _Error | None = None
    state: dict[str, Any] | None = None


class _Property(BaseModel):
    name: str
    value: float
    unit: str


class _Result(BaseModel):
    id: str
    sample_id: str | None = None
    crucible: str | None = None
    composition: dict[str, float] | None = None
    property: _Property | None = None
    anneal_c: float | None = None
    ts: float | None = None
    error: _Error | None = None


class _State(BaseModel):
    busy: bool
    measuring: str | None = None
    sample_id: str | None = None
    crucible: str | None = None
    measurements: int


class Station:
    """Protocol client of the characterisation station (see the module docstring)."""

    def __init__(self, name: str, settings: StationSettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self.conn = links.mqtt(settings.link)
        self.root = settings.link.topic.rstrip("/")
        self.presence = Presence(name, self.conn, self.root)
        #: Latest retained telemetry: ``busy`` and ``measurements`` -> (value, received_at).
        self.telemetry: dict[str, tuple[Any, float]] = {}
        #: Same-id re-publications made so far (lost acks or results recovered or not).
        self.reasks = 0
        self._lock = asyncio.Lock()
        self._subs: list[Subscription] = []

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the status and telemetry (restored by the connection after a broker
        restart) and start the broker connection if nobody has yet."""
        await self.presence.start()
        if not self._subs:
            self._subs.append(
                await self.conn.subscribe(f"{self.root}/telemetry/+", self._on_telemetry)
            )
            # Standing subscriptions to the reply topics: each command's expect() is then covered
            # and costs no SUBSCRIBE/UNSUBSCRIBE round trips to the broker (2x faster commands).
            for kind in ("ack", "result"):
                self._subs.append(
                    await self.conn.subscribe(f"{self.root}/{kind}/+", _ignore)
                )
            for key in ("busy", "measurements"):  # retained, already received by another client
                msg = self.conn.latest(f"{self.root}/telemetry/{key}")
                if msg is not None and key not in self.telemetry:
                    self._on_telemetry(msg)
        await self.conn.start()

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        self._subs.clear()
        await self.presence.close()

    async def wait_online(self, timeout: float | None = None) -> None:
        await self.presence.wait_online(
            self.settings.online_timeout_s if timeout is None else timeout
        )

    # -- state ------------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        """The broker link is up and the station's retained status says ``online``."""
        return self.presence.online

    @property
    def state(self) -> State:
        """``unknown`` / ``online`` / ``offline`` (``offline``: its last will fired: gone)."""
        return self.presence.state

    @property
    def busy(self) -> bool | None:
        """From the retained ``telemetry/busy`` (None before it arrived)."""
        v = self.telemetry.get("busy")
        return None if v is None else bool(v[0])

    def on_state(self, listener: Callable[[State], None]) -> Callable[[], None]:
        return self.presence.on_change(listener)

    def _on_telemetry(self, msg: MqttMessage) -> None:
        key = msg.topic.rsplit("/", 1)[-1]
        if not msg.payload:
            self.telemetry.pop(key, None)
            return
        try:
            body = msg.json()
            value = body["value"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable telemetry on %s: %r", self.name, msg.topic, msg.payload)
            return
        self.telemetry[key] = (value, msg.received_at)

    # -- commands ---------------------------------------------------------------------------------
    async def status(self, timeout: float | None = None) -> StationStatus:
        """Ask the station what it is doing. A read: retried (each try with a new id)."""
        t = self.settings.ack_timeout_s if timeout is None else timeout
        if t <= 0:
            raise InvalidParameter(self.name, "status", f"timeout must be > 0 s, got {t!r}")
        label = "status"

        async def once() -> StationStatus:
            try:
                raw = await self.conn.request(
                    f"{self.root}/cmd/status", {}, self._ack_topic, t, command=label
                )
            except DriverError as exc:
                raise self._own(exc, label) from exc
            ack = self._parse_ack(raw, label, None)
            try:
                st = _State.model_validate(ack.state)
            except ValidationError as exc:
                raise ProtocolError(self.name, label, f"bad status state: {exc}") from exc
            return StationStatus(st.busy, st.measuring, st.sample_id, st.crucible, st.measurements)

        return await retry_read(once, attempts=2)

    async def measure(
        self,
        sample_id: str,
        timeout: float | None = None,
        *,
        measure: Sequence[Measurable] = MEASURABLE,
    ) -> StationResult:
        """Measure the crucible at the station as ``sample_id``; ack, then result.

        ``timeout`` bounds the wait for the result after the ack (default: from
        ``result_timeout_s`` or the ack's ``eta_s``). See the module docstring for the same-id
        re-ask and what each failure raises.
        """
        label = f"measure {sample_id!r}"
        self._check_sample_id(sample_id, label)
        what = list(dict.fromkeys(measure))
        if not what or any(w not in MEASURABLE for w in what):
            raise InvalidParameter(
                self.name, label, f"measure must be a non-empty subset of {list(MEASURABLE)}, "
                f"got {list(measure)!r}",
            )
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidParameter(
                self.name, label, f"timeout must be a finite number of seconds > 0, got {timeout!r}"
            )
        payload: dict[str, Any] = {"sample_id": sample_id}
        if set(what) != set(MEASURABLE):
            payload["measure"] = what
        async with self._lock:
            await self.presence.wait_online(self.settings.online_timeout_s, label)
            replies = {"ack": self._ack_topic, "result": self._result_topic}
            async with self.conn.command(
                f"{self.root}/cmd/measure", payload, replies, command=label
            ) as cmd:
                return await self._follow(cmd, payload, label, timeout, what)

    async def _follow(
        self,
        cmd: Command,
        payload: dict[str, Any],
        label: str,
        timeout: float | None,
        what: list[str],
    ) -> StationResult:
        attempts = 1
        ack_t = self.settings.ack_timeout_s
        try:
            raw_ack = await self._reply(cmd, "ack", ack_t, label)
        except DeviceTimeout:
            attempts = await self._reask(cmd, payload, label, "ack")
            try:
                raw_ack = await self._reply(cmd, "ack", ack_t, label)
            except DeviceTimeout as exc:
                raise DeviceTimeout(
                    self.name, label, ack_t,
                    f"no ack to {label!r} (id {cmd.id}) within {ack_t:g} s, asked twice with "
                    "the same id; the station may or may not be measuring: ask status()",
                ) from exc
        ack = self._parse_ack(raw_ack, label, cmd.id)
        result_t = timeout
        if result_t is None:
            result_t = self.settings.result_timeout_s
        if result_t is None:
            eta = ack.eta_s if ack.eta_s is not None else 0.0
            result_t = eta * self.settings.result_eta_factor + self.settings.result_grace_s
        try:
            raw = await self._reply(cmd, "result", result_t, label)
        except DeviceTimeout as exc:
            if attempts > 1:
                raise
            # The result may have been published and lost: the station repeats it for its id.
            attempts = await self._reask(cmd, payload, label, "result")
            try:
                raw = await self._reply(cmd, "result", ack_t, label)
            except DeviceTimeout:
                raise DeviceTimeout(
                    self.name, label, result_t,
                    f"no result for {label!r} (id {cmd.id}) within {result_t:g} s, nor after "
                    "asking again with the same id",
                ) from exc
        return self._parse_result(raw, label, cmd.id, payload["sample_id"], what, attempts)

    async def _reask(self, cmd: Command, payload: dict[str, Any], label: str, lost: str) -> int:
        """Publish the command again with the SAME id (the station is idempotent by id)."""
        log.warning("%s: no %s for %s (id %s): asking again with the same id",
                    self.name, lost, label, cmd.id)
        self.reasks += 1
        await self.conn.publish(
            f"{self.root}/cmd/measure", {"id": cmd.id, **payload}, qos=1,
            command=f"{label} (same-id re-ask)",
        )
        return 2

    async def _json(self, cmd: Command, name: str, timeout: float, label: str) -> Any:
        """Reply ``name`` decoded (what ``Command.reply`` does, with errors naming the station)."""
        started = time.perf_counter()
        try:
            msg = await cmd.expectations[name].wait(timeout, command=label)
            try:
                value = msg.json()
            except ValueError as exc:
                raise ProtocolError(
                    self.name, label, f"{name} on {msg.topic} is not JSON", msg.payload
                ) from exc
        except DriverError as exc:
            self.conn.stats.record_error(exc)
            raise
        self.conn.stats.record_ok(started)
        return value

    async def _reply(self, cmd: Command, name: str, timeout: float, label: str) -> Any:
        """Wait for reply ``name``, or fail at once if the station's last will fires."""
        reply = asyncio.ensure_future(self._json(cmd, name, timeout, label))
        gone = asyncio.ensure_future(self.presence.wait_offline())
        try:
            await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not reply.done():
                reply.cancel()
        if reply.done() and not reply.cancelled():
            try:
                return reply.result()
            except DriverError as exc:
                raise self._own(exc, label) from exc
        raise NotConnected(
            self.name, label,
            f"the station went offline (last will) while waiting for the {name} of id {cmd.id}: "
            "the measurement is lost",
        )

    def _own(self, exc: DriverError, label: str) -> DriverError:
        """The transport's error, renamed after this device (the transport names the broker)."""
        if exc.device == self.name:
            return exc
        if isinstance(exc, DeviceTimeout):
            return DeviceTimeout(self.name, label, exc.timeout, exc.detail)
        if isinstance(exc, NotConnected):
            return NotConnected(self.name, label, exc.detail.split(" (command ", 1)[0])
        return exc

    # -- parsing ----------------------------------------------------------------------------------
    def _ack_topic(self, cid: str) -> str:
        return f"{self.root}/ack/{cid}"

    def _result_topic(self, cid: str) -> str:
        return f"{self.root}/result/{cid}"

    def _check_sample_id(self, sample_id: object, label: str) -> None:
        if (
            not isinstance(sample_id, str)
            or not sample_id.strip()
            or len(sample_id) > SAMPLE_ID_MAX
            or any(c in _FORBIDDEN or ord(c) < 32 for c in sample_id)
        ):
            raise InvalidParameter(
                self.name, label,
                f"sample_id must be a non-empty string of at most {SAMPLE_ID_MAX} printable "
                f"characters without '/', '+' or '#', got {sample_id!r}",
            )

    def _parse_ack(self, raw: Any, label: str, cid: str | None) -> _Ack:
        try:
            ack = _Ack.model_validate(raw)
        except ValidationError as exc:
            raise ProtocolError(
                self.name, label, f"ack is not what the protocol says: {exc.errors()[0]['msg']}",
                repr(raw).encode(),
            ) from exc
        if cid is not None and ack.id != cid:
            raise ProtocolError(self.name, label, f"ack for id {ack.id!r}, expected {cid!r}")
        if not ack.accepted:
            err = ack.error or _Error(message="refused without a reason")
            raise InstrumentError(self.name, label, err.code, err.message)
        return ack

    def _parse_result(
        self, raw: Any, label: str, cid: str, sample_id: str, what: list[str], attempts: int
    ) -> StationResult:
        try:
            res = _Result.model_validate(raw)
        except ValidationError as exc:
            raise ProtocolError(
                self.name, label,
                f"result is not what the protocol says: {exc.errors()[0]['msg']}",
                repr(raw).encode(),
            ) from exc
        if res.id != cid:
            raise ProtocolError(self.name, label, f"result for id {res.id!r}, expected {cid!r}")
        if res.error is not None:
            raise InstrumentError(self.name, label, res.error.code, res.error.message)
        if res.sample_id is not None and res.sample_id != sample_id:
            raise ProtocolError(
                self.name, label, f"result for sample {res.sample_id!r}, expected {sample_id!r}"
            )
        if "composition" in what and not res.composition:
            raise ProtocolError(self.name, label, "result has no composition")
        if "property" in what and res.property is None:
            raise ProtocolError(self.name, label, "result has no property")
        prop = None
        if res.property is not None:
            prop = PropertyValue(res.property.name, res.property.value, res.property.unit)
            unit = self.settings.property_unit
            if unit is not None and prop.unit != unit:
                raise ProtocolError(
                    self.name, label, f"property {prop.name} in {prop.unit!r}, expected {unit!r}"
                )
        return StationResult(
            id=res.id,
            sample_id=sample_id,
            crucible=res.crucible,
            composition=dict(res.composition or {}),
            property=prop,
            anneal_c=res.anneal_c,
            ts=res.ts,
            attempts=attempts,
        )
