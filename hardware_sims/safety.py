"""Cell safety sensors simulator on MQTT: glovebox O2/H2O ppm, door switch, e-stop.

A glovebox gateway that only publishes: it takes no commands. The physical state is changed through
:meth:`SafetySim.control` (the test bench's hand on the door, a leak in the glovebox, ...).

Topics (``R = <prefix>/<cell>/<device>``, e.g. ``labd-sim/sim-cell/safety``; all QoS 1, retained)
------------------------------------------------------------------------------------------------

``R/status``
    ``{"state": "online", "model": "SIM-GLOVEBOX-1", "serial": "GB-0001", "ts": 1.7e9}``; last
    will and clean stop: ``{"state": "offline"}`` (see :mod:`hardware_sims.mqtt_device`).
``R/telemetry/o2_ppm``, ``R/telemetry/h2o_ppm``
    ``{"value": 0.61, "unit": "ppm", "ts": ...}`` — the reading wanders around the level with
    Gaussian AR(1) noise of standard deviation ``o2_noise_ppm`` / ``h2o_noise_ppm`` (sensor noise
    and the box's own breathing), rounded to 0.01 ppm, never below 0.
``R/telemetry/door_open``, ``R/telemetry/estop``
    ``{"value": false, "ts": ...}``

All four are published every ``period_s`` wall-clock seconds, at once when a control action
changes them, and again on every (re)connection before the online status.

Faults (see also :mod:`hardware_sims.mqtt_device`)
    Each telemetry publication is one reply: ``no_reply`` swallows it (the status stays online but
    the values go stale — what a hung gateway looks like), ``late_reply`` holds it ``delay_s``,
    ``garble`` / ``truncate`` corrupt its payload. ``error`` (``code``, default 1): the sensors
    are in fault, each reading is published as ``{"value": null, "unit": "ppm", "ts": ...,
    "error": {"code": c, "message": "sensor error c"}}`` (door and e-stop likewise) for ``count``
    publication rounds.
    ``drop_off`` / ``disconnect``: the gateway vanishes / loses the network, as for every MQTT
    device. Telemetry is not queued while disconnected (the next round carries current values).

Control actions (``control(action, args)``)
    ``set_o2`` ``{"ppm": 25.0, "ramp_s": 600}`` — move the O2 level to ``ppm``, linearly over
    ``ramp_s`` virtual seconds (default 0: a step); ``set_h2o`` the same for H2O;
    ``open_door`` / ``close_door``; ``press_estop`` / ``release_estop``. Each returns ``state()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Any

import aiomqtt
from pydantic import Field

from .base import DeviceConfig, SimContext
from .faults import FaultKind
from .mqtt_device import MqttDevice

#: AR(1) coefficient of the ppm readings' wander (per publication).
_AR = 0.8


class SafetyConfig(DeviceConfig):
    o2_ppm: float = Field(default=0.6, ge=0)
    h2o_ppm: float = Field(default=0.9, ge=0)
    door_open: bool = False
    estop: bool = False
    #: Wall-clock seconds between telemetry publications.
    period_s: float = Field(default=1.0, gt=0)
    keepalive_s: int = Field(default=10, ge=1)
    #: Standard deviation of the O2 / H2O readings around their level (ppm).
    o2_noise_ppm: float = Field(default=0.05, ge=0)
    h2o_noise_ppm: float = Field(default=0.05, ge=0)
    #: Reported in the online status.
    model: str = "SIM-GLOVEBOX-1"
    serial_number: str = "GB-0001"
    #: Reconnect backoff (wall-clock seconds): first delay, doubling up to the maximum.
    reconnect_min_s: float = Field(default=0.1, gt=0)
    reconnect_max_s: float = Field(default=2.0, gt=0)


@dataclass
class _Level:
    """A gas level that may be ramping linearly (virtual time) towards a target."""

    start: float
    target: float
    t0: float = 0.0
    ramp_s: float = 0.0

    def at(self, now: float) -> float:
        if self.ramp_s <= 0 or now >= self.t0 + self.ramp_s:
            return self.target
        return self.start + (self.target - self.start) * (now - self.t0) / self.ramp_s


class SafetySim(MqttDevice):
    """Glovebox O2/H2O sensors, door switch and e-stop, publishing retained MQTT telemetry."""

    kind = "safety"
    config: SafetyConfig

    def __init__(self, name: str, config: SafetyConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self._rng = ctx.rng(name)
        self.levels = {"o2_ppm": _Level(config.o2_ppm, config.o2_ppm)}
        self.levels["h2o_ppm"] = _Level(config.h2o_ppm, config.h2o_ppm)
        self._noise = {"o2_ppm": config.o2_noise_ppm, "h2o_ppm": config.h2o_noise_ppm}
        self._offset = {"o2_ppm": 0.0, "h2o_ppm": 0.0}
        self.readings: dict[str, float] = {"o2_ppm": config.o2_ppm, "h2o_ppm": config.h2o_ppm}
        self.door_open = config.door_open
        self.estop = config.estop
        self.rounds = 0
        self._ticker: asyncio.Task[None] | None = None
        self._round_lock = asyncio.Lock()

    # -- MqttDevice hooks --------------------------------------------------------------------------
    def status_extra(self) -> dict[str, Any]:
        return {"model": self.config.model, "serial": self.config.serial_number}

    def subscriptions(self) -> list[str]:
        return []

    async def handle(self, message: aiomqtt.Message) -> None:
        self.log.info("%s: ignoring message on %s (takes no commands)", self.name, message.topic)

    async def publish_retained(self) -> None:
        await self._round(faults=False)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self._ticker = asyncio.create_task(self._tick(), name=f"{self.name}-telemetry")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await super().stop()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.period_s)  # the gateway's wall-clock period
            if self.connected:
                try:
                    await self._round(faults=True)
                except Exception:
                    self.log.exception("%s: telemetry round failed", self.name)

    # -- telemetry ---------------------------------------------------------------------------------
    def _sample(self) -> None:
        now = self.ctx.clock.now()
        for key, level in self.levels.items():
            sigma = self._noise[key]
            self._offset[key] = _AR * self._offset[key] + self._rng.gauss(
                0.0, sigma * math.sqrt(1 - _AR * _AR)
            )
            self.readings[key] = round(max(0.0, level.at(now) + self._offset[key]), 2)

    def _payloads(self, error_code: int | None) -> dict[str, dict[str, Any]]:
        ts = self.ts()
        out: dict[str, dict[str, Any]] = {}
        for key in ("o2_ppm", "h2o_ppm"):
            out[key] = {"value": self.readings[key], "unit": "ppm", "ts": ts}
        out["door_open"] = {"value": self.door_open, "ts": ts}
        out["estop"] = {"value": self.estop, "ts": ts}
        if error_code is not None:
            for p in out.values():
                p["value"] = None
                p["error"] = {"code": error_code, "message": f"sensor error {error_code}"}
        return out

    async def _round(self, *, faults: bool) -> None:
        """Sample and publish all four readings (through the reply faults when ``faults``)."""
        async with self._round_lock:
            self._sample()
            self.rounds += 1
            error = self.faults.take(FaultKind.ERROR) if faults else None
            code = None if error is None else (error.code if error.code is not None else 1)
            publish = self.reply if faults else self.publish
            await asyncio.gather(
                *(
                    publish(f"{self.root}/telemetry/{key}", payload, retain=True)
                    for key, payload in self._payloads(code).items()
                )
            )

    # -- SimInstrument -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        now = self.ctx.clock.now()
        return {
            "o2_ppm": self.readings["o2_ppm"],
            "h2o_ppm": self.readings["h2o_ppm"],
            "o2_level_ppm": self.levels["o2_ppm"].at(now),
            "h2o_level_ppm": self.levels["h2o_ppm"].at(now),
            "o2_target_ppm": self.levels["o2_ppm"].target,
            "h2o_target_ppm": self.levels["h2o_ppm"].target,
            "door_open": self.door_open,
            "estop": self.estop,
            "rounds": self.rounds,
            **self.link_state(),
        }

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action in ("set_o2", "set_h2o"):
            key = "o2_ppm" if action == "set_o2" else "h2o_ppm"
            ppm = args.get("ppm")
            ramp_s = args.get("ramp_s", 0.0)
            if isinstance(ppm, bool) or not isinstance(ppm, int | float) or not ppm >= 0:
                raise ValueError(f"{self.name}: {action} wants 'ppm' >= 0, got {ppm!r}")
            if isinstance(ramp_s, bool) or not isinstance(ramp_s, int | float) or not ramp_s >= 0:
                raise ValueError(f"{self.name}: {action} wants 'ramp_s' >= 0, got {ramp_s!r}")
            now = self.ctx.clock.now()
            self.levels[key] = _Level(self.levels[key].at(now), float(ppm), now, float(ramp_s))
        elif action in ("open_door", "close_door"):
            self.door_open = action == "open_door"
        elif action in ("press_estop", "release_estop"):
            self.estop = action == "press_estop"
        else:
            raise ValueError(
                f"{self.name}: unknown action {action!r} (known: set_o2, set_h2o, open_door, "
                "close_door, press_estop, release_estop)"
            )
        if self.connected:
            await self._round(faults=True)
        return self.state()
