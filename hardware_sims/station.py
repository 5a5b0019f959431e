"""Characterisation station simulator (XRF composition and the screened property) on MQTT.

The station measures the crucible at its world location (``location``, default ``station``): the
XRF composition actually made (the dosed atomic fractions plus Gaussian noise of ``xrf_sigma``
per element, clipped at 0 and renormalised to sum 1) and the screened property of that crucible
from the cell's ground truth (for the composition dosed and the anneal the crucible received),
with relative Gaussian noise ``property_noise``. A measurement takes ``measure_s`` virtual
seconds; the station does one at a time.

Topics (``R = <prefix>/<cell>/<device>``, e.g. ``labd-sim/sim-cell/station``; all QoS 1)
------------------------------------------------------------------------------------------------

``R/status`` retained
    ``{"state": "online", "model": "SIM-XRF-1", "serial": "XRF-0001", "ts": 1.7e9}``; last will
    and clean stop: ``{"state": "offline"}`` (see :mod:`hardware_sims.mqtt_device`).
``R/telemetry/busy`` retained
    ``{"value": false, "ts": ...}`` — true while measuring (or while ``set_busy`` holds it).
``R/telemetry/measurements`` retained
    ``{"value": 3, "ts": ...}`` — measurements completed since the station booted.

``R/cmd/measure``  ``{"id": "m-17", "sample_id": "S-0042", "measure": ["composition", "property"]}``
    ``measure`` is optional (default both; a non-empty subset). At once, on ``R/ack/m-17``::

        {"id": "m-17", "accepted": true, "eta_s": 180.0}

    then after ``measure_s`` virtual seconds, on ``R/result/m-17``::

        {"id": "m-17", "sample_id": "S-0042", "crucible": "C003",
         "composition": {"Fe": 0.251, "Co": 0.249, ...},
         "property": {"name": "hardness", "value": 5.12, "unit": "GPa"},
         "anneal_c": 900.0, "ts": ...}

    ``anneal_c`` is null for a crucible that was never annealed. The sample id is recorded on the
    crucible (``crucible.sample_id``). If the crucible leaves the station during the measurement
    the result carries ``"error": {"code": 412, ...}`` instead of the measured values.
``R/cmd/status``  ``{"id": "q-1"}``
    On ``R/ack/q-1``: ``{"id": "q-1", "accepted": true, "state": {"busy": ..., "measuring": <id or
    null>, "sample_id": ..., "crucible": <id at the station or null>, "measurements": n}}``.

Refusals, on ``R/ack/<id>``: ``{"id": ..., "accepted": false, "error": {"code": c, "message": m}}``

===== ================================================================================
code  meaning
===== ================================================================================
400   malformed command: a field is missing or has the wrong type/value
404   unknown command (``R/cmd/<name>`` with another name)
409   busy with another measurement (or held busy by ``set_busy``)
412   no crucible at the station
422   the crucible at the station is empty (nothing was dosed)
===== ================================================================================

A payload that is not a JSON object, or has no usable ``id`` (a non-empty string of at most 128
characters without ``/``, ``+`` or ``#``), is answered on ``R/ack/invalid`` with
``{"id": <what was sent or null>, "accepted": false, "topic": <command topic>, "error": {"code":
400, "message": ...}}``.

Idempotency: the id is the key. A command whose id the station has already seen (QoS 1 may
deliver twice; a driver may re-send after a timeout) does not start anything: the original ack
is published again, and so is the result if it is already out. A new attempt needs a new id.
The id memory (last 1024 ids) is volatile: it is lost with the device (``drop_off``).

Faults (see also :mod:`hardware_sims.mqtt_device`)
    ``no_reply`` / ``late_reply`` / ``garble`` / ``truncate`` act on the replies — each ack and
    each result is one reply (``count`` counts them); the measurement itself still happens
    (``state()`` shows it). ``error`` (``code``, default 500): the next command (``count`` of them)
    is refused with that code, message ``"instrument error <code>"``. ``drop_off``: the station
    vanishes, the will fires, a measurement in progress is lost (no result ever comes), busy is
    cleared and the id memory is lost. ``disconnect``: silent network loss; a measurement in
    progress completes and its result is published when the link is back.

Control actions (``control(action, args)``)
    ``set_busy`` ``{"busy": true|false}`` — hold the station busy (as if used from its front
    panel) so ``measure`` is refused with 409; releasing it does not end a running measurement.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiomqtt
from pydantic import Field

from .base import DeviceConfig, SimContext
from .faults import FaultKind
from .mqtt_device import MqttDevice

ERR_MALFORMED = 400
ERR_UNKNOWN_COMMAND = 404
ERR_BUSY = 409
ERR_NO_CRUCIBLE = 412
ERR_EMPTY_CRUCIBLE = 422
ERR_INSTRUMENT = 500

MEASURABLE = ("composition", "property")
_ID_RE = re.compile(r"^[^/+#\x00]{1,128}$")
_ID_MEMORY = 1024


class StationConfig(DeviceConfig):
    #: World location whose crucible the station measures.
    location: str = "station"
    #: Standard deviation of XRF atomic fractions (absolute).
    xrf_sigma: float = Field(default=0.003, ge=0)
    #: Relative noise of the property measurement.
    property_noise: float = Field(default=0.0, ge=0)
    #: Virtual seconds one measurement takes.
    measure_s: float = Field(default=180.0, ge=0)
    keepalive_s: int = Field(default=10, ge=1)
    #: Reported in the online status.
    model: str = "SIM-XRF-1"
    serial_number: str = "XRF-0001"
    #: Reconnect backoff (wall-clock seconds): first delay, doubling up to the maximum.
    reconnect_min_s: float = Field(default=0.1, gt=0)
    reconnect_max_s: float = Field(default=2.0, gt=0)


class CommandError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Measurement:
    id: str
    sample_id: str
    crucible: str
    measure: tuple[str, ...]
    started: float
    eta_s: float


@dataclass
class _Answer:
    ack: dict[str, Any]
    result: dict[str, Any] | None = None


class StationSim(MqttDevice):
    """The characterisation station: XRF composition plus the screened property, on MQTT."""

    kind = "station"
    config: StationConfig

    def __init__(self, name: str, config: StationConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self._rng = ctx.rng(name)
        self._current: _Measurement | None = None
        self._held_busy = False
        self._measurements = 0
        self._started = 0
        #: Command id -> what was answered (idempotency by id).
        self._seen: OrderedDict[str, _Answer] = OrderedDict()
        self.commands_received = 0

    # -- MqttDevice hooks --------------------------------------------------------------------------
    def status_extra(self) -> dict[str, Any]:
        return {"model": self.config.model, "serial": self.config.serial_number}

    def subscriptions(self) -> list[str]:
        return [f"{self.root}/cmd/+"]

    @property
    def busy(self) -> bool:
        return self._held_busy or self._current is not None

    async def publish_retained(self) -> None:
        await self.publish(
            f"{self.root}/telemetry/busy", {"value": self.busy, "ts": self.ts()}, retain=True
        )
        await self.publish(
            f"{self.root}/telemetry/measurements",
            {"value": self._measurements, "ts": self.ts()},
            retain=True,
        )

    def on_power_loss(self) -> None:
        self._current = None
        self._held_busy = False
        self._measurements = 0
        self._seen.clear()

    async def handle(self, message: aiomqtt.Message) -> None:
        self.commands_received += 1
        topic = str(message.topic)
        command = topic.rsplit("/", 1)[-1]
        raw = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            self._invalid(topic, None, f"payload is not JSON: {exc}")
            return
        if not isinstance(body, dict):
            self._invalid(topic, None, "payload is not a JSON object")
            return
        cid = body.get("id")
        if not isinstance(cid, str) or not _ID_RE.match(cid):
            self._invalid(
                topic,
                cid if isinstance(cid, str | int | float) else None,
                "command has no valid 'id' (a non-empty string, at most 128 characters, "
                "without '/', '+' or '#')",
            )
            return
        if cid in self._seen:
            seen = self._seen[cid]
            self.log.info("%s: duplicate command id %s, ack repeated", self.name, cid)
            self.spawn(self.reply(f"{self.root}/ack/{cid}", seen.ack))
            if seen.result is not None:
                result = seen.result
                self.spawn(self.reply(f"{self.root}/result/{cid}", result))
            return
        try:
            fault = self.faults.take(FaultKind.ERROR)
            if fault is not None:
                code = fault.code if fault.code is not None else ERR_INSTRUMENT
                raise CommandError(code, f"instrument error {code}")
            if command == "measure":
                ack = self._measure(cid, body)
            elif command == "status":
                ack = {"id": cid, "accepted": True, "state": self._status()}
            else:
                raise CommandError(
                    ERR_UNKNOWN_COMMAND,
                    f"unknown command {command!r} (known: measure, status)",
                )
        except CommandError as err:
            ack = {
                "id": cid,
                "accepted": False,
                "error": {"code": err.code, "message": err.message},
            }
        self._remember(cid, ack)
        self.spawn(self.reply(f"{self.root}/ack/{cid}", ack))

    # -- commands ----------------------------------------------------------------------------------
    def _invalid(self, topic: str, cid: object, message: str) -> None:
        payload = {
            "id": cid,
            "accepted": False,
            "topic": topic,
            "error": {"code": ERR_MALFORMED, "message": message},
        }
        self.spawn(self.reply(f"{self.root}/ack/invalid", payload))

    def _remember(self, cid: str, ack: dict[str, Any]) -> None:
        self._seen[cid] = _Answer(ack)
        while len(self._seen) > _ID_MEMORY:
            self._seen.popitem(last=False)

    def _measure(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        sample_id = body.get("sample_id")
        if not isinstance(sample_id, str) or not sample_id:
            raise CommandError(ERR_MALFORMED, "'sample_id' must be a non-empty string")
        what = body.get("measure", list(MEASURABLE))
        if (
            not isinstance(what, list)
            or not what
            or any(not isinstance(w, str) or w not in MEASURABLE for w in what)
        ):
            raise CommandError(
                ERR_MALFORMED,
                f"'measure' must be a non-empty list of {', '.join(MEASURABLE)}",
            )
        unknown = set(body) - {"id", "sample_id", "measure"}
        if unknown:
            raise CommandError(ERR_MALFORMED, f"unknown field(s): {', '.join(sorted(unknown))}")
        if self._current is not None:
            raise CommandError(
                ERR_BUSY, f"busy with measurement {self._current.id} ({self._current.sample_id})"
            )
        if self._held_busy:
            raise CommandError(ERR_BUSY, "busy (station in use)")
        crucible = self.ctx.world.crucible_at(self.config.location)
        if crucible is None:
            raise CommandError(ERR_NO_CRUCIBLE, f"no crucible at {self.config.location}")
        if not crucible.composition():
            raise CommandError(ERR_EMPTY_CRUCIBLE, f"crucible {crucible.id} is empty")
        crucible.sample_id = sample_id
        self._current = _Measurement(
            id=cid,
            sample_id=sample_id,
            crucible=crucible.id,
            measure=tuple(w for w in MEASURABLE if w in what),
            started=self.ctx.clock.now(),
            eta_s=self.config.measure_s,
        )
        self._started += 1
        self.spawn(self._run_measurement(self._current))
        return {"id": cid, "accepted": True, "eta_s": self.config.measure_s}

    async def _run_measurement(self, m: _Measurement) -> None:
        await self._publish_busy()
        await self.ctx.clock.sleep(m.eta_s)
        result: dict[str, Any] = {"id": m.id, "sample_id": m.sample_id, "crucible": m.crucible}
        crucible = self.ctx.world.crucible_at(self.config.location)
        if crucible is None or crucible.id != m.crucible:
            result["error"] = {
                "code": ERR_NO_CRUCIBLE,
                "message": f"crucible {m.crucible} left {self.config.location} "
                "during the measurement",
            }
        else:
            if "composition" in m.measure:
                result["composition"] = self._xrf(crucible.composition())
            if "property" in m.measure:
                truth = self.ctx.world.truth
                value = self.ctx.world.true_property(crucible).value
                if self.config.property_noise > 0:
                    value *= 1.0 + self._rng.gauss(0.0, self.config.property_noise)
                result["property"] = {
                    "name": truth.property_name,
                    "value": value,
                    "unit": truth.unit,
                }
            result["anneal_c"] = crucible.anneal_temperature(self.ctx.world.config.anneal_hold_s)
        result["ts"] = self.ts()
        entry = self._seen.get(m.id)
        if entry is not None:
            entry.result = result
        self._measurements += 1
        self._current = None
        await self.reply(f"{self.root}/result/{m.id}", result)
        await self.publish_retained()

    def _xrf(self, composition: dict[str, float]) -> dict[str, float]:
        sigma = self.config.xrf_sigma
        noisy = {el: max(0.0, x + self._rng.gauss(0.0, sigma)) for el, x in composition.items()}
        total = sum(noisy.values())
        if total <= 0:
            return dict(composition)
        return {el: round(x / total, 6) for el, x in noisy.items()}

    async def _publish_busy(self) -> None:
        await self.publish(
            f"{self.root}/telemetry/busy", {"value": self.busy, "ts": self.ts()}, retain=True
        )

    def _status(self) -> dict[str, Any]:
        crucible = self.ctx.world.crucible_at(self.config.location)
        return {
            "busy": self.busy,
            "measuring": self._current.id if self._current else None,
            "sample_id": self._current.sample_id if self._current else None,
            "crucible": crucible.id if crucible else None,
            "measurements": self._measurements,
        }

    # -- SimInstrument -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        m = self._current
        return {
            **self._status(),
            "held_busy": self._held_busy,
            "current": None
            if m is None
            else {
                "id": m.id,
                "sample_id": m.sample_id,
                "crucible": m.crucible,
                "measure": list(m.measure),
                "started_s": m.started,
                "eta_s": m.eta_s,
            },
            "started": self._started,
            "commands_received": self.commands_received,
            **self.link_state(),
        }

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "set_busy":
            busy = args.get("busy", True)
            if not isinstance(busy, bool):
                raise ValueError(f"{self.name}: set_busy wants 'busy': true|false, got {busy!r}")
            self._held_busy = busy
            await self._publish_busy()
            return self.state()
        raise ValueError(f"{self.name}: unknown action {action!r} (known: set_busy)")
